"""`stage=bench`: our networks and loaders side by side with what users would pick instead, in one process.

    python pipelines/run.py stage=bench [bench.quick=true] [bench.out=benchmarks/bench_cpu] [bench.compile=true]

| ours | theirs |
|---|---|
| DiT (stage2_ldm/dit.py): train step, CFG sampling step, whole sampling | diffusers `DiTTransformer2DModel`, same shape |
| VAE baseline with the SD-VAE encoder/decoder: encode, decode | diffusers `AutoencoderKL` (SD-VAE config) |
| ε-VAE decode at NFE 1, 2, 3 | the VAE baseline decoder of the same size class |
| cached-latent loader (shared/data/latents.py) | image loader (shared/data/images.py) |
| FID features (shared/metrics/inception.py) | torch-fidelity `FeatureExtractorInceptionV3`, same weights |

Timing: `warmup` untimed calls, then `repeats` timed calls of ours and theirs alternately (a shared machine's
load hits both alike), fastest call of each; CUDA is synchronised around each call. The fastest call, as timeit
advises: noise from other processes only ever adds time, so the minimum is the estimate of a call's own cost
(the median of 9 calls still swung ±12% between runs on this shared 2-core machine). Ratios are ours / theirs
in throughput: ≥ 1 means we are at least as fast. Each model's FLOPs per call are counted once with
FlopCounterMode and divided by its time, and reported as a fraction of the machine's measured limit: the
better of a large square matmul and a large 3×3 convolution (fp32 on the CPU, bf16 on CUDA), timed in the same
run. Both are needed: on some CPUs oneDNN's convolution kernels run at twice MKL's sgemm rate, and a matmul-only
limit would credit convolutional networks with more than 100% of the machine.

The Markdown table and the JSON go to the run folder and, with `bench.out=PATH`, to PATH.md / PATH.json too.
"""
from __future__ import annotations

import datetime
import json
import os
import shlex
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from unittest import mock

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from pipelines.describe import count_parameters
from pipelines.configs import ROOT, group_config
from shared.machine import describe
from shared.runtime import Runtime, setup, synchronize

# bench.quick: the same benchmark on tiny networks and inputs, a smoke test of this file (seconds, not minutes).
QUICK = {
    "warmup": 0, "repeats": 1, "dit_batch_size": 2, "image_batch_size": 1, "latent_size": 8, "image_size": 32,
    "sample_images": 2, "sample_steps": 3, "loader_images": 32, "fid_images": 1, "matmul_size": 256,
    "conv_channels": 32, "conv_size": 16,
    "dit": {"depth": 2, "hidden_size": 64, "num_heads": 4, "patch_size": 2},
    "sd_vae_channels": [32, 32, 64, 64],
    "epsvae": "epsvae_tiny", "vae": "vae_tiny",
}
NUM_CLASSES = 1000
LATENT_CHANNELS = 4
LIMIT_REPEATS = 10  # cheap (a 2048² matmul is 17 GFLOP), and the limit is their best
TARGETS = {"dit_train_step": 1.0, "vae_decode": 1.0, "latent_loader": 20.0}


# ------------------------------------------------------------------------------------------------ timing
def timed_call(fn: Callable[[], object], device: torch.device) -> float:
    synchronize(device)
    start = time.perf_counter()
    fn()
    synchronize(device)
    return time.perf_counter() - start


def fastest_seconds_side_by_side(ours: Callable[[], object], theirs: Callable[[], object], device: torch.device,
                                 warmup: int, repeats: int) -> tuple[float, float]:
    """Seconds of the fastest call of `ours` and of `theirs`, timed alternately."""
    for _ in range(warmup):
        ours()
        theirs()
    ours_times, theirs_times = [], []
    for _ in range(repeats):
        ours_times.append(timed_call(ours, device))
        theirs_times.append(timed_call(theirs, device))
    return min(ours_times), min(theirs_times)


