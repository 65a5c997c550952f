"""stage=ablation: the paper's ablation ladder (Table 5) at small scale: which of ε-VAE's ingredients matter.

    python pipelines/run.py stage=ablation reproduce=ladder32      # Imagenette 32 px on this machine's CPU

Each rung of the preset configs/reproduce/<PRESET>.yaml adds one ingredient to the rung before it (its `changes`
are Hydra overrides applied on top of all earlier rungs' changes; a rung may switch the base `tokenizer`). Every
rung trains a tokenizer at the same budget (the preset's `common` settings) and measures rFID and PSNR at the rung's
decoder NFE on the same class-stratified validation subset. A `decode_only` rung changes only how the previous
rung's tokenizer decodes (the sampling grid), so it reuses that tokenizer instead of training an identical one.
`baseline` rows (the matched VAE) are trained and measured beside the ladder. A rung or baseline with `seeds` is
trained once per seed (runs named `_s<seed>`; a decode-only rung decodes the tokenizer of the same seed, so it has
its rung's seeds); one without is one run at the config's `seed`. Changes pair the runs of equal seeds
(pipelines/claims.py): their intervals hold the seed-to-seed spread as well as the images'.

Writes results/<PRESET>/ (or reproduce.out): table.md (each rung with its interval and the paired change from the
rung before, with the verdict of shared.metrics.intervals on the paper's direction: lower rFID), results.json and
rfid_ladder.png. Everything resumes: rerun the same command. `python pipelines/ablation.py preset=NAME ...`, the
command of earlier versions, runs the same.
"""
from __future__ import annotations

import json
import sys
import time
from datetime import datetime
from pathlib import Path

if str(Path(__file__).resolve().parents[1]) not in sys.path:  # the older command line, from a bare checkout
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import matplotlib  # noqa: E402
import numpy as np  # noqa: E402

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from omegaconf import DictConfig, OmegaConf  # noqa: E402

from pipelines.claims import compare  # noqa: E402
from pipelines.configs import command_line  # noqa: E402
from pipelines.pipeline import Pipeline  # noqa: E402
from pipelines.plots import save_figure  # noqa: E402
from pipelines.reproduce import (  # noqa: E402
    average_over_seeds, cell, check_only, chosen_preset, machine, results_folder, run_config, run_legacy_command)
from shared.errors import ConfigError  # noqa: E402
from shared.metrics.intervals import format_interval, verdict  # noqa: E402
from stage1_tokenizer.reconstruct import reconstruct  # noqa: E402


def merge_overrides(base: list[str], changes: list[str]) -> list[str]:
    """`base` Hydra overrides with those whose key appears in `changes` replaced, then the new ones appended."""
    changed = {override.split("=", 1)[0] for override in changes}
    return [override for override in base if override.split("=", 1)[0] not in changed] + changes


def seeded_configs(preset: dict, label: str, entry: dict, seeds: list[int] | None, extra: list[str]) -> list:
    """The resolved configs of one rung or baseline: one per seed of `seeds`, or one at the config's seed."""
    return [run_config(preset, label, entry, extra, seed) for seed in (seeds or [None])]


def rung_configs(preset: dict, label: str, extra: list[str]) -> list[tuple[dict, list]]:
    """(rung, [resolved config of each seed]) for every rung, each with the changes of all rungs up to it."""
    configs, changes, tokenizer, trained = [], [], preset["tokenizer"], None
    for rung in preset["rungs"]:
        tokenizer = rung.get("tokenizer", tokenizer)
        changes = merge_overrides(changes, list(rung.get("changes", [])))
        if rung.get("decode_only") and trained is not None and rung.get("seeds") != trained.get("seeds"):
            raise ConfigError(f"the decode-only rung {rung['slug']} decodes the tokenizers of {trained['slug']}: "
                              f"give both the same seeds")
        trained = trained if rung.get("decode_only") else rung
        entry = {"slug": rung["slug"], "tokenizer": tokenizer,
                 "overrides": [*changes, f"decode.nfe={rung['nfe']}", "pipeline.steps=[tokenizer,reconstruct]"]}
        configs.append((rung, seeded_configs(preset, label, entry, rung.get("seeds"), extra)))
    return configs


