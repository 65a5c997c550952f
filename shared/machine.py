"""What a measurement ran on: one description for every benchmark and results table."""
from __future__ import annotations

import os
import platform
from pathlib import Path

import torch


def cpu_model() -> str:
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def describe(device: torch.device, precision: str = "fp32") -> dict:
    """CPU, cores, threads, torch, Python, device (and GPU name), precision, and the 1-minute load average at the
    time of the call: other processes on a shared machine slow measurements at random, and the load says how much."""
    info = {"cpu": cpu_model(), "cores": os.cpu_count(), "torch": torch.__version__,
            "threads": torch.get_num_threads(), "device": str(device), "precision": precision,
            "python": platform.python_version(), "load_average_1min": os.getloadavg()[0]}
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def summary(info: dict) -> str:
    """One line of `describe`, for a table's header."""
    where = info.get("gpu") or f"CPU only, {info['threads']} thread{'s' if info['threads'] != 1 else ''}"
    return f"{info['cpu']}; {where}; torch {info['torch']}; Python {info['python']}"
