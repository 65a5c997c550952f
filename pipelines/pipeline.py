"""stage=pipeline: the main job. tokenizer → reconstruct → cache → ldm → sample → evaluate, then a report.

    python pipelines/run.py stage=pipeline experiment=smoke

Everything goes under ${output_root}/pipeline/${name}/, one folder per step. Each step is a stage given the paths
that the steps before it returned; a step whose folder holds a finished stage's result (shared.runtime:
`finished_result`, the one contract of every stage) is not run again but its result taken, so rerunning the command
resumes (training steps also resume inside themselves from their checkpoints).
The folder keeps the config it was made with: rerunning it with a different config is refused, since skipping a
finished step would then report results of settings the command no longer asks for.
The report (report.md, report.json) states the settings behind every number.
`pipeline.tokenizer_run=NAME` takes the tokenizer that another pipeline run trained, with its settings, instead of
training one: `stage=pipeline name=long_dit pipeline.tokenizer_run=RUN ldm.train.steps=20000` trains, samples and
evaluates a longer DiT on RUN's tokenizer.
"""
from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable
from pathlib import Path

from omegaconf import DictConfig, OmegaConf, open_dict

from shared.errors import ConfigError
from shared.files import write_atomically
from shared.metrics.intervals import format_interval
from shared.runtime import config_differences, config_fingerprint, describe_differences, finished_result

STEPS = ("tokenizer", "reconstruct", "cache", "ldm", "sample", "evaluate")
# In a step's folder: the wall time of the invocations that stopped before the step finished (Pipeline.run_step).
INTERRUPTED_SECONDS = "interrupted_seconds.txt"


def _read_json(path: Path) -> dict | None:
    return json.loads(path.read_text()) if path.is_file() else None


def tokenizer_source(cfg: DictConfig, root: Path) -> tuple[Path, DictConfig]:
    """(folder, cfg with that run's tokenizer settings) of the pipeline run `pipeline.tokenizer_run` names (a name
    under ${output_root}/pipeline, or a folder), whose tokenizer step must have finished, for the run in `root`.
    The source's recorded tokenizer settings replace this run's (a notice lists those that differ); its data
    settings must be this run's, since its tokenizer encodes this run's images."""
    given = Path(str(cfg.pipeline.tokenizer_run))
    folder = given if (given / "pipeline_config.yaml").is_file() else Path(cfg.output_root) / "pipeline" / given
    record = folder / "pipeline_config.yaml"
    if not record.is_file() or finished_result(folder / "tokenizer") is None:
        raise ConfigError(f"pipeline.tokenizer_run={given}: {folder} holds no finished tokenizer step of a pipeline "
                          f"run; name a run (under {Path(cfg.output_root) / 'pipeline'}) or its folder")
    if (root / "tokenizer").exists():
        raise ConfigError(f"{root} trained a tokenizer of its own; pipeline.tokenizer_run={given} cannot replace it "
                          f"under its finished steps: choose a new name=")
    recorded, wanted = OmegaConf.load(record), config_fingerprint(cfg)
    data_changes = config_differences(OmegaConf.to_container(recorded.data), wanted["data"], "data.")
    if data_changes:
        raise ConfigError(f"pipeline.tokenizer_run={given} was trained on other data "
                          f"({describe_differences(data_changes)}): give this run the data settings of that run")
    # tokenizer.checkpoint only says where the single stages look (a path made from the run's name): not a setting
    replaced = [change for change in config_differences(OmegaConf.to_container(recorded.tokenizer),
                                                        wanted["tokenizer"], "tokenizer.")
                if change[0] != "tokenizer.checkpoint"]
    if replaced:
        print(f"pipeline.tokenizer_run={given}: this run takes that run's tokenizer settings "
              f"({describe_differences([(key, new, old) for key, old, new in replaced])})", file=sys.stderr)
    cfg = cfg.copy()
    with open_dict(cfg):  # over this run's, so that keys a record leaves out (or had not yet) keep their values
        cfg.tokenizer = OmegaConf.merge(OmegaConf.to_container(cfg.tokenizer, resolve=True), recorded.tokenizer)
    return folder, cfg


