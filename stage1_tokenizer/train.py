"""stage=tokenizer: train an ε-VAE, DGAE or VAE-baseline tokenizer with the shared training loop.

The objective (stage1_tokenizer/objective.py) defines the losses; this file only adapts it to the loop: which
parameters each optimiser owns, when the discriminator starts, and the reconstruction grids written while training.
"""
from __future__ import annotations

from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf, open_dict

from shared import runtime as runtime_lib
from shared.data.image_files import save_comparison_grid
from shared.data.images import make_image_loader
from shared.data.sampler import BatchSplit
from shared.errors import ConfigError
from shared.nn import enable_activation_checkpointing
from shared.train.loop import TrainModule, train
from shared.train.settings import loop_config, optim_config
from stage1_tokenizer.objective import build_objective

# Keys of the tokenizer config group that describe training, not the networks: changing them keeps checkpoints
# compatible (e.g. training longer).
TRAINING_ONLY_KEYS = ("train", "checkpoint", "init_encoder")
# Encoder settings that change what the network computes but not the shapes of its weights: an initial encoder
# brings its own (SD-VAE: one attention head, bottom/right padding), or its weights would compute something else.
SHAPELESS_ENCODER_KEYS = ("head_channels", "downsample_padding")


def model_config(tokenizer_cfg: DictConfig) -> dict:
    """The part of the tokenizer config that determines the networks, stored in every checkpoint."""
    config = OmegaConf.to_container(tokenizer_cfg, resolve=True)
    for key in TRAINING_ONLY_KEYS:
        config.pop(key, None)
    return config


def check_config(cfg: DictConfig) -> None:
    resolution, factor = cfg.data.resolution, cfg.tokenizer.downsample
    if resolution % factor:
        raise ConfigError(f"data.resolution={resolution} is not divisible by the tokenizer's downsampling factor "
                          f"tokenizer.downsample={factor}")


def adopt_initial_encoder(cfg: DictConfig) -> dict | None:
    """The encoder weights of tokenizer.init_encoder (a diffusers AutoencoderKL or a tokenizer checkpoint), or
    None. Their shapes must be those of tokenizer.encoder (ConfigError otherwise); the settings that shapes do not
    show (SHAPELESS_ENCODER_KEYS) are taken from the source into cfg.tokenizer.encoder, so the model config records
    them."""
    source = cfg.tokenizer.get("init_encoder")
    if not source:
        return None
    from stage1_tokenizer.convert import initial_encoder
    from stage1_tokenizer.encoder import Encoder
    from stage1_tokenizer.tokenizer import construct

    source_config, state = initial_encoder(source)
    with torch.device("meta"):  # shapes only
        ours = construct(Encoder, cfg.tokenizer.encoder, "tokenizer.encoder",
                         latent_channels=cfg.tokenizer.latent_channels).state_dict()
    different = next((name for name in sorted(set(ours) | set(state))
                      if name not in ours or name not in state or ours[name].shape != state[name].shape), None)
    if different is not None:
        def shape(tensors):
            return tuple(tensors[different].shape) if different in tensors else "absent"

        layout = ", ".join(f"{key}={source_config[key]}" for key in
                           ("latent_channels", "base_channels", "channel_mult", "num_res_blocks", "attention_levels"))
        raise ConfigError(f"tokenizer.init_encoder={source} does not fit tokenizer.encoder: its {different} is "
                          f"{shape(state)}, ours {shape(ours)}; choose a tokenizer whose encoder has {layout} "
                          f"(tokenizer=epsvae_sd_b for SD-VAE)")
    with open_dict(cfg):
        for key in SHAPELESS_ENCODER_KEYS:
            if key in source_config:
                cfg.tokenizer.encoder[key] = source_config[key]
    return state


class TokenizerTraining(TrainModule):
    """The generator phase trains encoder + decoder; the discriminator phase (GAN methods only) trains D."""

    def __init__(self, objective):
        super().__init__()
        self.objective = objective

    def phases(self) -> list[str]:
        return ["generator"] + (["discriminator"] if self.objective.discriminator is not None else [])

    def is_active(self, phase: str, step: int) -> bool:
        return phase == "generator" or self.objective.adversarial_active(step)

    def phase_parameters(self, phase: str) -> list[torch.nn.Parameter]:
        network = self.objective.tokenizer if phase == "generator" else self.objective.discriminator
        return [p for p in network.parameters() if p.requires_grad]

    def networks(self) -> dict[str, torch.nn.Module]:
        networks = {"tokenizer": self.objective.tokenizer}
        if self.objective.discriminator is not None:
            networks["discriminator"] = self.objective.discriminator
        return networks

    def forward(self, batch: dict, step: int, phase: str):
        if phase == "generator":
            return self.objective.generator_loss(batch["image"], step)
        return self.objective.discriminator_loss(batch["image"], step)


