"""stage=reproduce: several tokenizers at equal budget, the same DiT on each, one table of the paper's claims.

    python pipelines/run.py stage=reproduce reproduce=small32   # Imagenette 32 px on this machine's CPU (~70 min)
    python pipelines/run.py stage=reproduce reproduce=paper data.root=/data/imagenet   # ImageNet 256 px, GPU nodes

For every row (`tokenizers`) of the preset configs/reproduce/<PRESET>.yaml it runs the main job (stage=pipeline:
train the tokenizer, measure reconstructions, cache latents, train the DiT, sample, decode, evaluate), plus
reconstructions at every decoder NFE of the sweep. Then it writes to `results/<PRESET>/` (or `reproduce.out`): the
Table-4-style table (table.md, results.json), the paper's claims on the rows the preset names, each with the 95%
interval of its difference and a computed verdict (reproduced / contradicted / inconclusive), the real-data FID
floor, and plots (gFID vs throughput, rFID vs decoder NFE, sample and reconstruction grids). Everything resumes:
rerun the same command after an interruption. The other `key=value` arguments are applied to every run;
`reproduce.only=[vae_f4,epsvae_f4]` runs (or, when they have finished, tabulates) just those rows.
A preset holds `experiment`, `common` ({dotted key: value} for every row), `tokenizers` (rows: label, slug,
tokenizer, overrides), `nfe_sweep` and `claims`; it may extend another preset (Hydra `defaults`), holding only
what differs. The command of earlier versions, `python pipelines/reproduce.py preset=NAME [out=DIR] [only=A,B]
[key=value ...]`, runs the same.
"""
from __future__ import annotations

import json
import shutil
import sys
import time
from collections.abc import Mapping
from datetime import datetime
from pathlib import Path

if str(Path(__file__).resolve().parents[1]) not in sys.path:  # the older command line, from a bare checkout
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import matplotlib  # noqa: E402

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from omegaconf import DictConfig, OmegaConf  # noqa: E402

from pipelines.configs import CONFIG_DIR, ROOT, command_line, compose_config, group_config  # noqa: E402
from pipelines.pipeline import Pipeline  # noqa: E402
from shared.data.images import build_image_dataset  # noqa: E402
from shared.errors import ConfigError  # noqa: E402
from shared.machine import describe, summary  # noqa: E402
from shared.metrics.intervals import format_interval, verdict  # noqa: E402
from stage1_tokenizer.reconstruct import reconstruct  # noqa: E402

# The keys of a stage=reproduce / stage=ablation command line that choose the preset, not the runs' settings.
PRESET_KEYS = ("stage", "reproduce")


def override_value(value) -> str:
    """A config value as Hydra's override grammar writes it."""
    if isinstance(value, bool):
        return str(value).lower()
    if value is None:
        return "null"
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(override_value(item) for item in value) + "]"
    return str(value)


def as_overrides(settings: Mapping) -> list[str]:
    """A preset's `common` settings, {dotted key: value}, as Hydra overrides."""
    return [f"{key}={override_value(value)}" for key, value in settings.items()]


def run_config(preset: dict, preset_name: str, entry: dict, extra: list[str]) -> DictConfig:
    """The stage=pipeline config of one row of a preset: its experiment, the common settings, the row's own
    overrides, then `extra` (the command line's)."""
    overrides = ["stage=pipeline", f"experiment={preset['experiment']}", f"tokenizer={entry['tokenizer']}",
                 f"name=reproduce_{preset_name}_{entry['slug']}", *as_overrides(preset.get("common", {})),
                 *entry["overrides"], *extra]
    return compose_config(overrides)