def selected_rungs(configs: list[tuple[dict, list]], only: list[str] | None, name: str,
                   baselines: list[dict] = ()) -> list[tuple[dict, list]]:
    """The (rung, config) pairs `reproduce.only` names (all when null), each config still holding the changes of
    every rung above it; a decode-only rung brings along the trained rung whose tokenizer it decodes. `only` may
    also name `baselines`, beside at least one rung (the table measures the ladder's top against them)."""
    if only is None:
        return configs
    rung_slugs = [rung["slug"] for rung, _ in configs]
    check_only(only, rung_slugs + [entry["slug"] for entry in baselines], name)
    if not set(only) & set(rung_slugs):
        raise ConfigError(f"reproduce.only={list(only)}: name at least one rung of the preset {name} beside its "
                          f"baselines: {rung_slugs}")
    kept, trained = [], None
    for pair in configs:
        rung = pair[0]
        if rung["slug"] in only:
            if rung.get("decode_only") and trained is not None and trained not in kept:
                kept.append(trained)
            kept.append(pair)
        if not rung.get("decode_only"):
            trained = pair
    return kept


def measure(rung: dict, cfg, trained: Pipeline | None) -> tuple[dict, Pipeline]:
    """Train (or, decode_only, reuse the tokenizer of `trained`, the last trained rung's run of the same seed) and
    reconstruct: the reconstruction metrics and the run's pipeline folder."""
    pipeline = Pipeline(cfg)
    if not rung.get("decode_only"):
        return pipeline.run()["reconstruction"], pipeline
    pipeline.check_config()
    checkpoint = trained.result("tokenizer")["checkpoint"]
    # the one thing this rung changes: the sampling grid its predecessor's tokenizer decodes on
    return pipeline.run_step("reconstruct", lambda folder: reconstruct(cfg, checkpoint, folder,
                                                                      grid=cfg.tokenizer.flow.grid)), pipeline


def run_of(cfg, reconstruction: dict, pipeline: Pipeline) -> dict:
    """One training seed's record: its reconstruction numbers (intervals over the images) and per-image file."""
    from stage1_tokenizer.reconstruct import per_image_path

    kept = ("rfid", "rfid_ci95", "psnr", "psnr_ci95", "subset")
    return {"seed": cfg.seed, **{key: reconstruction[key] for key in kept},
            "files": {"per_image": str(per_image_path(pipeline.folder("reconstruct"), cfg.decode.nfe))}}


def row_of(rung: dict, cfg, runs: list[dict]) -> dict:
    """A rung's row: the first run's record; with several runs, rFID and PSNR are the means over them (with their
    spread over seeds), and the intervals over the images are each run's own (under "runs")."""
    row = {"label": rung["label"], "slug": rung["slug"], "nfe": cfg.decode.nfe, "paper": rung.get("paper", {}),
           "tokenizer": OmegaConf.to_container(cfg.tokenizer, resolve=True), **runs[0], "runs": runs}
    if len(runs) > 1:
        average_over_seeds(row, runs, ("rfid", "psnr"))
        del row["seed"]
    return row


def paired_change(after: dict, before: dict, resamples: int, seed: int) -> dict:
    """The change from `before` to `after` in rFID and PSNR, paired on the same images, and the verdict on the
    paper's direction (lower rFID)."""
    measured = compare(after, before, ["rfid", "psnr"], resamples, seed)  # over the seeds both rows trained
    return {"from": before["slug"], "to": after["slug"], "rfid": measured["rfid"], "psnr": measured["psnr"],
            "verdict": verdict(measured["rfid"]["ci95"], "lower")}