class Pipeline:
    """The steps of the main job, each a stage run in its own folder with the inputs of the steps before it."""

    def __init__(self, cfg: DictConfig):
        self.root = Path(cfg.output_root) / "pipeline" / str(cfg.name)
        unknown = set(cfg.pipeline.steps) - set(STEPS)
        if unknown:
            raise ConfigError(f"pipeline.steps has unknown steps {sorted(unknown)}; choose from {list(STEPS)}")
        self.tokenizer_root = self.root
        if cfg.pipeline.get("tokenizer_run"):
            self.tokenizer_root, cfg = tokenizer_source(cfg, self.root)
        self.cfg = cfg
        # a tokenizer taken from another run is not trained here
        self.steps = [step for step in STEPS if step in cfg.pipeline.steps
                      and not (step == "tokenizer" and self.tokenizer_root != self.root)]
        self.seconds: dict[str, float] = _read_json(self.root / "seconds.json") or {}

    def check_config(self) -> None:
        """Record the config of a new pipeline folder; refuse to continue one made with a different config."""
        path = self.root / "pipeline_config.yaml"
        wanted = config_fingerprint(self.cfg)  # without pipeline.steps, which may change between invocations
        if path.is_file():
            changed = config_differences(config_fingerprint(OmegaConf.load(path)), wanted)
            if changed:
                raise ConfigError(f"{self.root} was made with a different config ({describe_differences(changed)}): "
                                  f"choose a new name= or delete that folder")
            return
        self.root.mkdir(parents=True, exist_ok=True)
        OmegaConf.save(OmegaConf.create(wanted), path)

    def folder(self, step: str) -> Path:
        return (self.tokenizer_root if step == "tokenizer" else self.root) / step

    def result(self, step: str) -> dict:
        """What a finished step returned, read from its folder; the steps after it take their inputs from it."""
        result = finished_result(self.folder(step))
        if result is None:
            raise ConfigError(f"the pipeline step {step} has not finished in {self.folder(step)}: add it to "
                              f"pipeline.steps")
        return result

    def run_step(self, step: str, run: Callable[[Path], dict]) -> dict:
        """The step's result: `run(folder)` unless the step's folder holds the result of a finished run already
        (the stage contract: shared.runtime.finished_result), which is then taken as it is.
        Its wall time in seconds.json is that of every invocation since the step last finished: one that stops
        before the end (an error, a pre-emption) leaves its time in the step's folder (INTERRUPTED_SECONDS) for the
        invocation that resumes the step, so that a run resumed over several sessions reports what it took."""
        folder = self.folder(step)
        result = finished_result(folder)
        if result is not None:
            return result
        interrupted = folder / INTERRUPTED_SECONDS
        seconds_before = float(interrupted.read_text()) if interrupted.is_file() else 0.0
        began = time.perf_counter()
        try:
            result = run(folder)
        except BaseException:
            if folder.is_dir():  # else the step stopped before it began its work
                # atomically: a half-written count, read back as a float, would stop the step from resuming
                write_atomically(interrupted, f"{seconds_before + time.perf_counter() - began:.2f}\n")
            raise
        self.seconds[step] = round(seconds_before + time.perf_counter() - began, 2)
        (self.root / "seconds.json").write_text(json.dumps(self.seconds, indent=2) + "\n")
        interrupted.unlink(missing_ok=True)
        return result

    def run_tokenizer(self, folder: Path) -> dict:
        from stage1_tokenizer.train import train_tokenizer

        return train_tokenizer(self.cfg, run_dir=folder)

    def run_reconstruct(self, folder: Path) -> dict:
        from stage1_tokenizer.reconstruct import reconstruct

        return reconstruct(self.cfg, self.result("tokenizer")["checkpoint"], run_dir=folder)

    def run_cache(self, folder: Path) -> dict:
        from stage2_ldm.cache import cache_to_folder

        return cache_to_folder(self.cfg, self.result("tokenizer")["checkpoint"], folder, splits=["train"])

    def run_ldm(self, folder: Path) -> dict:
        from stage2_ldm.train import train_ldm

        return train_ldm(self.cfg, self.result("cache")["dir"], self.result("tokenizer")["checkpoint"],
                         run_dir=folder, previews=True)

    def run_sample(self, folder: Path) -> dict:
        from stage2_ldm.sample import sample_to_folder

        return sample_to_folder(self.cfg, self.result("ldm")["checkpoint"], self.result("tokenizer")["checkpoint"],
                                out_dir=folder)

    def run_evaluate(self, folder: Path) -> dict:
        from shared.metrics.evaluate import evaluate_to_folder

        return evaluate_to_folder(self.cfg, self.result("sample")["samples"], run_dir=folder)

    def sample_and_evaluate(self, cfg: DictConfig, ldm_checkpoint: str | Path, sample_step: str,
                            evaluate_step: str) -> tuple[dict, dict]:
        """(sample result, evaluate result) of the DiT at `ldm_checkpoint` sampled with the settings of `cfg`,
        decoded by this run's tokenizer and evaluated, in the step folders `sample_step` and `evaluate_step` (a
        guidance scale or a kept checkpoint measured beside the main steps)."""
        from shared.metrics.evaluate import evaluate_to_folder
        from stage2_ldm.sample import sample_to_folder

        tokenizer = self.result("tokenizer")["checkpoint"]
        samples = self.run_step(sample_step, lambda folder: sample_to_folder(cfg, ldm_checkpoint, tokenizer,
                                                                             out_dir=folder))
        return samples, self.run_step(evaluate_step, lambda folder: evaluate_to_folder(cfg, samples["samples"],
                                                                                       run_dir=folder))

    def run(self) -> dict:
        """Every configured step (finished ones are skipped), then the report."""
        self.check_config()
        for step in self.steps:
            self.run_step(step, getattr(self, f"run_{step}"))
        return self.report()

    def report(self) -> dict:
        from shared.metrics.lpips import secondary_net

        reconstruction, sampling, evaluation = (finished_result(self.folder(step)) or {}
                                                for step in ("reconstruct", "sample", "evaluate"))
        secondary_lpips = f"lpips_{secondary_net(self.cfg.lpips_net)}"
        report = {
            "name": str(self.cfg.name), "data": OmegaConf.to_container(self.cfg.data, resolve=True),
            "tokenizer": {"kind": self.cfg.tokenizer.kind, "downsample": self.cfg.tokenizer.downsample,
                          "latent_channels": self.cfg.tokenizer.latent_channels,
                          "train_steps": self.cfg.tokenizer.train.steps},
            "ldm": {"depth": self.cfg.ldm.depth, "hidden_size": self.cfg.ldm.hidden_size,
                    "patch_size": self.cfg.ldm.patch_size, "objective": self.cfg.ldm.objective,
                    "train_steps": self.cfg.ldm.train.steps},
            "reconstruction": {"lpips_net": self.cfg.lpips_net, **{key: reconstruction.get(key) for key in
                               ("rfid", "rfid_std", "rfid_ci95", "psnr", "psnr_ci95", "ssim", "ssim_ci95", "lpips",
                                "lpips_ci95", secondary_lpips, f"{secondary_lpips}_ci95", "noise_seeds", "noise_std",
                                "noise_std_ci95", "seed_mean_psnr", "seed_mean_psnr_ci95", "chroma_hf",
                                "chroma_hf_ci95", "chroma_hf_original", "chroma_hf_original_ci95", "chroma_hf_ratio",
                                "decode_images_per_s", "num_images", "decoder_nfe", "subset")}},
            "generation": {"gfid": evaluation.get("fid"), "gfid_std": evaluation.get("fid_std"),
                           "gfid_ci95": evaluation.get("fid_ci95"), "num_samples": sampling.get("num_samples"),
                           "sampler": sampling.get("sampler"), "steps": sampling.get("steps"),
                           "cfg_scale": sampling.get("cfg_scale"), "decoder_nfe": sampling.get("decoder_nfe"),
                           "reference": evaluation.get("reference"),
                           "bootstrap_resamples": evaluation.get("bootstrap_resamples")},
            "throughput_images_per_s": sampling.get("images_per_s"),
            "sample_batch_size": sampling.get("batch_size"),
            "wall_seconds": self.seconds,
        }
        (self.root / "report.json").write_text(json.dumps(report, indent=2) + "\n")
        (self.root / "report.md").write_text(render_markdown(report))
        return report