def chosen_preset(cfg: DictConfig, rows_key: str) -> tuple[str, dict, list[str]]:
    """(name, content, overrides for every run) of the preset that `reproduce=NAME` chose on the command line of
    stage=reproduce or stage=ablation (`rows_key`: the preset's list of runs, `tokenizers` or `rungs`)."""
    from hydra.core.hydra_config import HydraConfig

    name = HydraConfig.get().runtime.choices.get("reproduce") if HydraConfig.initialized() else None
    preset = OmegaConf.to_container(cfg.reproduce, resolve=True)
    if name is None or rows_key not in preset:
        presets = sorted(path.stem for path in (CONFIG_DIR / "reproduce").glob("*.yaml")
                         if rows_key in group_config("reproduce", path.stem))
        raise ConfigError(f"stage={cfg.stage} runs a preset with {rows_key}: add reproduce=NAME, one of {presets}")
    task = HydraConfig.get().overrides.task
    extra = [override for override in task
             if override.lstrip("+~").split("=", 1)[0].split(".", 1)[0] not in PRESET_KEYS]
    return name, preset, extra


def selected_rows(preset: dict, rows_key: str, name: str) -> dict:
    """The preset with only the rows `reproduce.only` names (all when it is null)."""
    only = preset.pop("only", None)
    preset.pop("out", None)
    if only is None:
        return preset
    known = [entry["slug"] for entry in preset[rows_key]]
    if set(only) - set(known):
        raise ConfigError(f"reproduce.only={list(only)}: the preset {name} has the rows {known}")
    return {**preset, rows_key: [entry for entry in preset[rows_key] if entry["slug"] in only]}


def results_folder(cfg: DictConfig, name: str) -> Path:
    out = Path(cfg.reproduce.out) if cfg.reproduce.out else ROOT / "results" / name
    out.mkdir(parents=True, exist_ok=True)
    return out


def legacy_arguments(argv: list[str], stage: str) -> list[str]:
    """`preset=NAME|FILE.yaml [out=DIR] [only=A,B] [key=value ...]`, the command line of pipelines/reproduce.py and
    pipelines/ablation.py before they were stages, as the arguments of `pipelines/run.py stage=...`."""
    arguments = [f"stage={stage}"]
    for argument in argv:
        key, _, value = argument.partition("=")
        if key == "preset" and value.endswith(".yaml"):  # a preset file elsewhere: its folder joins the search path
            folder = Path(value).resolve().parent
            if folder.name != "reproduce":
                raise ConfigError(f"preset={value}: a preset file outside configs/ must lie in a folder named "
                                  f"reproduce/ (Hydra's config group)")
            arguments += [f"hydra.searchpath=[file://{folder.parent}]", f"reproduce={Path(value).stem}"]
        elif key == "preset":
            arguments.append(f"reproduce={value}")
        elif key == "out":
            arguments.append(f"reproduce.out={value}")
        elif key == "only":
            arguments.append(f"reproduce.only=[{value}]")
        else:
            arguments.append(argument)
    return arguments


def run_legacy_command(stage: str) -> None:
    """Run `python pipelines/<stage>.py preset=...` as `python pipelines/run.py stage=<stage> reproduce=...`."""
    import runpy

    sys.argv = [str(ROOT / "pipelines" / "run.py"), *legacy_arguments(sys.argv[1:], stage)]
    runpy.run_path(sys.argv[0], run_name="__main__")


def nfe_sweep(cfg, pipeline: Pipeline, nfes: list[int]) -> dict[int, dict]:
    """rFID/PSNR/LPIPS of the tokenizer at each decoder NFE (one pass for the VAE, which has no NFE)."""
    tokenizer = pipeline.result("tokenizer")["checkpoint"]
    results = {}
    for nfe in (nfes if cfg.tokenizer.kind != "vae" else [cfg.decode.nfe]):
        swept = OmegaConf.merge(cfg, {"decode": {"nfe": nfe}})
        # The pipeline's own reconstruction at its NFE; one more reconstruct stage, in its own folder, for the rest.
        step = "reconstruct" if nfe == cfg.decode.nfe else f"reconstruct_nfe{nfe}"
        results[nfe] = pipeline.run_step(step, lambda folder: reconstruct(swept, tokenizer, run_dir=folder))
    return results


