"""What every stage sets up before its first step: device, precision, process group, run folder, log, metrics.

Device and precision come from config (`device=auto|cpu|cuda[:N]`, `precision=auto|fp32|bf16|fp16`, `tf32`) so the
same code runs on a laptop CPU and on GPU nodes; nothing else in the project picks a device.
"""
from __future__ import annotations

import atexit
import contextlib
import datetime
import errno
import fcntl
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
from shared.errors import ConfigError, DataError
from shared.files import write_atomically

# The contract of every stage that writes a run folder: it ends with Runtime.finish(result), which writes the result
# (JSON: the numbers and output paths later steps read, and the inputs it was given) and then the marker.
RESULT_FILE = "result.json"
DONE_FILE = "DONE"
CONFIG_FILE = "config.yaml"
# A run continued with other settings (resume_changed=true) keeps the settings of its earlier steps here: one JSON
# line per change, {"until_step", "time", "changed": {key: [old, new]}, "config": the settings of those steps}.
SETTINGS_HISTORY = "settings_history.jsonl"
# Locked by the process using a run folder, and naming it; the kernel releases the lock when that process ends.
LOCK_FILE = ".lock"
# The id of the run folder's wandb run, written when the folder first opens wandb: a resumed run logs into the same
# wandb run instead of a new one.
WANDB_RUN_ID_FILE = "wandb_run_id"
# logger=tensorboard writes its event files here, in the run folder.
TENSORBOARD_DIR = "tensorboard"
# Where log_metrics sends each metrics.jsonl row as well (`logger=`); wandb.mode further chooses how wandb logs.
LOGGERS = ("wandb", "tensorboard", "none")

# Keys (dotted) that change how a run is shown, stored, laid out in memory or split into micro-steps, or what is run
# next, not what it computes: a rerun that differs only in these resumes the same run. `import`, `export`,
# `paper_speed` and `reproduce` configure only stages that never resume, and no other stage reads them: runs and
# pipeline folders made before they existed still match. `pipeline.steps` chooses which steps run, not what any of
# them computes; the data order does not depend on the loader's workers.
NON_SEMANTIC_KEYS = ("name", "progress", "logger", "wandb", "output_root", "channels_last", "import", "export",
                     "paper_speed", "reproduce", "pipeline.steps", "resume_changed", "data.num_workers",
                     "tokenizer.train.grad_accum", "ldm.train.grad_accum", "tokenizer.train.activation_checkpointing",
                     "ldm.train.activation_checkpointing", "tokenizer.train.keep_steps", "ldm.train.keep_steps")


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
    """The autocast dtype, or None for plain fp32. fp16 (for GPUs without bf16) trains with a gradient scaler
    (shared/train/backends.py)."""
    if spec == "auto":
        return torch.bfloat16 if device.type == "cuda" else None
    if spec == "fp32":
        return None
    if spec == "bf16":
        return torch.bfloat16
    if spec == "fp16":
        return torch.float16
    raise ConfigError(f"precision={spec!r} is not one of auto, fp32, bf16, fp16")


def set_tf32(enabled: bool, device: torch.device) -> None:
    """On CUDA, fp32 matrix products and convolutions on TF32 tensor cores (10-bit mantissa inputs, fp32
    accumulation) or not. Both, so that `precision=fp32 tf32=false` computes in fp32 as on the CPU: torch's own
    default leaves cuDNN's convolutions on TF32 while matmuls are off."""
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = bool(enabled)
        torch.backends.cudnn.allow_tf32 = bool(enabled)


