"""stage=ablation: the paper's ablation ladder (Table 5) at small scale: which of ε-VAE's ingredients matter.

    python pipelines/run.py stage=ablation reproduce=ladder32      # Imagenette 32 px on this machine's CPU

Each rung of the preset configs/reproduce/<PRESET>.yaml adds one ingredient to the rung before it (its `changes`
are Hydra overrides applied on top of all earlier rungs' changes; a rung may switch the base `tokenizer`). Every
rung trains a tokenizer at the same budget (the preset's `common` settings) and measures rFID and PSNR at the rung's
decoder NFE on the same class-stratified validation subset. A `decode_only` rung changes only how the previous
rung's tokenizer decodes (the sampling grid), so it reuses that tokenizer instead of training an identical one.
`baseline` rows (the matched VAE) are trained and measured beside the ladder.

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

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from omegaconf import DictConfig, OmegaConf  # noqa: E402

from pipelines.claims import compare  # noqa: E402
from pipelines.configs import command_line  # noqa: E402
from pipelines.pipeline import Pipeline  # noqa: E402
from pipelines.reproduce import (  # noqa: E402
    check_only, chosen_preset, machine, results_folder, run_config, run_legacy_command)
from shared.metrics.intervals import format_interval, verdict  # noqa: E402
from stage1_tokenizer.reconstruct import reconstruct  # noqa: E402


def merge_overrides(base: list[str], changes: list[str]) -> list[str]:
    """`base` Hydra overrides with those whose key appears in `changes` replaced, then the new ones appended."""
    changed = {override.split("=", 1)[0] for override in changes}
    return [override for override in base if override.split("=", 1)[0] not in changed] + changes


def rung_configs(preset: dict, label: str, extra: list[str]) -> list[tuple[dict, object]]:
    """(rung, resolved config) for every rung, each with the changes of all rungs up to it."""
    configs, changes, tokenizer = [], [], preset["tokenizer"]
    for rung in preset["rungs"]:
        tokenizer = rung.get("tokenizer", tokenizer)
        changes = merge_overrides(changes, list(rung.get("changes", [])))
        entry = {"slug": rung["slug"], "tokenizer": tokenizer,
                 "overrides": [*changes, f"decode.nfe={rung['nfe']}", "pipeline.steps=[tokenizer,reconstruct]"]}
        configs.append((rung, run_config(preset, label, entry, extra)))
    return configs


def selected_rungs(configs: list[tuple[dict, object]], only: list[str] | None, name: str) -> list[tuple[dict, object]]:
    """The (rung, config) pairs `reproduce.only` names (all when null), each config still holding the changes of
    every rung above it; a decode-only rung brings along the trained rung whose tokenizer it decodes."""
    if only is None:
        return configs
    check_only(only, [rung["slug"] for rung, _ in configs], name)
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
    """Train (or, decode_only, reuse the tokenizer of `trained`, the last trained rung) and reconstruct: the
    reconstruction metrics and the rung's pipeline folder."""
    pipeline = Pipeline(cfg)
    if not rung.get("decode_only"):
        return pipeline.run()["reconstruction"], pipeline
    pipeline.check_config()
    checkpoint = trained.result("tokenizer")["checkpoint"]
    # the one thing this rung changes: the sampling grid its predecessor's tokenizer decodes on
    return pipeline.run_step("reconstruct", lambda folder: reconstruct(cfg, checkpoint, folder,
                                                                      grid=cfg.tokenizer.flow.grid)), pipeline


def row_of(rung: dict, cfg, reconstruction: dict, pipeline: Pipeline) -> dict:
    from stage1_tokenizer.reconstruct import per_image_path

    return {"label": rung["label"], "slug": rung["slug"], "nfe": cfg.decode.nfe, "paper": rung.get("paper", {}),
            "tokenizer": OmegaConf.to_container(cfg.tokenizer, resolve=True),
            **{key: reconstruction[key] for key in ("rfid", "rfid_ci95", "psnr", "psnr_ci95", "subset")},
            "files": {"per_image": str(per_image_path(pipeline.folder("reconstruct"), cfg.decode.nfe))}}