def count_flops(fn: Callable[[], object]) -> int:
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def best_flops_per_second(fn: Callable[[], object], flops: int, device: torch.device, warmup: int,
                          repeats: int) -> float:
    """FLOP/s of `fn` from its fastest call: a limit is the best the machine does; slower calls measure other
    processes on a shared machine."""
    for _ in range(warmup):
        fn()
    return flops / min(timed_call(fn, device) for _ in range(repeats))


@torch.no_grad()
def measured_limits(device: torch.device, dtype: torch.dtype, bench: DictConfig) -> dict:
    """FLOP/s of a square matmul and of a channels-last 3×3 convolution, and the better of the two."""
    size = bench.matmul_size
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    matmul = best_flops_per_second(lambda: a @ b, 2 * size**3, device, bench.warmup, LIMIT_REPEATS)
    channels, side = bench.conv_channels, bench.conv_size
    conv = nn.Conv2d(channels, channels, 3, padding=1, bias=False).to(device, dtype, memory_format=torch.channels_last)
    x = torch.randn(1, channels, side, side, device=device, dtype=dtype).to(memory_format=torch.channels_last)
    conv_flops = 2 * channels * channels * 9 * side * side
    convolution = best_flops_per_second(lambda: conv(x), conv_flops, device, bench.warmup, LIMIT_REPEATS)
    return {"dtype": str(dtype), "matmul": {"size": size, "flops_per_second": matmul},
            "conv3x3": {"channels": channels, "size": side, "flops_per_second": convolution},
            "flops_per_second": max(matmul, convolution)}


# ------------------------------------------------------------------------------------------------ results
@dataclass
class Row:
    """One comparison: throughput of ours and theirs in `unit` (items per second) and their FLOP/s fractions."""

    name: str
    unit: str
    ours: float
    theirs: float
    ours_flops: int | None = None  # per call
    theirs_flops: int | None = None
    ours_flops_fraction: float | None = None
    theirs_flops_fraction: float | None = None
    target: float | None = None
    note: str = ""
    ratio: float = field(init=False)

    def __post_init__(self):
        self.ratio = self.ours / self.theirs

    @property
    def missed(self) -> bool:
        return self.target is not None and self.ratio < self.target


@dataclass
class Context:
    """What every section needs: the bench settings, the runtime and the machine's measured FLOP/s limit."""

    bench: DictConfig
    runtime: Runtime
    peak_flops: float

    @property
    def device(self) -> torch.device:
        return self.runtime.device

    def side_by_side(self, name: str, unit: str, items: int, ours: Callable[[], object],
                     theirs: Callable[[], object], *, flops: tuple[int, int] | None = None, warmup: int | None = None,
                     repeats: int | None = None, **extra) -> Row:
        """Time ours against theirs (each call handles `items` items) and turn the times into a Row.

        flops: FLOPs per call of ours and theirs; counted by running each once more when not given.
        warmup, repeats: instead of bench.warmup / bench.repeats, for calls that are long and already warm."""
        with self.runtime.autocast():
            if flops is None:
                flops = count_flops(ours), count_flops(theirs)
            ours_seconds, theirs_seconds = fastest_seconds_side_by_side(
                ours, theirs, self.device, self.bench.warmup if warmup is None else warmup,
                self.bench.repeats if repeats is None else repeats)
        self.runtime.log.info("%s: ours %.4g s, theirs %.4g s per call", name, ours_seconds, theirs_seconds)
        return Row(name, unit, items / ours_seconds, items / theirs_seconds, flops[0], flops[1],
                   flops[0] / ours_seconds / self.peak_flops, flops[1] / theirs_seconds / self.peak_flops, **extra)

    def prepare(self, model: nn.Module, convolutional: bool = False) -> nn.Module:
        """On the device, optionally compiled; a convolutional network channels-last (NHWC), which suits both
        cuDNN's tensor cores and oneDNN on the CPU (about 20% faster SD-VAE decoding here)."""
        model = model.to(self.device, memory_format=torch.channels_last if convolutional else torch.contiguous_format)
        return torch.compile(model) if self.bench.compile else model


