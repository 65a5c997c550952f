"""stage=budget: does the diffusion decoder's gap to the VAE close with training? (the training-budget trend)

    python pipelines/run.py stage=budget reproduce=budget32

Every row of the preset (`tokenizers`, as in stage=reproduce) trains its tokenizer once, to the largest of
`budget_steps`, keeping the checkpoint of each budget for good (tokenizer.train.keep_steps); a rerun resumes it.
Each kept checkpoint is then reconstructed on the same class-stratified validation images (stage=reconstruct, with
the preset's decode settings), in a step folder `budget_<steps>` of the row's pipeline folder. The preset's
`compare` ({baseline, ours}) gives, at every budget, the difference ours − baseline of rFID, PSNR and VGG LPIPS
with its interval, and the least-squares line of that difference on log2 steps (shared.metrics.intervals:
log_step_trend): its change per doubling, with a verdict on whether it moves in the paper's direction, and the step
count at which the line would reach zero. Intervals come from bootstrap resamples of the images, drawn once for
every budget and both rows; one run per row, so they hold no training-seed variance. `psnr_target` (dB) is checked
on the baseline at the largest budget.

`reproduce.only=[ROW]` trains and measures that row alone (rows can train in separate processes); the command
without it then tabulates them. `reproduce.train=false` trains nothing: it measures and tabulates the budgets whose
checkpoints exist in every row, so a trend can be read while its runs go on: the table is then marked partial, and
the PSNR target stays pending until the largest budget is measured. Writes results/<PRESET>/ (or reproduce.out):
table.md, results.json, budget_metrics.png (each row against log steps) and budget_difference.png (the differences
and their lines).
"""
from __future__ import annotations

import time
from datetime import datetime
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from omegaconf import DictConfig, OmegaConf  # noqa: E402

from pipelines.claims import PAPER_DIRECTION  # noqa: E402
from pipelines.configs import command_line  # noqa: E402
from pipelines.pipeline import Pipeline  # noqa: E402
from pipelines.plots import save_figure  # noqa: E402
from pipelines.reproduce import machine, open_preset, run_config  # noqa: E402
from shared.errors import ConfigError  # noqa: E402
from shared.files import json_text  # noqa: E402
from shared.metrics.fid_bootstrap import FrechetBootstrap  # noqa: E402
from shared.metrics.intervals import (  # noqa: E402
    bootstrap_counts, format_interval, log_step_trend, normal_interval, verdict)
from shared.train.checkpoint import CheckpointDir, load_checkpoint  # noqa: E402
from stage1_tokenizer.reconstruct import per_image_path, reconstruct  # noqa: E402

COMPARED = ("rfid", "psnr", "lpips")  # the differences whose trend is judged
# Each row's numbers at each budget (keys of stage=reconstruct's result).
MEASURED = ("rfid", "rfid_ci95", "psnr", "psnr_ci95", "lpips", "lpips_ci95", "noise_std", "noise_std_ci95",
            "seed_mean_psnr", "chroma_hf_ratio", "decoder_nfe", "subset")


def budget_run_config(preset: dict, name: str, entry: dict, extra: list[str]) -> DictConfig:
    """The row's run (its first training seed): trained to the largest budget, the checkpoint of every budget kept."""
    budgets = sorted(preset["budget_steps"])
    return run_config(preset, name, entry, [*extra, f"tokenizer.train.steps={budgets[-1]}",
                                            f"tokenizer.train.keep_steps=[{','.join(map(str, budgets))}]"],
                      entry.get("seeds", [None])[0])


def checkpoint_of(pipeline: Pipeline, steps: int) -> Path:
    return CheckpointDir(pipeline.folder("tokenizer") / "checkpoints").path(steps)