def preview_images(data_cfg: DictConfig, count: int) -> torch.Tensor:
    """The first `count` readable validation images, (count, 3, H, W): the same ones in every grid of a run.
    A webdataset without validation shards previews the start of its training stream."""
    split = "train" if data_cfg.kind == "webdataset" and not data_cfg.get("val_urls") else "val"
    batch = next(iter(make_image_loader(data_cfg, split, count, train=False, num_workers=0)))
    return batch["image"]


@torch.no_grad()
def reconstruction_grid(tokenizer, images: torch.Tensor, nfe: int, path: Path) -> None:
    tokenizer.eval()
    reconstructions = tokenizer.decode(tokenizer.encode(images).mode(), nfe=nfe)
    save_comparison_grid(images, reconstructions, path)


def train_tokenizer(cfg: DictConfig, run_dir: str | Path | None = None) -> dict:
    """Train (or resume) the tokenizer of `cfg.tokenizer` on `cfg.data`; returns the stage's result: the final
    checkpoint (`checkpoint`) and its step."""
    check_config(cfg)
    initial_encoder = adopt_initial_encoder(cfg)  # before setup: the run's config records the adopted settings
    with runtime_lib.setup(cfg, run_dir=run_dir, resume=True) as runtime:
        train_cfg = cfg.tokenizer.train
        objective = build_objective(cfg.tokenizer)
        if initial_encoder is not None:  # before the loop copies the EMA; a resumed run then loads its checkpoint
            objective.tokenizer.encoder.load_state_dict(initial_encoder)
            runtime.log.info("encoder initialised from %s", cfg.tokenizer.init_encoder)
        if train_cfg.activation_checkpointing and not enable_activation_checkpointing(objective.tokenizer):
            raise ConfigError(f"tokenizer.train.activation_checkpointing recomputes the blocks of a diffusion decoder "
                              f"(ADM UNet or DiT); tokenizer.kind={cfg.tokenizer.kind} has none")
        memory_format = torch.channels_last if cfg.channels_last else torch.contiguous_format
        objective.to(memory_format=memory_format)
        if cfg.compile:
            objective.tokenizer.compile()  # in place: checkpoints keep the plain module's parameter names
        module = TokenizerTraining(objective)
        optim = {"generator": optim_config(train_cfg)}
        if "discriminator" in module.phases():
            optim["discriminator"] = optim_config(train_cfg, prefix="disc_")
        loop = loop_config(train_cfg, optim)

        def make_batches(split: BatchSplit, start_step: int):
            loader = make_image_loader(cfg.data, "train", split.per_rank, train=True, seed=cfg.seed,
                                       rank=runtime.rank, world_size=split.world_size, micro_steps=split.grad_accum,
                                       start_batch=split.first_micro_batch(start_step),
                                       pin_memory=runtime.device.type == "cuda")
            # Converted once per batch on the host: the loop's device transfer keeps the layout.
            return ({**batch, "image": batch["image"].contiguous(memory_format=memory_format)} for batch in loader)

        preview = preview_images(cfg.data, cfg.reconstruct.grid_images).to(runtime.device)

        def on_sample(step: int, ema) -> None:
            with runtime.autocast():
                reconstruction_grid(ema.model, preview, cfg.decode.nfe,
                                    runtime.run_dir / "samples" / f"recon_{step:07d}.png")

        runtime.log.info("tokenizer %s: %.2fM trainable parameters", cfg.tokenizer.kind,
                         sum(p.numel() for p in objective.tokenizer.parameters()) / 1e6)
        result = train(runtime, module, make_batches, loop, model_config=model_config(cfg.tokenizer),
                       on_sample=on_sample, progress=cfg.progress)
        runtime.log.info("done: %s", result.checkpoint)
        return runtime.finish({"checkpoint": str(result.checkpoint), "step": result.step,
                               "nonfinite_steps": result.nonfinite_steps, "train_seconds": result.train_seconds})


def main(cfg: DictConfig) -> dict:
    return train_tokenizer(cfg)
