"""What every stage sets up before its first step: device, precision, process group, run folder, log, metrics.

Device and precision come from config (`device=auto|cpu|cuda[:N]`, `precision=auto|fp32|bf16`) so the same code
runs on a laptop CPU and on GPU nodes; nothing else in the project picks a device.
"""
from __future__ import annotations

import contextlib
import datetime
import json
import logging
import os
import random
import socket
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from omegaconf import DictConfig, OmegaConf, open_dict

from shared.config_check import check_config
from shared.errors import ConfigError
from shared.files import write_atomically

# The contract of every stage that writes a run folder: it ends with Runtime.finish(result), which writes the result
# (JSON: the numbers and output paths later steps read, and the inputs it was given) and then the marker.
RESULT_FILE = "result.json"
DONE_FILE = "DONE"

# Keys that change how a run is shown, stored or laid out in memory, not what it computes: a rerun that differs
# only in these resumes the same run. `import`, `export`, `paper_speed` and `reproduce` configure only stages that
# never resume, and no other stage reads them: runs and pipeline folders made before they existed still match.
NON_SEMANTIC_KEYS = ("name", "progress", "wandb", "output_root", "channels_last", "import", "export", "paper_speed",
                     "reproduce")


def resolve_device(spec: str) -> torch.device:
    if spec == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        return torch.device("cpu")
    device = torch.device(spec)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device={spec} was asked for but CUDA is not available on this machine; use device=cpu")
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    return device


def resolve_precision(spec: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype, or None for plain fp32."""
    if spec == "auto":
        return torch.bfloat16 if device.type == "cuda" else None
    if spec == "fp32":
        return None
    if spec == "bf16":
        return torch.bfloat16
    raise ConfigError(f"precision={spec!r} is not one of auto, fp32, bf16")


def seed_everything(seed: int) -> None:
    """Seed Python's, numpy's and torch's global generators (torch's default seed differs in every process)."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work, so that wall-clock timings measure it (a no-op on the CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_process_group(launcher: DictConfig, device: torch.device) -> None:
    """Join the process group that torchrun / the deepspeed launcher describe in the environment.

    A single process started by hand gets a one-member group on localhost, so `launcher=ddp|deepspeed` also runs
    (and is tested) without a launcher.
    """
    if dist.is_initialized():
        return
    for key, default in (("RANK", "0"), ("LOCAL_RANK", "0"), ("WORLD_SIZE", "1"), ("MASTER_ADDR", "127.0.0.1")):
        os.environ.setdefault(key, default)
    os.environ.setdefault("MASTER_PORT", str(_free_port()))
    backend = launcher.get("backend", "auto")
    if backend == "auto":
        backend = "nccl" if device.type == "cuda" else "gloo"
    if launcher.kind == "deepspeed":
        import deepspeed

        deepspeed.init_distributed(dist_backend=backend)
    else:
        dist.init_process_group(backend=backend, device_id=device if device.type == "cuda" else None)


def finished_result(run_dir: str | Path) -> dict | None:
    """The result of the stage that finished in `run_dir`, or None where none has (no marker, or a marker from
    before stages wrote result files: such a stage runs again, resuming from what it left)."""
    run_dir = Path(run_dir)
    if not (run_dir / DONE_FILE).is_file() or not (run_dir / RESULT_FILE).is_file():
        return None
    return json.loads((run_dir / RESULT_FILE).read_text())


def config_fingerprint(cfg: DictConfig) -> dict:
    resolved = OmegaConf.to_container(cfg, resolve=True)
    for key in NON_SEMANTIC_KEYS:
        resolved.pop(key, None)
    return resolved