# ------------------------------------------------------------------------------------------------ DiT
class DiffusersDiT(nn.Module):
    """diffusers' DiTTransformer2DModel behind our DiT's call (x, t, y, force_drop), so that the same objective,
    sampler and classifier-free guidance drive both networks."""

    def __init__(self, in_channels: int, input_size: int, num_classes: int, patch_size: int, hidden_size: int,
                 depth: int, num_heads: int):
        from diffusers import DiTTransformer2DModel

        super().__init__()
        self.num_classes = num_classes
        self.model = DiTTransformer2DModel(
            num_attention_heads=num_heads, attention_head_dim=hidden_size // num_heads, in_channels=in_channels,
            out_channels=in_channels, num_layers=depth, patch_size=patch_size, sample_size=input_size,
            num_embeds_ada_norm=num_classes, activation_fn="gelu-approximate", norm_elementwise_affine=False)
        # diffusers gives every block its own timestep + label embedding; DiT has one, which the converted
        # checkpoints copy into each block. Sharing it makes the two the same network (and parameter count); the
        # per-block recomputation of the embedding stays in their forward.
        shared_embedding = self.model.transformer_blocks[0].norm1.emb
        for block in self.model.transformer_blocks[1:]:
            block.norm1.emb = shared_embedding

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor,
                force_drop: torch.Tensor | None = None) -> torch.Tensor:
        if force_drop is not None:
            y = torch.where(force_drop, torch.full_like(y, self.num_classes), y)
        return self.model(x, timestep=t, class_labels=y).sample

    def forward_with_cfg(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor, cfg_scale: float) -> torch.Tensor:
        from stage2_ldm.dit import DiT

        return DiT.forward_with_cfg(self, x, t, y, cfg_scale)


def dit_pair(ctx: Context) -> tuple[nn.Module, nn.Module]:
    from stage2_ldm.dit import DiT

    shape = dict(ctx.bench.dit)
    ours = DiT(input_size=ctx.bench.latent_size, in_channels=LATENT_CHANNELS, num_classes=NUM_CLASSES,
               learn_sigma=False, **shape)
    theirs = DiffusersDiT(LATENT_CHANNELS, ctx.bench.latent_size, NUM_CLASSES, **shape)
    return ours, theirs


def train_step(model: nn.Module, optimizer: torch.optim.Optimizer, objective, latents: torch.Tensor,
               labels: torch.Tensor) -> Callable[[], None]:
    def step():
        loss, _ = objective.loss(model, latents, labels)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def bench_dit(ctx: Context) -> tuple[list[Row], dict]:
    from shared.train.backends import OptimConfig, build_optimizer
    from stage2_ldm.objective import FlowObjective

    ours, theirs = dit_pair(ctx)
    params = {"ours": count_parameters(ours), "theirs": count_parameters(theirs)}
    ours, theirs = ctx.prepare(ours), ctx.prepare(theirs)
    objective = FlowObjective()
    batch, size = ctx.bench.dit_batch_size, ctx.bench.latent_size
    latents = torch.randn(batch, LATENT_CHANNELS, size, size, device=ctx.device)
    labels = torch.randint(0, NUM_CLASSES, (batch,), device=ctx.device)
    optim = OptimConfig(lr=1e-4)  # the stage-2 loop's AdamW (multi-tensor on the CPU, fused on CUDA) for both
    steps = [train_step(model.train(), build_optimizer(model.parameters(), optim, ctx.device), objective, latents,
                        labels) for model in (ours, theirs)]
    rows = [ctx.side_by_side("DiT train step (fwd + bwd + AdamW)", "images/s", batch, *steps,
                             target=TARGETS["dit_train_step"])]

    ours.eval()
    theirs.eval()
    n, scale = ctx.bench.sample_images, ctx.bench.cfg_scale
    noise = torch.randn(n, LATENT_CHANNELS, size, size, device=ctx.device)
    classes = torch.randint(0, NUM_CLASSES, (n,), device=ctx.device)
    t = torch.full((n,), 500.0, device=ctx.device)
    guided_steps = [lambda m=m: m.forward_with_cfg(noise, t, classes, scale) for m in (ours, theirs)]
    whole_sampling = [lambda m=m: objective.sample(m, noise, classes, cfg_scale=scale, sampler="euler",
                                                   steps=ctx.bench.sample_steps) for m in (ours, theirs)]
    with torch.inference_mode():
        rows.append(ctx.side_by_side(f"DiT sampling step (CFG {scale}: one forward of 2×{n})", "images/s", n,
                                     *guided_steps))
        # Every Euler step is one guided forward, so the FLOPs of the whole are those of a step times the steps;
        # the network is warm from the steps above, and one call is sample_steps of them.
        step_flops = rows[-1].ours_flops, rows[-1].theirs_flops
        rows.append(ctx.side_by_side(
            f"DiT sampling of {n} images: flow, Euler {ctx.bench.sample_steps} steps, CFG {scale}", "images/s", n,
            *whole_sampling, flops=tuple(ctx.bench.sample_steps * f for f in step_flops), warmup=0,
            repeats=ctx.bench.sampling_repeats))
    return rows, params