def steps_down(rows: list[dict], resamples: int, seed: int) -> list[dict]:
    """Each rung against the one before it: every ingredient lowers rFID, says the paper."""
    return [paired_change(after, before, resamples, seed) for before, after in zip(rows, rows[1:])]


def against_baselines(rows: list[dict], baselines: list[dict], resamples: int, seed: int) -> list[dict]:
    """The top of the ladder (the paper's full ε-VAE) against each baseline on the same images: the paper's claim
    is that it reconstructs better than the matched VAE (rFID 6.24 against 11.15)."""
    return [paired_change(rows[-1], baseline, resamples, seed) for baseline in baselines]


def render_table(rows: list[dict], changes: list[dict], baselines: list[dict], versus: list[dict],
                 meta: dict) -> str:
    subset = rows[0]["subset"]
    lines = [f"# Ablation ladder: {meta['preset']}", "", f"Command: `{meta['command']}`  ",
             f"Machine: {meta['machine']}  ", f"Date: {meta['date']}; {meta['wall_minutes']:.1f} min in the last "
             f"invocation", "", f"Budget per rung: {meta['budget']}. Reconstruction: {subset['images']} of "
             f"{subset['of']} {subset['split']} images ({subset['selection']}), the same for every rung.", "",
             "Brackets are 95% intervals (rFID ± 1.96 bootstrap standard deviations over the images; PSNR Student "
             "t). A rung trained with several seeds shows the mean over seeds and, in parentheses, each seed's "
             "value. The change is paired on the same images against the rung above, seed by seed over the seeds "
             "both trained (their number in parentheses where more than one; the interval then holds the "
             "seed-to-seed spread, pipelines/claims.py); its verdict is computed: reproduced where its interval "
             "lies below zero (lower rFID, the paper's direction), contradicted where above, inconclusive "
             "otherwise.", "",
             "| rung | NFE (ours / paper) | rFID | PSNR | rFID change from the rung above | verdict | paper rFID |",
             "|---|---|---|---|---|---|---|"]
    for index, row in enumerate(rows):
        change = changes[index - 1] if index else None
        paper = row["paper"]
        lines.append(f"| {row['label']} | {row['nfe']} / {paper.get('nfe', '—')} | {cell(row, 'rfid')} | "
                     f"{cell(row, 'psnr', '.2f')} | {change_cell(change, 'rfid') if change else '—'} | "
                     f"{change['verdict'] if change else '—'} | {paper.get('rfid', '—')} |")
    for row in baselines:
        lines.append(f"| {row['label']} (baseline) | — | {cell(row, 'rfid')} | {cell(row, 'psnr', '.2f')} | — | "
                     f"— | {row['paper'].get('rfid', '—')} |")
    lines += ["", f"The top of the ladder ({rows[-1]['label']}) against each baseline, paired on the same images; "
              "the verdict on the paper's claim that it reconstructs better (lower rFID):", "",
              "| baseline | rFID change | PSNR change | verdict |", "|---|---|---|---|"]
    labels = {row["slug"]: row["label"] for row in baselines}
    for change in versus:
        lines.append(f"| {labels[change['from']]} | {change_cell(change, 'rfid')} | "
                     f"{change_cell(change, 'psnr', '.2f')} | {change['verdict']} |")
    return "\n".join(lines) + "\n"


def change_cell(change: dict, metric: str, spec: str = ".1f") -> str:
    """A paired change with its interval, and the number of seeds it pairs when more than one."""
    measured = change[metric]
    seeds = f" ({measured['seeds']} seeds)" if measured.get("seeds", 1) > 1 else ""
    return format_interval(measured["estimate"], measured["ci95"], spec) + seeds