def real_data_floor(cfg) -> dict:
    """The gFID a perfect generator would get here: as many real validation images as there are samples (a
    class-stratified subset), against the same reference, with its bootstrap spread. FID is biased upward at small
    sample counts, so the table's gFIDs are read against this floor, not against zero."""
    from shared.data.images import make_image_loader
    from shared.data.subsets import evaluation_subset
    from shared.data.transforms import quantize_to_uint8
    from shared.metrics.evaluate import load_reference_cache
    from shared.metrics.fid import InceptionStatistics
    from shared.metrics.paired import fid_spread, flat_metrics
    from shared.runtime import resolve_device

    device = resolve_device(cfg.device)
    settings = cfg.evaluate
    reference = load_reference_cache(cfg.data, settings.reference_split, settings.reference_images,
                                     settings.subset_seed, device, Path(cfg.output_root) / "reference_stats",
                                     settings.batch_size)
    num_classes = len(build_image_dataset(cfg.data, "val").class_names)
    subset = evaluation_subset(cfg.data, "val", cfg.sample.num_per_class * num_classes, settings.subset_seed)
    stats = InceptionStatistics(device, keep_features=True)
    for batch in make_image_loader(cfg.data, "val", settings.batch_size, train=False, indices=subset.indices):
        stats.update(quantize_to_uint8(batch["image"]))
    fid = fid_spread(stats.features(), reference=(reference["mu"], reference["sigma"]), device=device,
                     bootstrap=settings.bootstrap, seed=settings.subset_seed)
    return {**flat_metrics({"fid": fid}), "num_images": stats.count,
            "subset": {**subset.record(), "images": stats.count}, "reference": reference["subset"]}


def compression(cfg) -> str:
    return f"f{cfg.tokenizer.downsample}×{cfg.tokenizer.latent_channels}"