# ------------------------------------------------------------------------------------------------ tokenizers
def sd_vae_config(channels: list[int]) -> dict:
    """Our VAE baseline shaped as SD-VAE (`block_out_channels` = channels): vae_sd_b's encoder, the mirrored
    decoder (num_res_blocks + 1 ResBlocks per level, attention in the middle block only) and single-head attention
    as in diffusers' AutoencoderKL."""
    layout = {"base_channels": channels[0], "channel_mult": [c // channels[0] for c in channels],
              "num_res_blocks": 2, "attention_levels": [], "head_channels": channels[-1]}
    config = group_config("tokenizer", "vae_sd_b")
    config["encoder"].update(layout)
    config["decoder"].update(layout)
    config["downsample"] = 2 ** (len(channels) - 1)
    return config


def diffusers_sd_vae(channels: list[int]) -> nn.Module:
    from diffusers import AutoencoderKL

    levels = len(channels)
    return AutoencoderKL(in_channels=3, out_channels=3, latent_channels=LATENT_CHANNELS,
                         block_out_channels=tuple(channels), layers_per_block=2,
                         down_block_types=("DownEncoderBlock2D",) * levels,
                         up_block_types=("UpDecoderBlock2D",) * levels, norm_num_groups=32)


def bench_tokenizers(ctx: Context) -> tuple[list[Row], dict]:
    from stage1_tokenizer.tokenizer import build_tokenizer

    channels = list(ctx.bench.sd_vae_channels)
    ours, theirs = build_tokenizer(sd_vae_config(channels)), diffusers_sd_vae(channels)
    params = {"ours": {"encoder": count_parameters(ours.encoder), "decoder": count_parameters(ours.decoder)},
              "theirs": {"encoder": count_parameters(theirs.encoder) + count_parameters(theirs.quant_conv),
                         "decoder": count_parameters(theirs.decoder) + count_parameters(theirs.post_quant_conv)}}
    ours, theirs = ctx.prepare(ours.eval(), True), ctx.prepare(theirs.eval(), True)
    batch, size = ctx.bench.image_batch_size, ctx.bench.image_size
    images = torch.rand(batch, 3, size, size, device=ctx.device).mul(2).sub(1)
    images = images.contiguous(memory_format=torch.channels_last)
    factor = 2 ** (len(channels) - 1)
    latents = torch.randn(batch, LATENT_CHANNELS, size // factor, size // factor, device=ctx.device)
    latents = latents.contiguous(memory_format=torch.channels_last)
    with torch.inference_mode():
        rows = [
            ctx.side_by_side(f"SD-VAE encode {size} px (ours: VAE baseline)", "images/s", batch,
                             lambda: ours.encode(images).mean, lambda: theirs.encode(images).latent_dist.mean),
            ctx.side_by_side(f"SD-VAE decode {size} px (ours: VAE baseline)", "images/s", batch,
                             lambda: ours.decode(latents), lambda: theirs.decode(latents).sample,
                             target=TARGETS["vae_decode"]),
        ]
    return rows + bench_diffusion_decoder(ctx), params


def bench_diffusion_decoder(ctx: Context) -> list[Row]:
    """ε-VAE against the VAE baseline of the same size class: the price of decoding with 1-3 network calls."""
    from stage1_tokenizer.tokenizer import build_tokenizer

    epsvae_config, vae_config = group_config("tokenizer", ctx.bench.epsvae), group_config("tokenizer", ctx.bench.vae)
    epsvae = ctx.prepare(build_tokenizer(epsvae_config).eval(), True)
    vae = ctx.prepare(build_tokenizer(vae_config).eval(), True)
    batch, size = ctx.bench.image_batch_size, ctx.bench.image_size
    factor = epsvae_config["downsample"]
    latents = torch.randn(batch, LATENT_CHANNELS, size // factor, size // factor, device=ctx.device)
    latents = latents.contiguous(memory_format=torch.channels_last)
    noise = torch.randn(batch, 3, size, size, device=ctx.device).contiguous(memory_format=torch.channels_last)
    rows = []
    with torch.inference_mode():
        for nfe in (1, 2, 3):
            rows.append(ctx.side_by_side(
                f"ε-VAE decode NFE {nfe} ({ctx.bench.epsvae} vs {ctx.bench.vae}) {size} px", "images/s", batch,
                lambda nfe=nfe: epsvae.decode(latents, nfe=nfe, noise=noise), lambda: vae.decode(latents),
                note="theirs = our VAE baseline decoder; not a target (a diffusion decoder pays per NFE)"))
    return rows


# ------------------------------------------------------------------------------------------------ data
def synthetic_latent_cache(directory: Path, num_images: int, latent_size: int) -> None:
    """A one-split cache of random latents in the format of stage=cache."""
    from shared.data.latents import write_manifest, write_shard

    rng = np.random.default_rng(0)
    split_dir = directory / "train"
    split_dir.mkdir(parents=True)
    shape = (num_images, 2, LATENT_CHANNELS, latent_size, latent_size)
    fingerprint = {"tokenizer": "bench", "data": "synthetic"}
    write_shard(split_dir, 0, mean=rng.standard_normal(shape, dtype=np.float32),
                std=np.full(shape, 0.1, dtype=np.float32), label=rng.integers(0, NUM_CLASSES, num_images),
                index=np.arange(num_images), skipped=0, fingerprint=fingerprint)
    write_manifest(split_dir, 1, {"fingerprint": fingerprint, "split": "train", "dtype": "float32",
                                  "shard_size": num_images, "num_classes": NUM_CLASSES})


def image_data_config(image_size: int) -> tuple[dict, str]:
    """Imagenette as an image folder when it is beside the checkout, else the synthetic set; and its name."""
    imagenette = ROOT.parent / "shared" / "data" / "imagenette2-224"
    workers = os.cpu_count() or 1
    if (imagenette / "train").is_dir():
        config = {"kind": "imagefolder", "root": str(imagenette), "resolution": image_size, "train_split": "train",
                  "val_split": "val", "class_map": None, "num_classes": None, "random_flip": True,
                  "num_workers": workers}
        return config, f"Imagenette JPEGs, {workers} workers"
    config = {"kind": "synthetic", "resolution": image_size, "num_classes": 10, "train_size": 2048,
              "val_size": 256, "seed": 0, "random_flip": True, "num_workers": workers}
    return config, f"synthetic images, {workers} workers"


def images_per_second(loader, key: str, num_images: int, warmup_batches: int) -> float:
    """Draw `warmup_batches` untimed (worker start-up), then time enough batches for `num_images` items."""
    batches = iter(loader)
    for _ in range(warmup_batches):
        next(batches)
    start, seen = time.perf_counter(), 0
    while seen < num_images:
        seen += len(next(batches)[key])
    return seen / (time.perf_counter() - start)


def bench_loaders(ctx: Context) -> list[Row]:
    from shared.data.images import make_image_loader
    from shared.data.latents import make_latent_loader

    batch, num_images, size = ctx.bench.loader_batch_size, ctx.bench.loader_images, ctx.bench.image_size
    latent_size = size // 8
    data_config, source = image_data_config(size)
    with tempfile.TemporaryDirectory() as cache_dir:
        synthetic_latent_cache(Path(cache_dir), max(num_images, batch), latent_size)
        latent_loader = make_latent_loader(cache_dir, "train", batch)
        latent_rate = images_per_second(latent_loader, "mean", num_images, warmup_batches=1)
    image_loader = make_image_loader(data_config, "train", batch, train=True)
    image_rate = images_per_second(image_loader, "image", num_images, warmup_batches=2)
    return [Row(f"Loader: cached latents 4×{latent_size}² vs images {size} px", "images/s", latent_rate, image_rate,
                target=TARGETS["latent_loader"], note=f"theirs = our image loader ({source})")]


# ------------------------------------------------------------------------------------------------ FID features
def torch_fidelity_inception(ours: nn.Module, directory: Path) -> nn.Module:
    """torch-fidelity's InceptionV3 loaded with the offline TorchScript weights of `ours`, renamed conv by conv:
    TF's batch norm has no scale (→ ones); the 1008-class head is absent (→ zeros, unused by pool features)."""
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    empty = directory / "empty.pth"
    torch.save({}, empty)
    # A skeleton only to read torch-fidelity's parameter names, in the same order as the TorchScript convs.
    with mock.patch.object(FeatureExtractorInceptionV3, "load_state_dict"):
        names = FeatureExtractorInceptionV3("names", ["2048"], feature_extractor_weights_path=str(empty)).state_dict()
    source = ours.net.state_dict()
    source_convs = [key.removesuffix(".weight") for key in source if key.endswith(".weight")]
    target_convs = [key.removesuffix(".conv.weight") for key in names if key.endswith(".conv.weight")]
    converted = {"fc.weight": torch.zeros_like(names["fc.weight"]), "fc.bias": torch.zeros_like(names["fc.bias"])}
    for ts_name, tf_name in zip(source_convs, target_convs, strict=True):
        beta = source[f"{ts_name}.beta"]
        converted |= {f"{tf_name}.conv.weight": source[f"{ts_name}.weight"], f"{tf_name}.bn.weight": torch.ones_like(beta),
                      f"{tf_name}.bn.bias": beta, f"{tf_name}.bn.running_mean": source[f"{ts_name}.mean"],
                      f"{tf_name}.bn.running_var": source[f"{ts_name}.var"],
                      f"{tf_name}.bn.num_batches_tracked": torch.tensor(0)}
    weights = directory / "inception-2015-12-05.pth"
    torch.save(converted, weights)
    return FeatureExtractorInceptionV3("bench", ["2048"], feature_extractor_weights_path=str(weights))


def bench_fid_features(ctx: Context) -> list[Row]:
    from shared.metrics.inception import load_inception

    ours = load_inception(ctx.device)
    with tempfile.TemporaryDirectory() as directory:
        theirs = torch_fidelity_inception(ours, Path(directory)).to(ctx.device)
    size, n = ctx.bench.image_size, ctx.bench.fid_images
    images = torch.randint(0, 256, (n, 3, size, size), dtype=torch.uint8, device=ctx.device)
    with torch.inference_mode():
        return [ctx.side_by_side(f"FID Inception features, {size} px → 299", "images/s", n, lambda: ours(images),
                                 lambda: theirs(images), note="theirs = torch-fidelity FeatureExtractorInceptionV3")]


# ------------------------------------------------------------------------------------------------ report
def machine(runtime: Runtime) -> dict:
    return describe(runtime.device, str(runtime.autocast_dtype or "fp32"))


def command_line() -> str:
    return " ".join(shlex.quote(arg) for arg in [".venv/bin/python", "pipelines/run.py", *sys.argv[1:]])


def fraction(value: float | None) -> str:
    return "–" if value is None else f"{100 * value:.1f}%"


def markdown(report: dict) -> str:
    m, limit = report["machine"], report["limit"]
    lines = [
        "# Speed benchmark: ours vs what users would pick instead",
        "",
        f"- Command: `{report['command']}`",
        f"- Date: {report['date']}; total {report['seconds']:.0f} s in one process",
        f"- Machine: {m['cpu']}, {m['cores']} cores, torch {m['torch']} with {m['threads']} threads, device "
        f"{m['device']}{', ' + m['gpu'] if 'gpu' in m else ''}, precision {m['precision']}; load average "
        f"{m['load_average_1min']:.1f} at the end (other processes compete for the cores when it exceeds them)",
        f"- Measured limit ({limit['dtype']}): {limit['flops_per_second'] / 1e9:.1f} GFLOP/s, the better of a "
        f"{limit['matmul']['size']}² matmul ({limit['matmul']['flops_per_second'] / 1e9:.1f} GFLOP/s) and a "
        f"channels-last 3×3 convolution, {limit['conv3x3']['channels']} channels at {limit['conv3x3']['size']}² "
        f"({limit['conv3x3']['flops_per_second'] / 1e9:.1f} GFLOP/s)",
        f"- Settings: {report['settings']}",
        f"- DiT parameters: ours {report['params']['dit']['ours']:,}, diffusers {report['params']['dit']['theirs']:,}; "
        f"SD-VAE parameters: ours {report['params']['sd_vae']['ours']}, diffusers {report['params']['sd_vae']['theirs']}",
        "",
        "| benchmark | unit | ours | theirs | ours / theirs | target | ours % of limit | theirs % | note |",
        "|---|---|---:|---:|---:|---:|---:|---:|---|",
    ]
    for row in report["rows"]:
        target = "" if row["target"] is None else f"≥ {row['target']:g}" + (" **missed**" if row["missed"] else "")
        lines.append(f"| {row['name']} | {row['unit']} | {row['ours']:.4g} | {row['theirs']:.4g} | {row['ratio']:.2f} "
                     f"| {target} | {fraction(row['ours_flops_fraction'])} | {fraction(row['theirs_flops_fraction'])} "
                     f"| {row['note']} |")
    return "\n".join(lines) + "\n"


def write_report(report: dict, stem: Path, render: Callable[[dict], str] = markdown) -> None:
    """<stem>.json (the report) and <stem>.md (`render` of it)."""
    stem.parent.mkdir(parents=True, exist_ok=True)
    stem.with_suffix(".json").write_text(json.dumps(report, indent=1) + "\n")
    stem.with_suffix(".md").write_text(render(report))


def bench_settings(cfg: DictConfig) -> DictConfig:
    """cfg.bench with the DiT shape of cfg.ldm, or the tiny QUICK settings with bench.quick."""
    dit_shape = {key: cfg.ldm[key] for key in ("depth", "hidden_size", "num_heads", "patch_size")}
    settings = OmegaConf.merge(OmegaConf.to_container(cfg.bench, resolve=True), {"dit": dit_shape})
    return OmegaConf.merge(settings, QUICK) if settings.quick else settings


def main(cfg: DictConfig) -> dict:
    started = time.perf_counter()
    with setup(cfg) as runtime:
        bench = bench_settings(cfg)
        torch.manual_seed(cfg.seed)
        dtype = runtime.autocast_dtype or torch.float32
        limit = measured_limits(runtime.device, dtype, bench)
        runtime.log.info("limit %s: matmul %.1f GFLOP/s, 3×3 conv %.1f GFLOP/s", dtype,
                         limit["matmul"]["flops_per_second"] / 1e9, limit["conv3x3"]["flops_per_second"] / 1e9)
        ctx = Context(bench, runtime, limit["flops_per_second"])

        dit_rows, dit_params = bench_dit(ctx)
        tokenizer_rows, vae_params = bench_tokenizers(ctx)
        rows = dit_rows + tokenizer_rows + bench_loaders(ctx) + bench_fid_features(ctx)
        report = {
            "command": command_line(),
            "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
            "machine": machine(runtime),
            "settings": OmegaConf.to_container(bench, resolve=True),
            "limit": limit,
            "params": {"dit": dit_params, "sd_vae": vae_params},
            "rows": [asdict(row) | {"missed": row.missed} for row in rows],
            "seconds": time.perf_counter() - started,
        }
        write_report(report, runtime.run_dir / "bench")
        if bench.out:
            write_report(report, ROOT / bench.out)
        print(markdown(report))
        print(json.dumps(report))
        runtime.mark_done()
    return report