def plot(rows: list[dict], baselines: list[dict], out: Path) -> None:
    """rFID of every rung: each run with its interval over the images (seeds side by side), a line through the
    rungs' means, and each baseline's mean as a dashed line."""
    figure, axis = plt.subplots(figsize=(7, 4))
    positions = range(len(rows))
    axis.plot(positions, [row["rfid"] for row in rows], color="C0", label="ours (mean over seeds)")
    for position, row in zip(positions, rows):
        runs = row["runs"]
        offsets = np.linspace(-0.15, 0.15, len(runs)) if len(runs) > 1 else [0.0]
        for offset, run in zip(offsets, runs):
            axis.errorbar(position + offset, run["rfid"], fmt="o", color="C0", capsize=3,
                          yerr=[[run["rfid"] - run["rfid_ci95"][0]], [run["rfid_ci95"][1] - run["rfid"]]])
    for row in baselines:
        axis.axhline(row["rfid"], linestyle="--", color="gray", label=row["label"])
    axis.set_xticks(list(positions), [row["label"] for row in rows], rotation=30, ha="right", fontsize=8)
    axis.set_ylabel("rFID, 95% interval (lower is better)")
    axis.set_title("ablation ladder")
    axis.legend(fontsize=8)
    save_figure(figure, out / "rfid_ladder.png")


def main(cfg: DictConfig) -> dict:
    name, preset, extra = chosen_preset(cfg, "rungs")
    return climb(cfg, name, preset, extra)


def climb(cfg: DictConfig, name: str, preset: dict, extra: list[str]) -> dict:
    """Train and measure every rung and baseline of `preset` (with the overrides `extra`) and write the results
    folder; returns what results.json holds."""
    out = results_folder(cfg, name, extra)
    began = time.perf_counter()
    rows, trained = [], {}  # trained: seed -> the pipeline of the last trained rung's run of that seed
    only, baseline_entries = cfg.reproduce.only, preset.get("baselines", [])
    for rung, configs in selected_rungs(rung_configs(preset, name, extra), only, name, baseline_entries):
        runs, pipelines = [], {}
        for rung_cfg in configs:
            print(f"== {rung['label']} ({rung_cfg.name}, NFE {rung_cfg.decode.nfe})", flush=True)
            reconstruction, pipelines[rung_cfg.seed] = measure(rung, rung_cfg, trained.get(rung_cfg.seed))
            runs.append(run_of(rung_cfg, reconstruction, pipelines[rung_cfg.seed]))
        rows.append(row_of(rung, rung_cfg, runs))
        if not rung.get("decode_only"):
            trained = pipelines
    baselines = []
    # with `only`, just the baselines it names: rows it leaves out can train at the same time in another process
    for entry in [entry for entry in baseline_entries if only is None or entry["slug"] in only]:
        runs = []
        for base_cfg in seeded_configs(preset, name, {**entry, "overrides": [*entry.get("overrides", []),
                                                                             "pipeline.steps=[tokenizer,reconstruct]"]},
                                       entry.get("seeds"), extra):
            print(f"== {entry['label']} ({base_cfg.name})", flush=True)
            pipeline = Pipeline(base_cfg)
            runs.append(run_of(base_cfg, pipeline.run()["reconstruction"], pipeline))
        baselines.append(row_of(entry, base_cfg, runs))
    settings = rung_cfg.evaluate
    changes = steps_down(rows, settings.bootstrap, settings.subset_seed)
    versus = against_baselines(rows, baselines, settings.bootstrap, settings.subset_seed)
    meta = {"preset": name, "command": command_line(), "machine": machine(),
            "date": datetime.now().strftime("%Y-%m-%d %H:%M"), "wall_minutes": (time.perf_counter() - began) / 60,
            "budget": f"{rung_cfg.tokenizer.train.steps} steps × {rung_cfg.tokenizer.train.batch_size} images at "
                      f"{rung_cfg.data.resolution} px"}
    results = {"meta": meta, "rows": rows, "changes": changes, "baselines": baselines, "against_baselines": versus}
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    (out / "table.md").write_text(render_table(rows, changes, baselines, versus, meta))
    plot(rows, baselines, out)
    print((out / "table.md").read_text())
    return results


if __name__ == "__main__":
    run_legacy_command("ablation")