def measure(cfg: DictConfig, pipeline: Pipeline, steps: int) -> dict:
    """stage=reconstruct of the row's checkpoint after `steps` steps, in its own step folder."""
    checkpoint = checkpoint_of(pipeline, steps)
    result = pipeline.run_step(f"budget_{steps}", lambda folder: reconstruct(cfg, checkpoint, run_dir=folder))
    # the training time to this checkpoint, over every invocation (None: written before the loop counted it)
    train_seconds = load_checkpoint(checkpoint, mmap=True)["counters"].get("train_seconds")  # mapped, not read
    return {"steps": steps, **{key: result.get(key) for key in MEASURED}, "train_seconds": train_seconds,
            "per_image": str(per_image_path(pipeline.folder(f"budget_{steps}"), cfg.decode.nfe))}


def available_budgets(pipelines: list[Pipeline], budgets: list[int]) -> list[int]:
    """The budgets whose checkpoint every row has."""
    return [steps for steps in budgets if all(checkpoint_of(pipeline, steps).is_file() for pipeline in pipelines)]


def image_replicates(ours: list[dict], base: list[dict], metric: str, resamples: int, seed: int) -> tuple:
    """(estimates (K,), replicates (R, K)) of ours − baseline of `metric` at each of K budgets: the value on all
    images, then on R bootstrap resamples of the images, each resample the same for every budget and both rows."""
    loaded = [[dict(np.load(measured["per_image"])) for measured in row] for row in (ours, base)]
    index = loaded[1][0]["index"]
    if not all(np.array_equal(files["index"], index) for row in loaded for files in row):
        raise ConfigError("the budgets were reconstructed on different images: give every row the same "
                          "reconstruct.num_images and evaluate.subset_seed")
    generator = np.random.default_rng(seed)
    counts = np.stack([bootstrap_counts(len(index), generator) for _ in range(resamples)])  # (R, N)
    if metric != "rfid":
        differences = np.stack([o[metric] - b[metric] for o, b in zip(*loaded)])  # (K, N)
        return differences.mean(axis=1), counts @ differences.T / len(index)
    weights = [None, *torch.as_tensor(counts, dtype=torch.float64)]

    def fids(files: dict) -> np.ndarray:
        images = FrechetBootstrap(files["fake_features"], real=files["real_features"])
        return np.array([images.fid(w) for w in weights])

    differences = np.stack([fids(o) - fids(b) for o, b in zip(*loaded)])  # (K, 1 + R)
    return differences[:, 0], differences[:, 1:].T


def compare(ours: dict, base: dict, resamples: int, seed: int) -> dict[str, dict]:
    """{metric: {"by_budget": [{steps, estimate, ci95, verdict}], "trend": log_step_trend(...) + verdict}}."""
    steps = [measured["steps"] for measured in base["measurements"]]
    result = {}
    for metric in COMPARED:
        estimates, replicates = image_replicates(ours["measurements"], base["measurements"], metric, resamples, seed)
        by_budget = []
        for k, budget in enumerate(steps):
            interval = normal_interval(float(estimates[k]), float(replicates[:, k].std(ddof=1)))
            by_budget.append({"steps": budget, "estimate": float(estimates[k]), "ci95": interval,
                              "verdict": verdict(interval, PAPER_DIRECTION[metric])})
        trend = log_step_trend(steps, estimates, replicates) if len(steps) >= 2 else None
        if trend is not None:  # the slope judged as a difference: "reproduced" = the gap moves the paper's way
            trend["verdict"] = verdict(trend["slope_ci95"], PAPER_DIRECTION[metric])
        result[metric] = {"by_budget": by_budget, "trend": trend}
    return result


def psnr_target(base: dict, db: float, steps: int) -> dict:
    """Whether the baseline reaches `db` dB PSNR at the largest budget `steps`: reached true or false once that
    budget is measured, null (with the latest budget's PSNR) while the run is still short of it."""
    latest = base["measurements"][-1]
    return {"db": db, "steps": steps, "latest_steps": latest["steps"], "psnr": latest["psnr"],
            "psnr_ci95": latest["psnr_ci95"], "reached": latest["psnr"] >= db if latest["steps"] == steps else None}


