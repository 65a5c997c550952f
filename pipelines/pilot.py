"""stage=pilot: short trainings and a decode sweep that fix a preset's recipe before its comparison is run.

    python pipelines/run.py stage=pilot reproduce=fair32_pilot

For every row of the preset (`tokenizers`, as in stage=reproduce) it trains the tokenizer (the main job's first step
only), then reconstructs the same class-stratified validation images on every (grid, NFE) of `decode_grid` with the
EMA weights, and with the raw weights at the (grid, NFE) where the EMA did best. A one-pass decoder (the VAE) has
no grid or NFE: it is measured once with each kind of weights. At NFE 1 both grids are the single jump t = 1 → 0,
so it is measured once. The preset's rule picks, per decoder kind, the setting of lowest rFID; the table shows every
setting with its intervals so that a reader sees how close the runners-up are.

Writes results/<PRESET>/ (or reproduce.out): table.md, results.json, rfid_by_setting.png and the reconstruction grid
of each decoder kind's chosen setting (reconstructions_<kind>.png). Everything resumes:
each measurement is a step of its row's pipeline folder (`pilot_<grid>_nfe<N>_<ema|raw>`).
"""
from __future__ import annotations

import json
import shutil
import time
from datetime import datetime
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from omegaconf import DictConfig, OmegaConf  # noqa: E402

from pipelines.configs import command_line  # noqa: E402
from pipelines.pipeline import Pipeline  # noqa: E402
from pipelines.plots import save_figure  # noqa: E402
from pipelines.reproduce import machine, open_preset, run_config  # noqa: E402
from shared.metrics.intervals import format_interval  # noqa: E402
from stage1_tokenizer.reconstruct import reconstruct  # noqa: E402

# What every measurement reports, beside its setting (keys of stage=reconstruct's result; a missing one is None).
MEASURED = ("rfid", "rfid_ci95", "psnr", "psnr_ci95", "lpips", "lpips_ci95", "lpips_alex", "noise_std",
            "noise_std_ci95", "seed_mean_psnr", "chroma_hf_ratio", "subset", "decoder_nfe")


def settings(decode_grid: dict, one_pass: bool) -> list[tuple[str | None, int | None]]:
    """(grid, NFE) pairs to measure with EMA weights: one (None, None) for a one-pass decoder; NFE 1 once."""
    if one_pass:
        return [(None, None)]
    pairs = []
    for nfe in decode_grid["nfe"]:
        for grid in (decode_grid["grid"][:1] if nfe == 1 else decode_grid["grid"]):
            pairs.append((grid, nfe))
    return pairs


def step_name(grid: str | None, nfe: int | None, use_ema: bool) -> str:
    weights = "ema" if use_ema else "raw"
    return f"pilot_{weights}" if grid is None else f"pilot_{grid}_nfe{nfe}_{weights}"


def measure(cfg: DictConfig, pipeline: Pipeline, grid: str | None, nfe: int | None, use_ema: bool) -> dict:
    """stage=reconstruct of the row's tokenizer with these decode settings, in its own step folder."""
    checkpoint = pipeline.result("tokenizer")["checkpoint"]
    decode = {"use_ema": use_ema, **({} if nfe is None else {"nfe": nfe})}
    measured_cfg = OmegaConf.merge(cfg, {"decode": decode})
    result = pipeline.run_step(step_name(grid, nfe, use_ema),
                               lambda folder: reconstruct(measured_cfg, checkpoint, run_dir=folder, grid=grid))
    return {"grid": grid, "nfe": nfe, "weights": "EMA" if use_ema else "raw",
            **{key: result.get(key) for key in MEASURED}}


def pilot_row(entry: dict, cfg: DictConfig, decode_grid: dict) -> dict:
    """Train the row's tokenizer and measure it on every decode setting: {"label", "slug", "kind", "gamma", "lr",
    "ema_decay", "measurements": [...], "wall_seconds"}."""
    pipeline = Pipeline(OmegaConf.merge(cfg, {"pipeline": {"steps": ["tokenizer"]}}))
    pipeline.run()
    one_pass = cfg.tokenizer.kind == "vae"
    measurements = [measure(cfg, pipeline, grid, nfe, True) for grid, nfe in settings(decode_grid, one_pass)]
    best = min(measurements, key=lambda measured: measured["rfid"])
    if False in decode_grid["use_ema"]:
        measurements.append(measure(cfg, pipeline, best["grid"], best["nfe"], False))
    flow = cfg.tokenizer.get("flow")
    return {"label": entry["label"], "slug": entry["slug"], "kind": cfg.tokenizer.kind,
            "gamma": None if flow is None else flow.gamma, "lr": cfg.tokenizer.train.lr,
            "ema_decay": cfg.tokenizer.train.ema_decay, "train_steps": cfg.tokenizer.train.steps,
            "measurements": measurements, "wall_seconds": dict(pipeline.seconds)}


def winners(rows: list[dict]) -> dict[str, dict]:
    """Per decoder kind, the row and setting of lowest rFID (the preset's rule)."""
    chosen = {}
    for row in rows:
        for measured in row["measurements"]:
            current = chosen.get(row["kind"])
            if current is None or measured["rfid"] < current["rfid"]:
                chosen[row["kind"]] = {"slug": row["slug"], "label": row["label"], "gamma": row["gamma"],
                                       "lr": row["lr"], **measured}
    return chosen


def _number(value, spec: str) -> str:
    return "—" if value is None else f"{value:{spec}}"