def find_resumable_run(stage_dir: Path, cfg: DictConfig) -> Path | None:
    """The newest unfinished run in `stage_dir` whose config equals `cfg` up to NON_SEMANTIC_KEYS.

    Each run is compared with `cfg` given that run's name, since paths such as cache.dir derive from ${name}.
    """
    if not stage_dir.is_dir():
        return None
    candidates = sorted((p for p in stage_dir.iterdir() if (p / "config.yaml").is_file()), key=lambda p: p.stat().st_mtime)
    for run in reversed(candidates):
        if (run / DONE_FILE).exists():
            continue
        try:
            previous = OmegaConf.load(run / "config.yaml")
        except Exception:  # an unreadable config is simply not a match
            continue
        as_named = cfg.copy()
        with open_dict(as_named):
            as_named.name = previous.get("name")
        if config_fingerprint(previous) == config_fingerprint(as_named):
            return run
    return None


@dataclass
class Runtime:
    cfg: DictConfig
    device: torch.device
    autocast_dtype: torch.dtype | None
    run_dir: Path
    rank: int = 0
    world_size: int = 1
    log: logging.Logger = field(default_factory=lambda: logging.getLogger("epsvae"))
    _wandb_run: object = None

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return dist.is_initialized()

    def autocast(self):
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.autocast_dtype)

    def log_metrics(self, step: int, values: dict) -> None:
        """One JSON line in metrics.jsonl (and a wandb row), main process only."""
        if not self.is_main:
            return
        row = {"step": step, "time": round(time.time(), 3), **values}
        with open(self.run_dir / "metrics.jsonl", "a") as f:
            f.write(json.dumps(row) + "\n")
        if self._wandb_run is not None:
            self._wandb_run.log(values, step=step)

    def forget_metrics_after(self, step: int) -> None:
        """Drop metrics.jsonl rows of steps after `step`: a run resumed from the checkpoint of `step` logs those
        steps again, and the file should read like the uninterrupted run's."""
        path = self.run_dir / "metrics.jsonl"
        if not self.is_main or not path.is_file():
            return
        lines = path.read_text().splitlines(keepends=True)
        kept = [line for line in lines if _logged_step(line) <= step]
        if len(kept) != len(lines):
            write_atomically(path, "".join(kept))

    def save_config(self) -> None:
        """Record the config in the run folder: once the run is accepted (a new folder, a resume whose checkpoint
        matches, a finished stage), so that a rejected rerun leaves the folder describing what is in it."""
        if self.is_main:
            write_atomically(self.run_dir / "config.yaml", OmegaConf.to_yaml(self.cfg, resolve=True))

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()

    def finish(self, result: dict) -> dict:
        """End the stage (the one contract every stage keeps): its result file, its config, then the completion
        marker, written last so that a folder with the marker always holds the whole result. Returns `result`."""
        if self.is_main:
            write_atomically(self.run_dir / RESULT_FILE, json.dumps(result, indent=2) + "\n")
            self.save_config()
            write_atomically(self.run_dir / DONE_FILE, datetime.datetime.now().isoformat() + "\n")
        return result

    def __enter__(self) -> Runtime:
        return self

    def __exit__(self, *exc_info) -> None:  # on errors too: the log file and wandb run are closed either way
        self.close()

    def close(self) -> None:
        if self._wandb_run is not None:
            self._wandb_run.finish()
            self._wandb_run = None
        for handler in list(self.log.handlers):
            if isinstance(handler, logging.FileHandler):
                handler.close()
                self.log.removeHandler(handler)


def _logged_step(line: str) -> float:
    """The step of one metrics.jsonl row; a damaged row (a crash mid-write) counts as the latest."""
    try:
        return json.loads(line)["step"]
    except (ValueError, KeyError, TypeError):
        return float("inf")


def _setup_logging(run_dir: Path, is_main: bool) -> logging.Logger:
    log = logging.getLogger("epsvae")
    log.setLevel(logging.INFO)
    log.propagate = False
    for handler in list(log.handlers):
        handler.close()
        log.removeHandler(handler)
    formatter = logging.Formatter("%(asctime)s %(levelname)s %(message)s", "%Y-%m-%d %H:%M:%S")
    console = logging.StreamHandler(sys.stderr)
    console.setFormatter(formatter)
    console.setLevel(logging.INFO if is_main else logging.WARNING)
    log.addHandler(console)
    if is_main:
        file = logging.FileHandler(run_dir / "log.txt")
        file.setFormatter(formatter)
        log.addHandler(file)
    return log