def training_time(meta: dict, row_count: int) -> str:
    """The training minutes to the largest budget measured, as the checkpoints of the `row_count` rows counted them."""
    uncounted = meta["training_uncounted"]
    if len(uncounted) == row_count:
        return "training time not recorded (every row's checkpoints predate the loop's count)"
    return (f"{meta['training_minutes']:.1f} min of training to the largest budget measured (the checkpoints' count "
            f"over every invocation" + (f"; not counted: {', '.join(uncounted)}, whose checkpoints predate it"
                                        if uncounted else "") + ")")


def render_table(rows: list[dict], comparison: dict, target: dict | None, meta: dict) -> str:
    ours, base = meta["ours"], meta["baseline"]
    subset = rows[0]["measurements"][0]["subset"]
    lines = [f"# Training budget: {meta['preset']}", "", f"Command: `{meta['command']}`  ",
             f"Machine: {meta['machine']}  ",
             f"Date: {meta['date']}; {training_time(meta, len(rows))}, {meta['measuring_minutes']:.1f} min of "
             f"measuring, {meta['wall_minutes']:.1f} min in the last invocation", "",
             f"One training run per row ({meta['budget']}), measured after each budget on the same "
             f"{subset['images']} {subset['split']} images ({subset['selection']}). Brackets are 95% intervals over "
             f"the images (rFID ± 1.96 bootstrap standard deviations, the rest Student t); they hold no "
             f"training-seed variance. LPIPS is VGG; noise σ is the per-pixel deviation between two decodes of the "
             f"same latents (grey levels).", ""]
    if meta["partial"]:
        lines += [f"**Partial**: measured at {', '.join(f'{b:,}' for b in meta['measured_budgets'])} of the preset's "
                  f"budgets {', '.join(f'{b:,}' for b in meta['budgets'])} steps; the rest have no checkpoint in every "
                  f"row yet (the runs resume when the command is rerun without reproduce.train=false).", ""]
    lines += ["| row | steps | rFID | PSNR | LPIPS (VGG) | noise σ | seed-mean PSNR | training (min) |",
              "|---|---|---|---|---|---|---|---|"]
    for row in rows:
        for m in row["measurements"]:
            lines.append(f"| {row['label']} | {m['steps']:,} | {format_interval(m['rfid'], m['rfid_ci95'])} | "
                         f"{format_interval(m['psnr'], m['psnr_ci95'], '.2f')} | "
                         f"{format_interval(m['lpips'], m['lpips_ci95'], '.3f')} | "
                         f"{format_interval(m['noise_std'], m['noise_std_ci95'], '.2f')} | "
                         f"{format_interval(m['seed_mean_psnr'], None, '.2f')} | "
                         f"{'—' if m['train_seconds'] is None else format(m['train_seconds'] / 60, '.1f')} |")
    lines += ["", f"## {ours} − {base}, by budget", "", "| metric | paper's direction | " +
              " | ".join(f"{b['steps']:,} steps" for b in comparison["rfid"]["by_budget"]) + " |",
              "|---|---|" + "---|" * len(comparison["rfid"]["by_budget"])]
    spec = {"rfid": ".1f", "psnr": ".2f", "lpips": ".3f"}
    for metric, compared in comparison.items():
        lines.append(f"| {metric} | {PAPER_DIRECTION[metric]} | " + " | ".join(
            f"{format_interval(b['estimate'], b['ci95'], spec[metric])} {b['verdict']}"
            for b in compared["by_budget"]) + " |")
    lines += ["", "## The trend: the difference's least-squares line on log2 steps", "",
              "A slope in the paper's direction means the gap moves toward the ε-VAE as training grows (verdict on "
              "the slope's interval). The crossing is where the line would reach zero if it held beyond the last "
              f"budget: an extrapolation, not a measurement (beyond {FAR_AHEAD:,} times the last budget it is shown "
              "as beyond it).", "",
              "| metric | per doubling | verdict | line at the last budget | reaches 0 at (steps) |",
              "|---|---|---|---|---|"]
    last = meta["measured_budgets"][-1]
    for metric, compared in comparison.items():
        trend = compared["trend"]
        if trend is None:
            continue
        crossing = crossing_label(trend, PAPER_DIRECTION[metric], last)
        lines.append(f"| {metric} | {format_interval(trend['slope'], trend['slope_ci95'], spec[metric])} | "
                     f"{trend['verdict']} | {trend['at_last']:{spec[metric]}} | {crossing} |")
    if target is not None:
        lines += ["", f"## Target: {base} PSNR ≥ {target['db']} dB at {target['steps']:,} steps", "",
                  f"Measured {format_interval(target['psnr'], target['psnr_ci95'], '.2f')} dB at "
                  f"{target['latest_steps']:,} steps: " + (
                      "not measured yet at the target's budget." if target["reached"] is None
                      else "reached." if target["reached"] else "not reached.")]
    return "\n".join(lines) + "\n"