def render_table(rows: list[dict], chosen: dict[str, dict], meta: dict) -> str:
    subset = meta["subset"]
    lines = [f"# Pilot: {meta['preset']}", "", f"Command: `{meta['command']}`  ", f"Machine: {meta['machine']}  ",
             f"Date: {meta['date']}; {meta['compute_minutes']:.1f} min in the pilot's steps "
             f"({meta['wall_minutes']:.1f} min in the last invocation)", "",
             f"Budget per row: {meta['budget']}. Measured on {subset['images']} of {subset['of']} {subset['split']} "
             f"images ({subset['selection']}), the same for every setting. Brackets are 95% intervals (rFID ± 1.96 "
             f"bootstrap standard deviations, the rest Student t over the images). LPIPS is VGG (AlexNet beside "
             f"it); noise σ is the per-pixel deviation between two decodes of the same latents (grey levels), "
             f"seed-mean PSNR that of their average; chroma HF the high-frequency colour energy of the "
             f"reconstructions over the originals'.", "",
             "| row | weights | grid | NFE | rFID | PSNR | LPIPS VGG | LPIPS Alex | noise σ | seed-mean PSNR | "
             "chroma HF |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for row in rows:
        for measured in row["measurements"]:
            lines.append(
                f"| {row['label']} | {measured['weights']} | {measured['grid'] or '—'} | {measured['nfe'] or '—'} | "
                f"{format_interval(measured['rfid'], measured.get('rfid_ci95'))} | "
                f"{format_interval(measured.get('psnr'), measured.get('psnr_ci95'), '.2f')} | "
                f"{format_interval(measured.get('lpips'), measured.get('lpips_ci95'), '.3f')} | "
                f"{_number(measured.get('lpips_alex'), '.3f')} | {_number(measured.get('noise_std'), '.2f')} | "
                f"{_number(measured.get('seed_mean_psnr'), '.2f')} | "
                f"{_number(measured.get('chroma_hf_ratio'), '.2f')} |")
    lines += ["", "## Chosen by the rule (lowest rFID per decoder kind)", ""]
    for kind, best in chosen.items():
        setting = "" if best["grid"] is None else f", grid {best['grid']}, NFE {best['nfe']}"
        gamma = "" if best["gamma"] is None else f"γ {best['gamma']}, "
        lines.append(f"- {kind}: {best['label']} — {gamma}lr {best['lr']}, {best['weights']} weights{setting}: rFID "
                     f"{format_interval(best['rfid'], best.get('rfid_ci95'))}, PSNR "
                     f"{format_interval(best.get('psnr'), best.get('psnr_ci95'), '.2f')}")
    return "\n".join(lines) + "\n"


def plot(rows: list[dict], out: Path) -> None:
    """rFID with its interval for every measured setting, one line of points per row."""
    figure, axis = plt.subplots(figsize=(8, 4))
    for row in rows:
        names = [f"{m['weights']} {m['grid'] or ''} {m['nfe'] or ''}".strip() for m in row["measurements"]]
        values = [m["rfid"] for m in row["measurements"]]
        intervals = [m.get("rfid_ci95") or (m["rfid"], m["rfid"]) for m in row["measurements"]]
        errors = [[value - low for value, (low, _) in zip(values, intervals)],
                  [high - value for value, (_, high) in zip(values, intervals)]]
        axis.errorbar(names, values, yerr=errors, marker="o", capsize=3, linestyle="none", label=row["label"])
    axis.tick_params(axis="x", rotation=40, labelsize=7)
    axis.set_ylabel("rFID, 95% interval (lower is better)")
    axis.set_title("pilot: rFID by training row and decode setting")
    axis.legend(fontsize=7)
    save_figure(figure, out / "rfid_by_setting.png")


def main(cfg: DictConfig) -> dict:
    name, preset, extra, out = open_preset(cfg, "decode_grid")
    began = time.perf_counter()
    rows, row_cfg = [], None
    for entry in preset["tokenizers"]:
        row_cfg = run_config(preset, name, entry, extra)
        print(f"== {entry['label']} ({row_cfg.name})", flush=True)
        rows.append(pilot_row(entry, row_cfg, preset["decode_grid"]))
    chosen = winners(rows)
    for kind, best in chosen.items():  # the chosen settings' reconstructions, originals above
        entry = next(entry for entry in preset["tokenizers"] if entry["slug"] == best["slug"])
        folder = Pipeline(run_config(preset, name, entry, extra)).folder(
            step_name(best["grid"], best["nfe"], best["weights"] == "EMA"))
        shutil.copyfile(folder / f"reconstructions_nfe{best['decoder_nfe']}.png", out / f"reconstructions_{kind}.png")
    subset = rows[0]["measurements"][0]["subset"]  # the same images for every measurement
    meta = {"preset": name, "command": command_line(), "machine": machine(),
            "date": datetime.now().strftime("%Y-%m-%d %H:%M"), "wall_minutes": (time.perf_counter() - began) / 60,
            "compute_minutes": sum(sum(row["wall_seconds"].values()) for row in rows) / 60, "subset": subset,
            "budget": f"{row_cfg.tokenizer.train.steps} steps × {row_cfg.tokenizer.train.batch_size} images at "
                      f"{row_cfg.data.resolution} px"}
    results = {"meta": meta, "rows": rows, "chosen": chosen}
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    (out / "table.md").write_text(render_table(rows, chosen, meta))
    plot(rows, out)
    print((out / "table.md").read_text())
    return results
