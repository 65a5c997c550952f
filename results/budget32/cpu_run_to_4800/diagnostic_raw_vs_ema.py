"""Writes diagnostic_raw_vs_ema.json (see README.md): run from the repository root as
PYTHONPATH=. .venv/bin/python results/budget32/cpu_run_to_4800/diagnostic_raw_vs_ema.py /work/runs/outputs > results/budget32/cpu_run_to_4800/diagnostic_raw_vs_ema.json

Post-hoc diagnostic, added after the 2,400-step measurement: is a budget's raw-weight checkpoint representative of
its run? For each row and each budget measured in results.json it gives
- the training log's loss terms over the logging window that ends at the budget (raw weights, training batches:
  what the run was doing around that step; the VAE's reconstruction L1 is comparable with the L1 below);
- the mean L1 and PSNR of the checkpoint's raw weights (what the preset measures) and of its EMA weights (decay
  0.995, kept in the same checkpoint) on the budget's 500 validation images, decoded with the same noise as
  stage=reconstruct, and the paired difference EMA − raw of the PSNR with its 95% t interval over the images;
and, for the trend of each difference, the slope's interval from the residuals around the line, beside the
preset's interval from image resamples.
"""
import json
import sys
from pathlib import Path

import numpy as np
import torch
from omegaconf import OmegaConf
from scipy import stats

from shared.data.images import make_image_loader
from shared.data.subsets import evaluation_subset
from shared.metrics.image_quality import psnr as image_psnr
from shared.metrics.intervals import mean_interval
from stage1_tokenizer.reconstruct import decoder_noise
from stage1_tokenizer.tokenizer import load_tokenizer

HERE = Path(__file__).parent


@torch.no_grad()
def per_image(tokenizer, data_cfg, subset, nfe: int, seed: int) -> dict[str, np.ndarray]:
    """Per-image L1 ([-1, 1] scale) and PSNR (dB) of one decode, with stage=reconstruct's first noise draw."""
    l1, psnr, seen = [], [], 0
    for batch in make_image_loader(data_cfg, "val", 100, train=False, indices=subset.indices, num_workers=0):
        images = batch["image"]
        noise = decoder_noise(seed, 0, range(seen, seen + len(images)), images.shape[1:])
        decodes = tokenizer.decode(tokenizer.encode(images).mode(), nfe=nfe, noise=noise).clamp(-1, 1)
        l1.append((decodes - images).abs().flatten(1).mean(1))
        psnr.append(image_psnr(images, decodes))
        seen += len(images)
    return {"l1": torch.cat(l1).numpy(), "psnr": torch.cat(psnr).numpy()}


def training_losses(run: Path, steps: int) -> dict[str, float]:
    """The loss terms of the training log's row at `steps` (means over the logging window that ends there)."""
    rows = [json.loads(line) for line in (run / "tokenizer" / "metrics.jsonl").read_text().splitlines()]
    return next({key: value for key, value in row.items() if key.startswith("loss/")}
                for row in rows if row["step"] == steps)


def main(output_root: str) -> dict:
    torch.set_grad_enabled(False)
    results = json.loads((HERE / "results.json").read_text())
    out = {"rows": []}
    for row in results["rows"]:
        run = Path(output_root) / "pipeline" / f"reproduce_budget32_{row['slug']}_s0"
        cfg = OmegaConf.load(run / "pipeline_config.yaml")
        subset = evaluation_subset(cfg.data, "val", cfg.reconstruct.num_images, cfg.evaluate.subset_seed)
        budgets = []
        for measured in row["measurements"]:
            steps = measured["steps"]
            checkpoint = run / "tokenizer" / "checkpoints" / f"step_{steps:09d}.pt"
            weights = {name: per_image(load_tokenizer(checkpoint, torch.device("cpu"), use_ema=use_ema), cfg.data,
                                       subset, cfg.decode.nfe, cfg.seed)
                       for name, use_ema in (("raw", False), ("ema", True))}
            gain = weights["ema"]["psnr"] - weights["raw"]["psnr"]
            budgets.append({"steps": steps, "training_log": training_losses(run, steps),
                            **{f"{name}_{metric}": float(values[metric].mean())
                               for name, values in weights.items() for metric in ("l1", "psnr")},
                            "raw_psnr_in_results_json": measured["psnr"],
                            "ema_minus_raw_psnr": mean_interval(gain)})
            print(row["label"], budgets[-1], file=sys.stderr, flush=True)
        out["rows"].append({"label": row["label"], "slug": row["slug"], "budgets": budgets})
    out["subset"] = subset.record()
    out["trend_with_residual_spread"] = residual_trends(results)
    return out


def residual_trends(results: dict) -> dict:
    """The trend of each difference ours − baseline (results.json's comparison) with the interval its residuals
    around the line give (Student t, K − 2 degrees of freedom): the spread the image resamples cannot see, such as
    one checkpoint's raw weights drawn from a fluctuating run."""
    trends = {}
    for metric, compared in results["comparison"].items():
        steps = np.log2([budget["steps"] for budget in compared["by_budget"]])
        estimates = [budget["estimate"] for budget in compared["by_budget"]]
        fit = stats.linregress(steps, estimates)
        half_width = stats.t.ppf(0.975, len(steps) - 2) * fit.stderr
        trends[metric] = {"slope": fit.slope, "slope_ci95": [fit.slope - half_width, fit.slope + half_width],
                          "residual_std": float(np.std(np.subtract(estimates, fit.intercept + fit.slope * steps),
                                                       ddof=2)),
                          "image_interval_slope_ci95": compared["trend"]["slope_ci95"]}
    return trends


if __name__ == "__main__":
    print(json.dumps(main(sys.argv[1]), indent=1))
