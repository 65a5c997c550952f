"""`stage=bench`'s `main`: the measured limit, the sections in order, and the report (see the package's docstring)."""
from __future__ import annotations

import datetime
import json
import time
from dataclasses import asdict

import torch
from omegaconf import DictConfig, OmegaConf

from pipelines.bench.compare import Context
from pipelines.bench.report import machine, markdown, write_report
from pipelines.bench.settings import bench_settings
from pipelines.bench.suites.dit import bench_dit
from pipelines.bench.suites.fid_features import bench_fid_features
from pipelines.bench.suites.loaders import bench_loaders
from pipelines.bench.suites.tokenizers import bench_tokenizers
from pipelines.bench.timing import measured_limits
from pipelines.configs import ROOT, command_line
from shared.foreign_weights import import_diffusers
from shared.runtime import setup


def main(cfg: DictConfig) -> dict:
    import_diffusers("stage=bench (its DiT and SD-VAE comparisons)")  # before anything is measured or written
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
        return runtime.finish(report)