def seed_everything(seed: int) -> None:
    """Seed Python's, numpy's and torch's global generators (torch's default seed differs in every process)."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work, so that wall-clock timings measure it (a no-op on the CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def init_process_group(launcher: DictConfig, device: torch.device) -> None:
    """Join the process group that torchrun / the deepspeed launcher describe in the environment.

    A single process started by hand gets a one-member group, so `launcher=ddp|deepspeed` also runs (and is tested)
    without a launcher.
    """
    if dist.is_initialized():
        return
    launched = "MASTER_ADDR" in os.environ  # torchrun and the deepspeed launcher set it for every rank
    backend = launcher.get("backend", "auto")
    if backend == "auto":
        backend = "nccl" if device.type == "cuda" else "gloo"
    # How long a collective waits for the other processes before the job ends with an error: long enough for a rank
    # that has nothing left to do to wait at a barrier while the others work (launcher.timeout_minutes).
    timeout = datetime.timedelta(minutes=launcher.timeout_minutes)
    device_id = device if device.type == "cuda" else None
    if not launched:
        # One member needs no rendezvous: an in-memory store, no port. (A free port found and released could be
        # taken by another process before the group listened on it: EADDRINUSE beside other jobs.)
        for key in ("RANK", "LOCAL_RANK"):
            os.environ.setdefault(key, "0")
        os.environ.setdefault("WORLD_SIZE", "1")
        dist.init_process_group(backend=backend, store=dist.HashStore(), rank=0, world_size=1, device_id=device_id,
                                timeout=timeout)
    if launcher.kind == "deepspeed":
        import deepspeed

        deepspeed.init_distributed(dist_backend=backend, timeout=timeout)  # the group above, or the launcher's
    elif launched:
        dist.init_process_group(backend=backend, device_id=device_id, timeout=timeout)
    # Leave the group while the interpreter is still whole: a process that exits with it alive can abort in Gloo's
    # teardown ("terminate called without an active exception", SIGABRT), and torchrun then kills the other ranks.
    atexit.register(_leave_process_group)


def _leave_process_group() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def finished_result(run_dir: str | Path) -> dict | None:
    """The result of the stage that finished in `run_dir`, or None where none has (no marker, or a marker from
    before stages wrote result files: such a stage runs again, resuming from what it left)."""
    run_dir = Path(run_dir)
    if not (run_dir / DONE_FILE).is_file() or not (run_dir / RESULT_FILE).is_file():
        return None
    return json.loads((run_dir / RESULT_FILE).read_text())


def config_fingerprint(cfg: DictConfig) -> dict:
    """What a run's results depend on: its resolved config without NON_SEMANTIC_KEYS."""
    resolved = OmegaConf.to_container(cfg, resolve=True)
    for key in NON_SEMANTIC_KEYS:
        *parents, leaf = key.split(".")
        node = resolved
        for parent in parents:
            node = node.get(parent) if isinstance(node, dict) else None
        if isinstance(node, dict):
            node.pop(leaf, None)
    return resolved


def config_differences(old, new, prefix: str = "") -> list[tuple[str, object, object]]:
    """(dotted key, old value, new value) of every setting that differs between a recorded fingerprint `old` and
    `new`. A key the record lacks was added to the configs after the record was made: its default keeps the
    behaviour from before it existed (the rule for every new key), so it is no difference."""
    if isinstance(old, dict) and isinstance(new, dict):
        return [difference for key in sorted(old, key=str)
                for difference in config_differences(old[key], new.get(key), f"{prefix}{key}.")]
    return [] if old == new else [(prefix[:-1], old, new)]


def describe_differences(differences: list[tuple[str, object, object]], shown: int = 5) -> str:
    """'key: old -> new; ...' of the first `shown` differences, for a one-line message."""
    described = "; ".join(f"{key}: {old!r} -> {new!r}" for key, old, new in differences[:shown])
    return described + ("; ..." if len(differences) > shown else "")


def changed_settings(recorded: DictConfig, cfg: DictConfig) -> list[tuple[str, object, object]]:
    """The settings of `cfg` that differ from a run folder's recorded config, `cfg` taken under the recorded name
    (paths such as cache.dir derive from ${name}, and a default name is new on every invocation)."""
    as_named = cfg.copy()
    with open_dict(as_named):
        as_named.name = recorded.get("name")
    return config_differences(config_fingerprint(recorded), config_fingerprint(as_named))


def find_resumable_run(stage_dir: Path, cfg: DictConfig) -> Path | None:
    """The newest unfinished run in `stage_dir` whose recorded settings `cfg` keeps (config_differences)."""
    if not stage_dir.is_dir():
        return None
    candidates = sorted((p for p in stage_dir.iterdir() if (p / CONFIG_FILE).is_file()),
                        key=lambda p: p.stat().st_mtime)
    for run in reversed(candidates):
        if (run / DONE_FILE).exists():
            continue
        try:
            previous = OmegaConf.load(run / CONFIG_FILE)
        except Exception:  # an unreadable config is simply not a match
            continue
        if not changed_settings(previous, cfg):
            return run
    return None