def _fmt(value, digits: int = 3) -> str:
    return "n/a" if value is None else f"{value:.{digits}g}" if isinstance(value, float) else str(value)


def _described(subset: dict | None) -> str:
    if not subset:
        return "n/a"
    chosen = f"{subset['images']} of {subset['of']} {subset['split']} images"
    return chosen if subset["selection"] == "all" else f"{chosen}, {subset['selection']} (seed {subset['seed']})"


def render_markdown(report: dict) -> str:
    from shared.metrics.lpips import secondary_net

    rec, gen, speed = report["reconstruction"], report["generation"], report["throughput_images_per_s"] or {}
    net, secondary = rec["lpips_net"], secondary_net(rec["lpips_net"])
    with_interval = lambda key: format_interval(rec[key], rec.get(f"{key}_ci95"), ".3g")
    tok, ldm = report["tokenizer"], report["ldm"]
    ranges = speed.get("range", {})
    spread = lambda part: "" if part not in ranges else f" [{ranges[part][0]:.3g}, {ranges[part][1]:.3g}]"
    lines = [
        f"# Pipeline report: {report['name']}", "",
        f"Data: {report['data'].get('kind')} at {report['data'].get('resolution')} px. "
        f"Tokenizer: {tok['kind']} f{tok['downsample']} × {tok['latent_channels']} channels, "
        f"{tok['train_steps']} steps. DiT: depth {ldm['depth']}, width {ldm['hidden_size']}, patch "
        f"{ldm['patch_size']}, {ldm['objective']} objective, {ldm['train_steps']} steps.", "",
        "Brackets: 95% intervals (FID: ± 1.96 bootstrap standard deviations over the images; PSNR/SSIM/LPIPS, noise "
        "and colour noise: Student t over the images; images/s: the range over the timed batches).", "",
        "| metric | value | settings |", "|---|---|---|",
        f"| rFID | {with_interval('rfid')} | {_described(rec.get('subset'))}, "
        f"decoder NFE {rec['decoder_nfe']} |",
        f"| PSNR (dB) | {with_interval('psnr')} | same |",
        f"| SSIM | {with_interval('ssim')} | same |",
        f"| LPIPS ({net}) | {with_interval('lpips')} | same |",
        f"| LPIPS ({secondary}, secondary) | {with_interval(f'lpips_{secondary}')} | same |",
        f"| decoder noise std (grey levels) | {with_interval('noise_std')} | RMS over the pixels of the spread across "
        f"{rec['noise_seeds']} decodes with independent noise |",
        f"| PSNR of the decodes' mean (dB) | {with_interval('seed_mean_psnr')} | same decodes |",
        f"| colour noise, reconstructions (grey levels) | {with_interval('chroma_hf')} | RMS of the chroma (Cb, Cr) "
        f"minus its 3×3 blur |",
        f"| colour noise, originals (grey levels) | {with_interval('chroma_hf_original')} | same |",
        f"| colour noise ratio | {_fmt(rec['chroma_hf_ratio'])} | the mean of the reconstructions' over the "
        f"originals' |",
        f"| gFID | {format_interval(gen['gfid'], gen.get('gfid_ci95'), '.3g')} | {gen['num_samples']} samples, "
        f"{gen['sampler']} {gen['steps']} steps, CFG {gen['cfg_scale']}, decoder NFE {gen['decoder_nfe']}, "
        f"reference: {gen['reference']} |",
        f"| images/s, DiT sampling | {_fmt(speed.get('ldm'))}{spread('ldm')} | batch {report['sample_batch_size']}, "
        f"median of {speed.get('timed_batches', 'n/a')} batches |",
        f"| images/s, decoding | {_fmt(speed.get('decode'))}{spread('decode')} | same |",
        f"| images/s, whole chain | {_fmt(speed.get('total'))}{spread('total')} | same |",
        f"| tokenizer decode images/s (reconstruction) | {_fmt(rec['decode_images_per_s'])} | |", "",
        f"Reconstructions (originals above): ![reconstructions](reconstruct/reconstructions_nfe{rec['decoder_nfe']}.png)",
        "", "Samples (one row per class): ![samples](sample/grid.png)", "",
        "Wall time per step (s): " + ", ".join(f"{k} {v}" for k, v in report["wall_seconds"].items()), "",
    ]
    return "\n".join(lines)


def main(cfg: DictConfig) -> dict:
    pipeline = Pipeline(cfg)
    report = pipeline.run()
    print((pipeline.root / "report.md").read_text())
    return report
