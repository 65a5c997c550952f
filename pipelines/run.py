"""The one entry point: `python pipelines/run.py stage=NAME [overrides]`.

Each stage is one function in the project's packages, imported only when chosen so that `stage=describe` does not
pay for DeepSpeed and `stage=metrics` does not build a DiT.
"""
from __future__ import annotations

import importlib
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script from a checkout without `pip install -e`
    sys.path.insert(0, str(ROOT))
if __name__ == "__main__":  # before the slow imports: a signal during their seconds is acted on once they are done
    from shared.preemption import defer_signals

    defer_signals()

import hydra  # noqa: E402
from omegaconf import DictConfig, OmegaConf  # noqa: E402

from pipelines.configs import register_resolvers  # noqa: E402

# stage name -> ("module:function", one line of help). Every function takes the resolved config.
STAGES: dict[str, tuple[str, str]] = {
    "tokenizer": ("stage1_tokenizer.train:main", "train a tokenizer (ε-VAE, DGAE or VAE baseline; tokenizer=...)"),
    "reconstruct": ("stage1_tokenizer.reconstruct:main", "reconstruct a split: rFID, PSNR, SSIM, LPIPS, decode img/s"),
    "cache": ("stage2_ldm.cache:main", "encode a data set into sharded latents + channel statistics"),
    "ldm": ("stage2_ldm.train:main", "train the class-conditional DiT on cached latents"),
    "sample": ("stage2_ldm.sample:main", "sample class-conditionally and decode through the tokenizer"),
    "evaluate": ("shared.metrics.evaluate:main", "gFID (and optional sFID, precision/recall) of samples"),
    "metrics": ("shared.metrics.compare:main", "FID / PSNR / SSIM / LPIPS between two folders: real=DIR fake=DIR"),
    "paper_speed": ("pipelines.paper_speed:main", "the paper's throughput claim: DiT-XL/2 + decoders at 256 px"),
    "describe": ("pipelines.describe:main", "parameter counts of tokenizer=NAME or ldm=NAME as one JSON line"),
    "shards": ("shared.data.shards:main", "write webdataset shards from an image folder"),
    "pipeline": ("pipelines.pipeline:main", "the main job: tokenizer -> cache -> ldm -> sample -> evaluate + report"),
    "reproduce": ("pipelines.reproduce:main", "the paper's claims, several main jobs and one table: reproduce=PRESET"),
    "ablation": ("pipelines.ablation:main", "the paper's ablation ladder (Table 5): reproduce=ladder32"),
    "pilot": ("pipelines.pilot:main", "short trainings and a decode sweep that fix a recipe: reproduce=fair32_pilot"),
    "budget": ("pipelines.budget:main", "the ε-VAE − VAE gap after each training budget, and its trend: "
                                        "reproduce=budget32"),
    "convergence": ("pipelines.convergence:main", "gFID of a DiT on each tokenizer's latents after each kept "
                                                  "checkpoint; steps to a common gFID: reproduce=dgae32"),
    "bench": ("pipelines.bench:main", "side-by-side speed benchmarks against diffusers / torch-fidelity"),
    "import": ("pipelines.interop:import_weights", "weights of diffusers or facebookresearch/DiT -> a checkpoint"),
    "export": ("pipelines.interop:export_weights", "a checkpoint -> diffusers folder, DiT .pt or safetensors folder"),
}


def stages_help() -> str:
    width = max(map(len, STAGES))
    lines = [f"  {name:<{width}}  {help_}" for name, (_, help_) in STAGES.items()]
    return (
        "Choose a stage: python pipelines/run.py stage=NAME [key=value ...], with NAME one of\n"
        + "\n".join(lines)
        + "\nPresets: experiment=smoke (embedded data, minutes on a CPU), experiment=imagenette_mini, "
        "experiment=imagenet256_*; reproduce=fair32|small32|paper for stage=reproduce, reproduce=ladder32 for "
        "stage=ablation, reproduce=fair32_pilot for stage=pilot, reproduce=budget32 for stage=budget, "
        "reproduce=dgae32 for stage=reproduce and stage=convergence. See README.md."
    )


def resolve_stage(cfg: DictConfig):
    """The function of the chosen stage, or SystemExit with the list of stages."""
    stage = None if OmegaConf.is_missing(cfg, "stage") else cfg.stage
    if stage not in STAGES:
        problem = "No stage given." if stage is None else f"Unknown stage {stage!r}."
        raise SystemExit(f"{problem}\n{stages_help()}")
    module_name, function_name = STAGES[stage][0].split(":")
    return getattr(importlib.import_module(module_name), function_name)


@hydra.main(config_path="../configs", config_name="config", version_base="1.3")
def main(cfg: DictConfig):
    stage = resolve_stage(cfg)
    from shared.config_check import check_config
    from shared.errors import UserError, one_line

    if __name__ == "__main__":  # the stage's imports are done: a signal now (or one during them) gets its one line
        from shared.preemption import exit_cleanly_on_signals

        exit_cleanly_on_signals()
    try:
        check_config(cfg)
        return stage(cfg)
    except UserError as error:
        raise SystemExit(one_line(error)) from None


if __name__ == "__main__":
    register_resolvers()
    main()