FAR_AHEAD = 1024  # a crossing this many times the last budget is shown as beyond it: the line says nothing there


def steps_label(value: float, last_budget: int) -> str:
    if not np.isfinite(value):
        return "∞"
    return f"> {FAR_AHEAD * last_budget:,}" if value > FAR_AHEAD * last_budget else f"{value:,.0f}"


def crossing_label(trend: dict, direction: str, last_budget: int) -> str:
    """Where the line reaches 0 ahead of the last budget, with its interval; a line that will not reach it is either
    already past 0 on the paper's side (ours ahead on the line, the gap widening) or moving away on the other."""
    if trend["crossing_steps"] is not None:
        low, high = trend["crossing_ci95"]
        return (f"{steps_label(trend['crossing_steps'], last_budget)} [{steps_label(low, last_budget)}, "
                f"{steps_label(high, last_budget)}]")
    ours_ahead = verdict([trend["at_last"]] * 2, direction) == "reproduced"  # the claim rule's side of 0
    return "already past 0 (ours ahead on the line, moving further)" if ours_ahead else "never (moving away)"


def plot(rows: list[dict], comparison: dict, meta: dict, out: Path) -> None:
    figure, axes = plt.subplots(1, 4, figsize=(15, 3.6))
    for axis, (metric, label) in zip(axes, (("rfid", "rFID"), ("psnr", "PSNR (dB)"), ("lpips", "LPIPS (VGG)"),
                                            ("noise_std", "decoder noise σ (grey levels)"))):
        for row in rows:
            steps = [m["steps"] for m in row["measurements"]]
            values = [m[metric] for m in row["measurements"]]
            intervals = [m[f"{metric}_ci95"] or (m[metric], m[metric]) for m in row["measurements"]]
            axis.errorbar(steps, values, yerr=[[v - lo for v, (lo, _) in zip(values, intervals)],
                                               [hi - v for v, (_, hi) in zip(values, intervals)]],
                          marker="o", capsize=3, label=row["label"])
        axis.set_xscale("log", base=2)
        axis.set_xlabel("training steps")
        axis.set_title(label)
    axes[0].legend(fontsize=8)
    save_figure(figure, out / "budget_metrics.png")

    figure, axes = plt.subplots(1, len(comparison), figsize=(5 * len(comparison), 3.6))
    for axis, (metric, compared) in zip(axes, comparison.items()):
        budgets = compared["by_budget"]
        steps = np.array([b["steps"] for b in budgets], dtype=float)
        estimates = np.array([b["estimate"] for b in budgets])
        axis.errorbar(steps, estimates, yerr=[estimates - [b["ci95"][0] for b in budgets],
                                              [b["ci95"][1] for b in budgets] - estimates],
                      marker="o", capsize=3, linestyle="none", label="measured (95% interval)")
        trend = compared["trend"]
        if trend is not None:  # the line, solid over the measured budgets and dashed where it is extrapolated
            x_last = np.log2(steps[-1])
            for span, style in ((np.linspace(np.log2(steps[0]), x_last, 20), "-"),
                                (np.linspace(x_last, x_last + 3, 20), "--")):
                axis.plot(2 ** span, trend["at_last"] + trend["slope"] * (span - x_last), style, color="C1")
        axis.axhline(0, color="grey", linewidth=0.8)
        axis.set_xscale("log", base=2)
        axis.set_xlabel("training steps (dashed: the line extrapolated)")
        axis.set_title(f"{metric}: {meta['ours']} − {meta['baseline']}", fontsize=9)
    axes[0].legend(fontsize=8)
    save_figure(figure, out / "budget_difference.png")