def paired_change(after: dict, before: dict, resamples: int, seed: int) -> dict:
    """The change from `before` to `after` in rFID and PSNR, paired on the same images, and the verdict on the
    paper's direction (lower rFID)."""
    measured = compare(after, before, ["rfid", "psnr"], resamples, seed)
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
             "t). The change is paired on the same images against the rung above; its verdict is computed: "
             "reproduced where its interval lies below zero (lower rFID, the paper's direction), contradicted where "
             "above, inconclusive otherwise.", "",
             "| rung | NFE (ours / paper) | rFID | PSNR | rFID change from the rung above | verdict | paper rFID |",
             "|---|---|---|---|---|---|---|"]
    for index, row in enumerate(rows):
        change = changes[index - 1] if index else None
        paper = row["paper"]
        change_text = format_interval(change["rfid"]["estimate"], change["rfid"]["ci95"]) if change else "—"
        lines.append(f"| {row['label']} | {row['nfe']} / {paper.get('nfe', '—')} | "
                     f"{format_interval(row['rfid'], row['rfid_ci95'])} | "
                     f"{format_interval(row['psnr'], row['psnr_ci95'], '.2f')} | {change_text} | "
                     f"{change['verdict'] if change else '—'} | {paper.get('rfid', '—')} |")
    for row in baselines:
        lines.append(f"| {row['label']} (baseline) | — | {format_interval(row['rfid'], row['rfid_ci95'])} | "
                     f"{format_interval(row['psnr'], row['psnr_ci95'], '.2f')} | — | — | "
                     f"{row['paper'].get('rfid', '—')} |")
    lines += ["", f"The top of the ladder ({rows[-1]['label']}) against each baseline, paired on the same images; "
              "the verdict on the paper's claim that it reconstructs better (lower rFID):", "",
              "| baseline | rFID change | PSNR change | verdict |", "|---|---|---|---|"]
    labels = {row["slug"]: row["label"] for row in baselines}
    for change in versus:
        lines.append(f"| {labels[change['from']]} | "
                     f"{format_interval(change['rfid']['estimate'], change['rfid']['ci95'])} | "
                     f"{format_interval(change['psnr']['estimate'], change['psnr']['ci95'], '.2f')} | "
                     f"{change['verdict']} |")
    return "\n".join(lines) + "\n"


def plot(rows: list[dict], baselines: list[dict], out: Path) -> None:
    figure, axis = plt.subplots(figsize=(7, 4))
    positions = range(len(rows))
    rfids = [row["rfid"] for row in rows]
    errors = [[row["rfid"] - row["rfid_ci95"][0] for row in rows], [row["rfid_ci95"][1] - row["rfid"] for row in rows]]
    axis.errorbar(positions, rfids, yerr=errors, marker="o", capsize=3, label="ours")
    for row in baselines:
        axis.axhline(row["rfid"], linestyle="--", color="gray", label=row["label"])
    axis.set_xticks(list(positions), [row["label"] for row in rows], rotation=30, ha="right", fontsize=8)
    axis.set_ylabel("rFID, 95% interval (lower is better)")
    axis.set_title("ablation ladder")
    axis.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(out / "rfid_ladder.png", dpi=120)
    plt.close(figure)


def main(cfg: DictConfig) -> dict:
    name, preset, extra = chosen_preset(cfg, "rungs")
    return climb(cfg, name, preset, extra)


def climb(cfg: DictConfig, name: str, preset: dict, extra: list[str]) -> dict:
    """Train and measure every rung and baseline of `preset` (with the overrides `extra`) and write the results
    folder; returns what results.json holds."""
    out = results_folder(cfg, name, extra)
    began = time.perf_counter()
    rows, trained, rung_cfg = [], None, None
    for rung, rung_cfg in selected_rungs(rung_configs(preset, name, extra), cfg.reproduce.only, name):
        print(f"== {rung['label']} ({rung_cfg.name}, NFE {rung_cfg.decode.nfe})", flush=True)
        reconstruction, pipeline = measure(rung, rung_cfg, trained)
        rows.append(row_of(rung, rung_cfg, reconstruction, pipeline))
        if not rung.get("decode_only"):
            trained = pipeline
    baselines = []
    for entry in preset.get("baselines", []):
        base_cfg = run_config(preset, name, {**entry, "overrides": [*entry.get("overrides", []),
                                                                     "pipeline.steps=[tokenizer,reconstruct]"]}, extra)
        print(f"== {entry['label']} ({base_cfg.name})", flush=True)
        pipeline = Pipeline(base_cfg)
        baselines.append(row_of(entry, base_cfg, pipeline.run()["reconstruction"], pipeline))
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