def _check_writable(run_dir: Path) -> None:
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        probe = run_dir / ".write-test"
        probe.write_text("ok")
        probe.unlink()
    except OSError as error:
        raise ConfigError(f"the output folder {run_dir} is not writable ({error.strerror}): set output_root=... "
                          f"to a folder you can write to") from error


def setup(cfg: DictConfig, run_dir: str | Path | None = None, resume: bool = False) -> Runtime:
    """Device, precision, process group and run folder for one stage.

    run_dir: where this stage writes; default ${output_root}/${stage}/${name}. With `resume`, a run given a name=
    goes to (and continues) that folder; a run left with the default name (the date and time, new on every
    invocation) continues the newest unfinished run of the same config, so rerunning a training command continues it.
    """
    check_config(cfg)
    if cfg.launcher.kind != "deepspeed" and cfg.launcher.get("config"):
        raise ConfigError(f"launcher.config={cfg.launcher.config} is a DeepSpeed option but launcher="
                          f"{cfg.launcher.kind}; use launcher=deepspeed or drop launcher.config")
    device = resolve_device(cfg.device)
    autocast_dtype = resolve_precision(cfg.precision, device)
    if cfg.launcher.kind in ("ddp", "deepspeed"):
        init_process_group(cfg.launcher, device)
    elif int(os.environ.get("WORLD_SIZE", 1)) > 1:
        raise ConfigError("Several processes were launched but launcher=local; use launcher=ddp or launcher=deepspeed")
    rank = dist.get_rank() if dist.is_initialized() else 0
    world_size = dist.get_world_size() if dist.is_initialized() else 1
    if device.type == "cuda":
        torch.cuda.set_device(device)

    if rank == 0:
        if run_dir is None:
            stage_dir = Path(cfg.output_root) / cfg.stage
            named = stage_dir / str(cfg.name)
            if resume and OmegaConf.is_interpolation(cfg, "name"):  # the default ${now:...}, not a chosen name
                run_dir = find_resumable_run(stage_dir, cfg) or named
            else:
                run_dir = named
        run_dir = Path(run_dir)
        _check_writable(run_dir)
        new_run = not (run_dir / "config.yaml").is_file()
    if dist.is_initialized():  # every rank writes to the folder rank 0 chose (its clock may differ by a second)
        shared = [str(run_dir) if rank == 0 else None]
        dist.broadcast_object_list(shared, src=0)
        run_dir = Path(shared[0])

    # Stages build their networks right after setup: the same seed on every rank and in every run makes the initial
    # weights a function of the config, so two runs of one command compute the same thing.
    seed_everything(cfg.seed)
    log = _setup_logging(run_dir, rank == 0)
    runtime = Runtime(cfg=cfg, device=device, autocast_dtype=autocast_dtype, run_dir=run_dir, rank=rank,
                      world_size=world_size, log=log)
    if rank == 0 and new_run:
        runtime.save_config()  # an existing folder keeps its config until the stage accepts this one
    log.info("stage=%s run_dir=%s device=%s precision=%s world_size=%d", cfg.stage, run_dir, device,
             autocast_dtype or "fp32", world_size)
    if rank == 0 and cfg.wandb.mode != "disabled":
        runtime._wandb_run = _start_wandb(cfg, run_dir)
    return runtime


def _start_wandb(cfg: DictConfig, run_dir: Path):
    os.environ.setdefault("WANDB_MODE", cfg.wandb.mode)
    os.environ.setdefault("WANDB_SILENT", "true")
    try:
        import wandb
    except ImportError:
        return None
    return wandb.init(project=cfg.wandb.project, name=f"{cfg.stage}/{run_dir.name}", dir=str(run_dir),
                      mode=cfg.wandb.mode, config=OmegaConf.to_container(cfg, resolve=True), reinit="finish_previous")