def check_writable_folder(folder: Path, setting: str) -> None:
    """Create `folder` if needed and make sure files can be written in it; otherwise one ConfigError saying to set
    `setting` (the key the folder comes from) to another folder."""
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise ConfigError(f"{folder} is a file, not a folder: set {setting}=... to a folder you can write to")
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / ".write-test"
        probe.write_text("ok")
        probe.unlink()
    except OSError as error:
        raise ConfigError(f"the folder {folder} is not writable ({error.strerror}): set {setting}=... to a folder you "
                          f"can write to") from error


# The run folders this process has locked, and the lock file's descriptor of each. A POSIX lock belongs to the
# process, and closing any descriptor of its file releases it: so the file is opened once per process, and a second
# runtime on the same folder in this process (a test, a stage inside another) shares the first one's lock.
_LOCKED: dict[Path, int] = {}


def lock_run_folder(run_dir: Path) -> Path | None:
    """Lock `run_dir` for this process: the key of the lock, to release when done (`release_run_folder`), or None
    where this process holds the lock already. A lock held by another process is one ConfigError naming it.
    The lock is a POSIX record lock: the kernel drops it when its process ends, however it ends (a killed run's is
    taken over by the next), and a forked child (a data loader worker) never holds it."""
    key = run_dir.resolve()
    if key in _LOCKED:
        return None
    descriptor = os.open(run_dir / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.lockf(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as error:
        holder = os.pread(descriptor, 256, 0).decode(errors="replace").strip() or "unknown"
        os.close(descriptor)
        if error.errno not in (errno.EACCES, errno.EAGAIN):
            raise ConfigError(f"cannot lock {run_dir / LOCK_FILE} ({error.strerror}): set output_root=... to a file "
                              f"system with file locks") from None
        raise ConfigError(f"{run_dir} is in use by another process (PID {holder}): wait for it to end or stop it, "
                          f"or choose another name=...") from None
    os.ftruncate(descriptor, 0)
    os.pwrite(descriptor, f"{os.getpid()} on {socket.gethostname()}".encode(), 0)
    _LOCKED[key] = descriptor
    return key


def release_run_folder(key: Path | None) -> None:
    """Release a lock `lock_run_folder` took (closing its descriptor drops it); None: nothing to release."""
    if key is not None:
        os.close(_LOCKED.pop(key))


@dataclass
class SupersededSettings:
    """The recorded settings of a run folder that a rerun with resume_changed=true continues with others."""

    config: dict
    differences: list[tuple[str, object, object]]


def _read_recorded_config(run_dir: Path) -> DictConfig:
    try:
        return OmegaConf.load(run_dir / CONFIG_FILE)
    except Exception as error:  # YAML and OmegaConf raise several types
        raise DataError(f"{run_dir / CONFIG_FILE} cannot be read ({type(error).__name__}), so this rerun cannot be "
                          f"checked against the settings the run was made with: restore it, or choose a new "
                          f"name=...") from None


def _check_run_folder(run_dir: Path, cfg: DictConfig, resume: bool, fresh: bool) -> SupersededSettings | None:
    """Refuse what would make the record of `run_dir` untrue; the settings it replaces where resume_changed=true.

    fresh: the stage writes a whole new folder (import, export), so an existing one is refused rather than mixed.
    resume: the stage continues the steps recorded in the folder, which must have run with the settings asked for
    now, or be continued with others explicitly (resume_changed=true) and the change recorded.
    """
    if fresh and any(entry.name != LOCK_FILE for entry in run_dir.iterdir()):
        raise ConfigError(f"{run_dir} holds the output of an earlier stage={cfg.stage}: choose another name=..., or "
                          f"delete that folder to write it again")
    if not resume or not (run_dir / CONFIG_FILE).is_file():
        return None
    recorded = _read_recorded_config(run_dir)
    differences = changed_settings(recorded, cfg)
    if not differences:
        return None
    if not cfg.resume_changed:
        raise ConfigError(f"{run_dir} ran with other settings ({describe_differences(differences)}): rerun with its "
                          f"settings, choose a new name=..., or add resume_changed=true to continue it with these "
                          f"(its earlier settings are kept in {SETTINGS_HISTORY})")
    return SupersededSettings(OmegaConf.to_container(recorded, resolve=True), differences)


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
    _tensorboard: object = None  # torch.utils.tensorboard.SummaryWriter with logger=tensorboard
    _lock: Path | None = None
    _superseded: SupersededSettings | None = None

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
        """One JSON line in metrics.jsonl (and a wandb row, or TensorBoard scalars), main process only."""
        if not self.is_main:
            return
        row = {"step": step, "time": round(time.time(), 3), **values}
        with open(self.run_dir / "metrics.jsonl", "a") as f:
            f.write(json.dumps(row) + "\n")
        if self._wandb_run is not None:
            self._wandb_run.log(values, step=step)
        if self._tensorboard is not None:
            for key, value in values.items():
                if isinstance(value, (int, float)):
                    self._tensorboard.add_scalar(key, value, step)
            self._tensorboard.flush()  # written at once, as metrics.jsonl is: a killed run loses no row

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
            if self._tensorboard is not None:  # TensorBoard hides the earlier events of steps from purge_step on
                self._tensorboard.close()
                self._tensorboard = _start_tensorboard(self.run_dir, purge_step=step + 1)

    def save_config(self, step: int | None = None) -> None:
        """Record the config in the run folder: once the run is accepted (a new folder, a resume whose checkpoint
        matches, a finished stage), so that a rejected rerun leaves the folder describing what is in it.

        A run continued with other settings (resume_changed=true) is accepted at `step`, the step it resumes from:
        the settings of the steps up to it go to the settings history first, and the run is unfinished again.
        """
        if not self.is_main:
            return
        if self._superseded is not None:
            self._record_superseded(step)
        write_atomically(self.run_dir / CONFIG_FILE, OmegaConf.to_yaml(self.cfg, resolve=True))

    def _record_superseded(self, step: int | None) -> None:
        superseded, self._superseded = self._superseded, None
        entry = {"until_step": step, "time": datetime.datetime.now().isoformat(timespec="seconds"),
                 "changed": {key: [old, new] for key, old, new in superseded.differences},
                 "config": superseded.config}
        path = self.run_dir / SETTINGS_HISTORY
        earlier = path.read_text() if path.is_file() else ""
        write_atomically(path, earlier + json.dumps(entry) + "\n")
        (self.run_dir / DONE_FILE).unlink(missing_ok=True)
        self.log.info("continuing with changed settings from step %s (%s); the earlier ones are in %s", step,
                      describe_differences(superseded.differences), path)

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

    def __exit__(self, *exc_info) -> None:  # on errors too: the log file and loggers are closed either way
        self.close()

    def close(self) -> None:
        release_run_folder(self._lock)
        self._lock = None
        if self._wandb_run is not None:
            self._wandb_run.finish()
            self._wandb_run = None
        if self._tensorboard is not None:
            self._tensorboard.close()
            self._tensorboard = None
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


def setup(cfg: DictConfig, run_dir: str | Path | None = None, resume: bool = False, fresh: bool = False) -> Runtime:
    """Device, precision, process group and run folder for one stage.

    run_dir: where this stage writes; default ${output_root}/${stage}/${name}. With `resume`, a run given a name=
    goes to (and continues) that folder, if it ran with the same settings (or resume_changed=true); a run left with
    the default name (the date and time, new on every invocation) continues the newest unfinished run of the same
    settings, so rerunning a training command continues it. With `fresh`, the folder must not exist yet. The
    folder is locked against other processes until the runtime closes.
    """
    check_config(cfg)
    if cfg.logger not in LOGGERS:
        raise ConfigError(f"logger={cfg.logger!r} is not one of {', '.join(LOGGERS)}")
    if cfg.launcher.kind != "deepspeed" and cfg.launcher.get("config"):
        raise ConfigError(f"launcher.config={cfg.launcher.config} is a DeepSpeed option but launcher="
                          f"{cfg.launcher.kind}; use launcher=deepspeed or drop launcher.config")
    device = resolve_device(cfg.device)
    autocast_dtype = resolve_precision(cfg.precision, device)
    set_tf32(cfg.tf32, device)
    if cfg.launcher.kind in ("ddp", "deepspeed"):
        init_process_group(cfg.launcher, device)
    elif int(os.environ.get("WORLD_SIZE", 1)) > 1:
        raise ConfigError("Several processes were launched but launcher=local; use launcher=ddp or launcher=deepspeed")
    rank = dist.get_rank() if dist.is_initialized() else 0
    world_size = dist.get_world_size() if dist.is_initialized() else 1
    if device.type == "cuda":
        torch.cuda.set_device(device)

    lock, superseded = None, None
    if rank == 0:
        if run_dir is None:
            stage_dir = Path(cfg.output_root) / cfg.stage
            named = stage_dir / str(cfg.name)
            if resume and OmegaConf.is_interpolation(cfg, "name"):  # the default ${now:...}, not a chosen name
                run_dir = find_resumable_run(stage_dir, cfg) or named
            else:
                run_dir = named
        run_dir = Path(run_dir)
        check_writable_folder(run_dir, "output_root")
        lock = lock_run_folder(run_dir)
        try:
            superseded = _check_run_folder(run_dir, cfg, resume, fresh)
        except BaseException:
            release_run_folder(lock)
            raise
        new_run = not (run_dir / CONFIG_FILE).is_file()
    if dist.is_initialized():  # every rank writes to the folder rank 0 chose (its clock may differ by a second)
        shared = [str(run_dir) if rank == 0 else None]
        dist.broadcast_object_list(shared, src=0)
        run_dir = Path(shared[0])

    # Stages build their networks right after setup: the same seed on every rank and in every run makes the initial
    # weights a function of the config, so two runs of one command compute the same thing.
    seed_everything(cfg.seed)
    log = _setup_logging(run_dir, rank == 0)
    runtime = Runtime(cfg=cfg, device=device, autocast_dtype=autocast_dtype, run_dir=run_dir, rank=rank,
                      world_size=world_size, log=log, _lock=lock, _superseded=superseded)
    if rank == 0 and new_run:
        runtime.save_config()  # an existing folder keeps its config until the stage accepts this one
    log.info("stage=%s run_dir=%s device=%s precision=%s world_size=%d", cfg.stage, run_dir, device,
             autocast_dtype or "fp32", world_size)
    if rank == 0 and cfg.logger == "wandb" and cfg.wandb.mode != "disabled":
        runtime._wandb_run = _start_wandb(cfg, run_dir)
    if rank == 0 and cfg.logger == "tensorboard":
        runtime._tensorboard = _start_tensorboard(run_dir)
    return runtime


def _start_wandb(cfg: DictConfig, run_dir: Path):
    """The wandb run of `run_dir`: the one it opened before (its id is in WANDB_RUN_ID_FILE), else a new one."""
    os.environ.setdefault("WANDB_MODE", cfg.wandb.mode)
    os.environ.setdefault("WANDB_SILENT", "true")
    try:
        import wandb
    except ImportError:
        return None
    id_file = run_dir / WANDB_RUN_ID_FILE
    earlier = {"id": id_file.read_text().strip(), "resume": "allow"} if id_file.is_file() else {}
    run = wandb.init(project=cfg.wandb.project, name=f"{cfg.stage}/{run_dir.name}", dir=str(run_dir),
                     mode=cfg.wandb.mode, config=OmegaConf.to_container(cfg, resolve=True), reinit="finish_previous",
                     **earlier)
    if not earlier:
        write_atomically(id_file, run.id + "\n")
    return run


def _start_tensorboard(run_dir: Path, purge_step: int | None = None):
    """A SummaryWriter into the run folder's TENSORBOARD_DIR; events of steps from `purge_step` on that earlier
    writers left (a resumed run logs those steps again) are hidden from TensorBoard."""
    from torch.utils.tensorboard import SummaryWriter  # imports tensorboard: only where it is asked for

    return SummaryWriter(str(run_dir / TENSORBOARD_DIR), purge_step=purge_step)