def row_of(entry: dict, cfg, pipeline: Pipeline, report: dict, sweep: dict[int, dict]) -> dict:
    from stage1_tokenizer.reconstruct import per_image_path

    reconstruction, generation = report["reconstruction"], report["generation"]
    evaluation = pipeline.result("evaluate")
    return {"label": entry["label"], "slug": entry["slug"], "tokenizer": entry["tokenizer"],
            "kind": cfg.tokenizer.kind, "compression": compression(cfg),
            "latent_shape": [cfg.tokenizer.latent_channels, cfg.data.resolution // cfg.tokenizer.downsample,
                             cfg.data.resolution // cfg.tokenizer.downsample],
            **{key: reconstruction[key] for key in ("rfid", "rfid_ci95", "psnr", "psnr_ci95", "lpips", "lpips_ci95")},
            "gfid": generation["gfid"], "gfid_ci95": generation["gfid_ci95"],
            "images_per_s": report["throughput_images_per_s"],
            "rfid_by_nfe": {str(nfe): result["rfid"] for nfe, result in sweep.items()},
            "rfid_ci95_by_nfe": {str(nfe): result["rfid_ci95"] for nfe, result in sweep.items()},
            "psnr_by_nfe": {str(nfe): result["psnr"] for nfe, result in sweep.items()},
            "generation_settings": generation, "reconstruction_subset": reconstruction["subset"],
            "wall_seconds": report["wall_seconds"],
            # What the claims are computed from: per-image reconstruction metrics and features, sample features.
            "files": {"per_image": str(per_image_path(pipeline.folder("reconstruct"), cfg.decode.nfe)),
                      "sample_features": evaluation["sample_features"],
                      "reference": evaluation["reference_path"]}}


# The paper's direction for each compared quantity (ours − baseline): what "reproduced" means.
PAPER_DIRECTION = {"gfid": "lower", "rfid": "lower", "psnr": "higher", "lpips": "lower", "throughput": "higher"}


def _paired_per_image(ours: dict, base: dict) -> tuple[np.lib.npyio.NpzFile, np.lib.npyio.NpzFile]:
    ours_file, base_file = np.load(ours["files"]["per_image"]), np.load(base["files"]["per_image"])
    if not np.array_equal(ours_file["index"], base_file["index"]):
        raise ConfigError(f"{ours['label']} and {base['label']} were reconstructed on different images: give them "
                          f"the same reconstruct.num_images and evaluate.subset_seed")
    return ours_file, base_file


def compare(ours: dict, base: dict, metrics: list[str], resamples: int, seed: int) -> dict[str, dict]:
    """{metric: {"estimate", "ci95"}} of ours − baseline (throughput: ours / baseline) for each of `metrics`.

    rfid/psnr/lpips: paired on the same validation images (the same bootstrap resamples; a t-interval of the
    per-image differences). gfid: independent bootstrap resamples of the two sample sets against their common
    reference. throughput: the ratio of medians, with the widest ratio of the two ranges over timed batches.
    """
    from shared.metrics.fid_bootstrap import FrechetBootstrap, difference
    from shared.metrics.intervals import mean_interval

    result = {}
    if {"rfid", "psnr", "lpips"} & set(metrics):
        ours_file, base_file = _paired_per_image(ours, base)
        for metric in ("psnr", "lpips"):
            if metric in metrics:
                interval = mean_interval(ours_file[metric] - base_file[metric])
                result[metric] = {"estimate": interval["mean"], "ci95": interval["ci95"]}
        if "rfid" in metrics:
            fids = [FrechetBootstrap(f["fake_features"], real=f["real_features"]) for f in (ours_file, base_file)]
            change = difference(*fids, paired=True, resamples=resamples, seed=seed)
            result["rfid"] = {"estimate": change["difference"], "ci95": change["ci95"]}
    if "gfid" in metrics:
        if ours["files"]["reference"] != base["files"]["reference"]:
            raise ConfigError(f"{ours['label']} and {base['label']} were evaluated against different references")
        with np.load(base["files"]["reference"]) as reference:
            statistics = (reference["mu"], reference["sigma"])
        fids = [FrechetBootstrap(np.load(row["files"]["sample_features"]), reference=statistics)
                for row in (ours, base)]
        change = difference(*fids, paired=False, resamples=resamples, seed=seed)
        result["gfid"] = {"estimate": change["difference"], "ci95": change["ci95"]}
    if "throughput" in metrics:
        ours_speed, base_speed = ours["images_per_s"], base["images_per_s"]
        ours_range, base_range = ours_speed["range"]["total"], base_speed["range"]["total"]
        result["throughput"] = {"estimate": ours_speed["total"] / base_speed["total"],
                                "ci95": [ours_range[0] / base_range[1], ours_range[1] / base_range[0]]}
    return result


def claims(rows: dict[str, dict], spec: dict, resamples: int = 200, seed: int = 0) -> list[dict]:
    """The paper's claims on the rows the preset names (chosen before any result), each with the interval of its
    difference and the verdict of shared.metrics.intervals.verdict: never written by hand."""
    plan = [("equal_compression", ["rfid", "psnr", "lpips", "gfid"], PAPER["equal_compression"]),
            ("speedup", ["throughput", "gfid"], PAPER["speedup"])]
    result = []
    for name, metrics, paper in plan:
        roles = spec.get(name)
        if not roles or roles["baseline"] not in rows or roles["ours"] not in rows:
            continue
        ours, base = rows[roles["ours"]], rows[roles["baseline"]]
        for metric, measured in compare(ours, base, metrics, resamples, seed).items():
            # A ratio is compared with 1, a difference with 0.
            offset = 1.0 if metric == "throughput" else 0.0
            interval = None if measured["ci95"] is None else [bound - offset for bound in measured["ci95"]]
            result.append({"claim": name, "metric": metric, "ours": ours["label"], "baseline": base["label"],
                           **measured, "paper": paper[metric], "paper_direction": PAPER_DIRECTION[metric],
                           "verdict": verdict(interval, PAPER_DIRECTION[metric])})
    return result


# The paper's numbers behind each claim (SPEC.md, ImageNet 256 px).
PAPER = {
    "equal_compression": {"rfid": "f8: SD-VAE 0.74 → ε-VAE (M) 0.47", "psnr": "f8: 25.68 → 27.65 dB",
                          "lpips": "not reported", "gfid": "f8: SD-VAE 11.63 → ε-VAE (M) 9.39 (−19%)"},
    "speedup": {"throughput": "ε-VAE (M) f16 1192 vs SD-VAE f8 522 images/1000 s: 2.28×",
                "gfid": "ε-VAE (M) f16 10.68 vs SD-VAE f8 11.63"},
}


def render_table(rows: list[dict], claim: list[dict], meta: dict, floor: dict | None = None) -> str:
    # A one-pass decoder (the VAE) has a single rFID; diffusion decoders one per NFE of the sweep.
    sweep = sorted({int(nfe) for row in rows if len(row["rfid_by_nfe"]) > 1 for nfe in row["rfid_by_nfe"]})
    lines = [f"# Reproduction: {meta['preset']}", "",
             f"Command: `{meta['command']}`  ", f"Machine: {meta['machine']}  ",
             f"Date: {meta['date']}; {meta['compute_minutes']:.1f} min in the pipeline steps "
             f"({meta['wall_minutes']:.1f} min in the last invocation, NFE sweep included)", "",
             "Brackets are 95% intervals: FID ± 1.96 bootstrap standard deviations over the images, PSNR/LPIPS "
             "Student t over the images, images/s the range over the timed batches.", "",
             f"| tokenizer | latent | rFID (NFE {' / '.join(map(str, sweep))}) | rFID | PSNR | LPIPS | gFID | images/s: "
             f"DiT / decode / end-to-end |", "|---|---|---|---|---|---|---|---|"]
    for row in rows:
        by_nfe = row["rfid_by_nfe"]
        rfid = (f"{next(iter(by_nfe.values())):.1f} (one pass)" if len(by_nfe) == 1 else
                " / ".join(f"{by_nfe[str(nfe)]:.1f}" if str(nfe) in by_nfe else "—" for nfe in sweep))
        speed = row["images_per_s"]
        lines.append(f"| {row['label']} | {row['compression']} ({'×'.join(map(str, row['latent_shape']))}) | {rfid} | "
                     f"{format_interval(row['rfid'], row['rfid_ci95'])} | "
                     f"{format_interval(row['psnr'], row['psnr_ci95'], '.2f')} | "
                     f"{format_interval(row['lpips'], row['lpips_ci95'], '.3f')} | "
                     f"{format_interval(row['gfid'], row['gfid_ci95'])} | {speed['ldm']:.1f} / {speed['decode']:.1f} / "
                     f"{format_interval(speed['total'], speed['range']['total'])} |")
    settings = rows[0]["generation_settings"] if rows else {}
    subset = rows[0]["reconstruction_subset"] if rows else {}
    lines += ["", f"Reconstruction: {subset.get('images')} of {subset.get('of')} {subset.get('split')} images "
                  f"({subset.get('selection')}), the same images for every tokenizer; rFID/PSNR/LPIPS at the "
                  f"pipeline's decoder NFE. gFID: {settings.get('num_samples')} samples, {settings.get('sampler')} "
                  f"{settings.get('steps')} steps, CFG {settings.get('cfg_scale')}, decoder NFE "
                  f"{settings.get('decoder_nfe')}, reference {settings.get('reference')}.", ""]
    if floor:
        lines += [f"Floor: {floor['num_images']} real validation images (class-stratified) score FID "
                  f"{format_interval(floor['fid'], floor['fid_ci95'])} against the same reference: the best gFID possible "
                  f"at this sample count.", ""]
    if claim:
        lines += ["## Claims", "",
                  "Computed, never written by hand: reproduced where the 95% interval of the difference (ours − "
                  "baseline; throughput: the ratio) excludes no change in the paper's direction, contradicted where it "
                  "excludes it the other way, inconclusive otherwise.", "",
                  "| claim | ours vs baseline | quantity | change [95% interval] | paper | verdict |",
                  "|---|---|---|---|---|---|"]
        for item in claim:
            unit = "×" if item["metric"] == "throughput" else ""
            digits = 3 if item["metric"] in ("lpips", "throughput") else 2
            lines.append(f"| {item['claim'].replace('_', ' ')} | {item['ours']} vs {item['baseline']} | "
                         f"{item['metric']} ({item['paper_direction']} is better) | "
                         f"{format_interval(item['estimate'], item['ci95'], f'.{digits}f')}{unit} | {item['paper']} | "
                         f"**{item['verdict']}** |")
    return "\n".join(lines) + "\n"


def plot(rows: list[dict], out: Path) -> None:
    figure, axis = plt.subplots(figsize=(5, 4))
    for row in rows:
        low, high = row["gfid_ci95"] or (row["gfid"], row["gfid"])
        axis.errorbar(row["images_per_s"]["total"], row["gfid"], yerr=[[row["gfid"] - low], [high - row["gfid"]]],
                      fmt="o", capsize=3)
        axis.annotate(row["label"], (row["images_per_s"]["total"], row["gfid"]), fontsize=8)
    axis.set_xlabel("end-to-end images/s (DiT sampling + decoding)")
    axis.set_ylabel("gFID, 95% interval (lower is better)")
    axis.set_title("gFID vs throughput")
    figure.tight_layout()
    figure.savefig(out / "gfid_vs_throughput.png", dpi=120)
    plt.close(figure)

    figure, axis = plt.subplots(figsize=(5, 4))
    for row in rows:
        nfes = [int(n) for n in row["rfid_by_nfe"]]
        if len(nfes) == 1:  # a deterministic decoder: one value whatever the NFE
            axis.axhline(next(iter(row["rfid_by_nfe"].values())), linestyle="--", color="gray", label=row["label"])
        else:
            axis.plot(nfes, list(row["rfid_by_nfe"].values()), marker="o", label=row["label"])
    axis.set_xlabel("decoder NFE")
    axis.set_ylabel("rFID (lower is better)")
    axis.set_xticks(sorted({int(n) for row in rows for n in row["rfid_by_nfe"]}))
    axis.legend(fontsize=8)
    axis.set_title("rFID vs decoder steps")
    figure.tight_layout()
    figure.savefig(out / "rfid_vs_nfe.png", dpi=120)
    plt.close(figure)


def machine() -> str:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return summary(describe(device))


def main(cfg: DictConfig) -> dict:
    name, preset, extra = chosen_preset(cfg, "tokenizers")
    return reproduce(cfg, name, selected_rows(preset, "tokenizers", name), extra)


def reproduce(cfg: DictConfig, name: str, preset: dict, extra: list[str]) -> dict:
    """Run (or resume) every row of `preset`, with the overrides `extra` on each, and write the results folder;
    returns what results.json holds."""
    out = results_folder(cfg, name)
    began = time.perf_counter()
    rows = []
    for entry in preset["tokenizers"]:
        row_cfg = run_config(preset, name, entry, extra)
        print(f"== {entry['label']}: {compression(row_cfg)} ({row_cfg.name})", flush=True)
        pipeline = Pipeline(row_cfg)
        report = pipeline.run()
        sweep = nfe_sweep(row_cfg, pipeline, preset.get("nfe_sweep", [row_cfg.decode.nfe]))
        rows.append(row_of(entry, row_cfg, pipeline, report, sweep))
        for source, target in ((pipeline.folder("sample") / "grid.png", f"samples_{entry['slug']}.png"),
                               (pipeline.folder("reconstruct") / f"reconstructions_nfe{row_cfg.decode.nfe}.png",
                                f"reconstructions_{entry['slug']}.png")):
            if source.is_file():
                shutil.copyfile(source, out / target)
    floor = real_data_floor(row_cfg)
    claim = claims({row["slug"]: row for row in rows}, preset.get("claims", {}), row_cfg.evaluate.bootstrap,
                   row_cfg.evaluate.subset_seed)
    meta = {"preset": name, "command": command_line(), "machine": machine(),
            "date": datetime.now().strftime("%Y-%m-%d %H:%M"), "wall_minutes": (time.perf_counter() - began) / 60,
            "compute_minutes": sum(sum(row["wall_seconds"].values()) for row in rows) / 60}
    results = {"meta": meta, "rows": rows, "claims": claim, "real_data_floor": floor}
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    (out / "table.md").write_text(render_table(rows, claim, meta, floor))
    plot(rows, out)
    print((out / "table.md").read_text())
    return results


if __name__ == "__main__":
    run_legacy_command("reproduce")