def main(cfg: DictConfig) -> dict:
    name, preset, extra, out = open_preset(cfg, "budget_steps")
    began = time.perf_counter()
    budgets = sorted(preset["budget_steps"])
    configs = {entry["slug"]: budget_run_config(preset, name, entry, extra) for entry in preset["tokenizers"]}
    pipelines = {slug: Pipeline(OmegaConf.merge(run_cfg, {"pipeline": {"steps": ["tokenizer"]}}))
                 for slug, run_cfg in configs.items()}
    if cfg.reproduce.train:
        for entry in preset["tokenizers"]:
            print(f"== {entry['label']} ({configs[entry['slug']].name}): {budgets[-1]:,} steps", flush=True)
            pipelines[entry["slug"]].run()
    measured = available_budgets(list(pipelines.values()), budgets)
    if not measured:
        raise ConfigError(f"no budget of {budgets} has a checkpoint in every row yet: run without "
                          f"reproduce.train=false to train them")
    rows = [{"label": entry["label"], "slug": entry["slug"],
             "measurements": [measure(configs[entry["slug"]], pipelines[entry["slug"]], steps) for steps in measured],
             "wall_seconds": dict(pipelines[entry["slug"]].seconds)} for entry in preset["tokenizers"]]
    by_slug = {row["slug"]: row for row in rows}
    roles = preset["compare"]
    if not {roles["ours"], roles["baseline"]} <= set(by_slug):  # the rows split between processes: one of them
        print(f"reproduce.only={list(by_slug)}: trained and measured; the table compares {roles['ours']} with "
              f"{roles['baseline']}: run the command without reproduce.only to write it", flush=True)
        return {"rows": rows}
    ours, base = by_slug[roles["ours"]], by_slug[roles["baseline"]]
    run_cfg = configs[base["slug"]]
    comparison = compare(ours, base, run_cfg.evaluate.bootstrap, run_cfg.evaluate.subset_seed)
    target = None if "psnr_target" not in preset else psnr_target(base, preset["psnr_target"], budgets[-1])
    meta = {"preset": name, "command": command_line(), "machine": machine(),
            "date": datetime.now().strftime("%Y-%m-%d %H:%M"), "wall_minutes": (time.perf_counter() - began) / 60,
            "training_minutes": sum(row["measurements"][-1]["train_seconds"] or 0 for row in rows) / 60,
            "training_uncounted": [row["label"] for row in rows if row["measurements"][-1]["train_seconds"] is None],
            "measuring_minutes": sum(seconds for row in rows for step, seconds in row["wall_seconds"].items()
                                     if step.startswith("budget_")) / 60,
            "budgets": budgets, "measured_budgets": measured, "partial": measured != budgets,
            "ours": ours["label"], "baseline": base["label"],
            "budget": f"{run_cfg.tokenizer.train.batch_size} images per step at {run_cfg.data.resolution} px"}
    results = {"meta": meta, "rows": rows, "comparison": comparison, "psnr_target": target}
    (out / "results.json").write_text(json_text(results))
    (out / "table.md").write_text(render_table(rows, comparison, target, meta))
    plot(rows, comparison, meta, out)
    print((out / "table.md").read_text())
    return results
