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
from collections.abc import Callable, Mapping
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

from pipelines.claims import check_claims, claims  # noqa: E402
from pipelines.configs import CONFIG_DIR, ROOT, command_line, compose_config, group_config  # noqa: E402
from pipelines.pipeline import Pipeline  # noqa: E402
from pipelines.plots import save_figure  # noqa: E402
from shared.data.images import build_image_dataset  # noqa: E402
from shared.errors import ConfigError  # noqa: E402
from shared.machine import describe, summary  # noqa: E402
from shared.metrics.intervals import format_interval  # noqa: E402
from shared.runtime import NON_SEMANTIC_KEYS, check_writable_folder, finished_result  # noqa: E402
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


def run_config(preset: dict, preset_name: str, entry: dict, extra: list[str], seed: int | None = None) -> DictConfig:
    """The stage=pipeline config of one row of a preset: its experiment, the common settings, the row's own
    overrides, then `extra` (the command line's). A row trained with several seeds has a run per `seed`, named
    with an `_s<seed>` suffix. A row whose tokenizers another preset's runs trained names them, `tokenizer_run`
    with `{seed}` for the seed (pipeline.tokenizer_run): they are not trained again."""
    name = f"reproduce_{preset_name}_{entry['slug']}" + ("" if seed is None else f"_s{seed}")
    source = entry.get("tokenizer_run")
    if source is not None and (seed is None) == ("{seed}" in source):
        raise ConfigError(f"the row {entry['slug']} of the preset {preset_name}: tokenizer_run={source!r} needs "
                          f"'{{seed}}' exactly when the row has seeds, so that each seed takes its own tokenizer")
    overrides = ["stage=pipeline", f"experiment={preset['experiment']}", f"tokenizer={entry['tokenizer']}",
                 f"name={name}", *as_overrides(preset.get("common", {})), *entry["overrides"],
                 *([] if source is None else [f"pipeline.tokenizer_run={source.format(seed=seed)}"]),
                 *([] if seed is None else [f"seed={seed}"]), *extra]
    return compose_config(overrides)


def chosen_preset(cfg: DictConfig, rows_key: str) -> tuple[str, dict, list[str]]:
    """(name, content, overrides for every run) of the preset that `reproduce=NAME` chose on the command line of
    stage=reproduce or stage=ablation (`rows_key`: the preset's list of runs, `tokenizers` or `rungs`)."""
    from hydra.core.hydra_config import HydraConfig

    name = HydraConfig.get().runtime.choices.get("reproduce") if HydraConfig.initialized() else None
    preset = OmegaConf.to_container(cfg.reproduce, resolve=True)
    # A preset that extends another may set a key it inherits to null: it is then no preset of that stage.
    if name is None or preset.get(rows_key) is None:
        presets = sorted(path.stem for path in (CONFIG_DIR / "reproduce").glob("*.yaml")
                         if group_config("reproduce", path.stem).get(rows_key) is not None)
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
    check_only(only, [entry["slug"] for entry in preset[rows_key]], name)
    return {**preset, rows_key: [entry for entry in preset[rows_key] if entry["slug"] in only]}


def open_preset(cfg: DictConfig, marker_key: str) -> tuple[str, dict, list[str], Path]:
    """(name, content with the rows `reproduce.only` names, overrides for every run, results folder) of the preset
    of a stage whose rows are `tokenizers` and whose presets hold `marker_key`."""
    name, preset, extra = chosen_preset(cfg, marker_key)
    return name, selected_rows(preset, "tokenizers", name), extra, results_folder(cfg, name, extra)


def check_only(only: list[str], known: list[str], name: str) -> None:
    if not only or set(only) - set(known):
        raise ConfigError(f"reproduce.only={list(only)}: name one or more of the rows of the preset {name}: {known}")


def changes_results(override: str) -> bool:
    """Whether a command-line override changes what a run computes (its key is none of NON_SEMANTIC_KEYS)."""
    key = override.lstrip("+~").split("=", 1)[0]
    return not any(key == kept or key.startswith(kept + ".") for kept in NON_SEMANTIC_KEYS)


def trial_settings(cfg: DictConfig, extra: list[str]) -> list[str]:
    """What makes a run of a preset a trial rather than the preset itself: `reproduce.only`, and the command line's
    overrides that change what is computed (not output_root, pipeline.steps, progress, ...)."""
    only = [f"reproduce.only={list(cfg.reproduce.only)}"] if cfg.reproduce.only is not None else []
    return only + [override for override in extra if changes_results(override)]


def results_folder(cfg: DictConfig, name: str, extra: list[str]) -> Path:
    """reproduce.out, else results/<PRESET> for the preset as written; a trial (trial_settings) never replaces the
    committed results: its tables go to ${output_root}/results/<PRESET> unless reproduce.out says otherwise."""
    if cfg.reproduce.out:
        out = Path(cfg.reproduce.out)
    elif trial := trial_settings(cfg, extra):
        out = Path(cfg.output_root) / "results" / name
        print(f"a trial of the preset {name} ({' '.join(trial)}): its tables go to {out}, not results/{name} "
              f"(reproduce.out=DIR to choose)", file=sys.stderr, flush=True)
    else:
        out = ROOT / "results" / name
    check_writable_folder(out, "reproduce.out")  # before any run: one line, not a traceback after hours of training
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


def resolution_sweep(cfg, pipeline: Pipeline, resolutions: list[int]) -> dict[int, dict]:
    """Reconstructions of the same validation images at other resolutions than the tokenizer was trained at (the
    paper's Table 1: trained at 128 px, measured at 256 and 512), each a reconstruct stage in its own folder."""
    tokenizer = pipeline.result("tokenizer")["checkpoint"]
    results = {}
    for resolution in resolutions:
        resized = OmegaConf.merge(cfg, {"data": {"resolution": resolution}})
        results[resolution] = pipeline.run_step(f"reconstruct_{resolution}px",
                                                lambda folder: reconstruct(resized, tokenizer, run_dir=folder))
    return results


def guidance_sweep(cfg, pipeline: Pipeline, scales: list[float]) -> dict[float, dict]:
    """The DiT sampled again at each classifier-free guidance scale and evaluated against the same reference:
    {scale: the evaluate stage's result}, each sample and evaluate stage in its own folder."""
    if not scales:
        return {}
    ldm = pipeline.result("ldm")["checkpoint"]
    return {scale: pipeline.sample_and_evaluate(OmegaConf.merge(cfg, {"sample": {"cfg_scale": scale}}), ldm,
                                                f"sample_cfg{scale:g}", f"evaluate_cfg{scale:g}")[1]
            for scale in scales}


def run_record(cfg, pipeline: Pipeline, report: dict, sweep: dict[int, dict], resolutions: dict[int, dict],
               guided: dict[float, dict]) -> dict:
    """One training run of a row: its numbers and the files the claims are computed from."""
    from stage1_tokenizer.reconstruct import per_image_path

    reconstruction, generation = report["reconstruction"], report["generation"]
    evaluation = finished_result(pipeline.folder("evaluate")) or {}  # none where the run measured no generation
    record = {"seed": cfg.seed, "name": str(cfg.name),
              **{key: reconstruction.get(key) for key in RECONSTRUCTION_KEYS},
              "gfid": generation["gfid"], "gfid_ci95": generation["gfid_ci95"],
              "images_per_s": report["throughput_images_per_s"],
              "rfid_by_nfe": {str(nfe): result["rfid"] for nfe, result in sweep.items()},
              "rfid_ci95_by_nfe": {str(nfe): result["rfid_ci95"] for nfe, result in sweep.items()},
              "psnr_by_nfe": {str(nfe): result["psnr"] for nfe, result in sweep.items()},
              "by_resolution": {str(px): {key: result.get(key) for key in RECONSTRUCTION_KEYS}
                                for px, result in resolutions.items()},
              "gfid_by_cfg": {f"{scale:g}": {"gfid": result["fid"], "gfid_ci95": result["fid_ci95"]}
                              for scale, result in guided.items()},
              "generation_settings": generation, "reconstruction_subset": reconstruction["subset"],
              # stage=convergence's measurements (dit_<steps>_*) are that stage's time, not this table's
              "wall_seconds": {step: seconds for step, seconds in pipeline.seconds.items()
                               if not step.startswith("dit_")},
              # What the claims are computed from: per-image reconstruction metrics and features, sample features.
              "files": {"per_image": str(per_image_path(pipeline.folder("reconstruct"), cfg.decode.nfe)),
                        **({"sample_features": evaluation["sample_features"],
                            "reference": evaluation["reference_path"]} if evaluation else {}),
                        **{f"per_image_{px}px": str(per_image_path(pipeline.folder(f"reconstruct_{px}px"),
                                                                    cfg.decode.nfe)) for px in resolutions},
                        **{"sample_features_cfg": result["sample_features"] for result in guided.values()}}}
    return record


# stage=reconstruct's numbers that a run records (a key an older reconstruction lacks is None).
RECONSTRUCTION_KEYS = ("rfid", "rfid_ci95", "psnr", "psnr_ci95", "lpips", "lpips_ci95", "lpips_alex", "noise_std",
                       "seed_mean_psnr", "chroma_hf_ratio")
# The numbers whose mean over a row's runs the table shows, with their spread over seeds.
SEED_AVERAGED = ("rfid", "psnr", "lpips", "gfid", "noise_std", "seed_mean_psnr", "chroma_hf_ratio")


def average_over_seeds(row: dict, runs: list[dict], keys) -> None:
    """In `row`, its first run's record, each of `keys` that every run measured becomes its mean over the runs, with
    its standard deviation over seeds beside it (`<key>_seed_std`); the first run's interval over the images goes,
    as it is not the mean's."""
    for key in keys:
        values = [run[key] for run in runs if run.get(key) is not None]
        if len(values) == len(runs):
            row[key], row[f"{key}_seed_std"] = float(np.mean(values)), float(np.std(values, ddof=1))
            row.pop(f"{key}_ci95", None)


def row_of(entry: dict, cfg, runs: list[dict]) -> dict:
    """A row of the table: the first run's record (its intervals are over the images), the mean over the runs of
    each SEED_AVERAGED number and its standard deviation over seeds, and every run under "runs"."""
    row = {"label": entry["label"], "slug": entry["slug"], "tokenizer": entry["tokenizer"], "kind": cfg.tokenizer.kind,
           "compression": compression(cfg), "resolution": cfg.data.resolution,
           "latent_shape": [cfg.tokenizer.latent_channels, cfg.data.resolution // cfg.tokenizer.downsample,
                            cfg.data.resolution // cfg.tokenizer.downsample], **runs[0], "runs": runs}
    if len(runs) > 1:
        average_over_seeds(row, runs, SEED_AVERAGED)
        row["wall_seconds"] = {step: sum(run["wall_seconds"].get(step, 0.0) for run in runs)
                               for step in runs[0]["wall_seconds"]}
    return row


def cell(row: dict, key: str, spec: str = ".1f", source: Callable[[dict], dict] = lambda run: run) -> str:
    """A table cell: with one run, the value and its interval over the images; with several, the mean over seeds
    and each seed's value (the spread that training-seed variance gives)."""
    runs = [source(run) for run in row.get("runs") or [row]]
    if len(runs) == 1:
        return format_interval(runs[0].get(key), runs[0].get(f"{key}_ci95"), spec)
    values = [run.get(key) for run in runs]
    if any(value is None for value in values):
        return "n/a"
    return f"{np.mean(values):{spec}} ({' / '.join(f'{value:{spec}}' for value in values)})"


def swept_nfes(rows: list[dict]) -> list[int]:
    """The decoder NFEs of the preset's sweep; none when every row was measured at one NFE. A one-pass decoder (the
    VAE) has a single rFID whatever the sweep, diffusion decoders one per NFE of the sweep."""
    return sorted({int(nfe) for row in rows if len(row["rfid_by_nfe"]) > 1 for nfe in row["rfid_by_nfe"]})


def sweep_cell(by_nfe: dict[str, float], sweep: list[int]) -> str:
    """A row's rFID at each NFE of the sweep ("—" where it was not measured), or a one-pass decoder's one rFID."""
    if len(by_nfe) == 1:
        return f"{next(iter(by_nfe.values())):.1f} (one pass)"
    return " / ".join(f"{by_nfe[str(nfe)]:.1f}" if str(nfe) in by_nfe else "—" for nfe in sweep)


def render_table(rows: list[dict], claim: list[dict], meta: dict, floor: dict | None = None) -> str:
    # Without a sweep the rFID column says it all: no sweep column.
    sweep = swept_nfes(rows)
    sweep_header = f"rFID (NFE {' / '.join(map(str, sweep))}) | " if sweep else ""
    scales = sorted({scale for row in rows for scale in row.get("gfid_by_cfg", {})}, key=float)
    resolutions = sorted({px for row in rows for px in row.get("by_resolution", {})}, key=int)
    lines = [f"# Reproduction: {meta['preset']}", "",
             f"Command: `{meta['command']}`  ", f"Machine: {meta['machine']}  ",
             f"Date: {meta['date']}; {meta['compute_minutes']:.1f} min in the pipeline steps "
             f"({meta['wall_minutes']:.1f} min in the last invocation, sweeps included)", "",
             "A row trained with one seed shows 95% intervals over the images in brackets: FID ± 1.96 bootstrap "
             "standard deviations, PSNR/LPIPS Student t, images/s the range over the timed batches. A row trained "
             "with several seeds shows the mean over seeds and, in parentheses, each seed's value.", "",
             f"| tokenizer | latent | seeds | {sweep_header}rFID | PSNR | LPIPS (VGG) | gFID | " +
             "".join(f"gFID, CFG {scale} | " for scale in scales) + "images/s: DiT / decode / end-to-end |",
             "|---|---|---|" + "---|" * bool(sweep) + "---|---|---|---|" + "---|" * len(scales) + "---|"]
    for row in rows:
        rfid = f"{sweep_cell(row['rfid_by_nfe'], sweep)} | " if sweep else ""
        speed = row["images_per_s"]
        guided = "".join(f"{cell(row, 'gfid', source=lambda run, s=scale: run.get('gfid_by_cfg', {}).get(s, {}))} | "
                         for scale in scales)
        speeds = "n/a" if speed is None else (f"{speed['ldm']:.1f} / {speed['decode']:.1f} / "
                                              f"{format_interval(speed['total'], speed['range']['total'])}")
        lines.append(f"| {row['label']} | {row['compression']} ({'×'.join(map(str, row['latent_shape']))}) | "
                     f"{len(row.get('runs') or [row])} | {rfid}{cell(row, 'rfid')} | {cell(row, 'psnr', '.2f')} | "
                     f"{cell(row, 'lpips', '.3f')} | {cell(row, 'gfid')} | {guided}{speeds} |")
    if any(row.get("noise_std") is not None for row in rows):
        lines += ["", "Decoder diagnostics (the same images): noise σ is the per-pixel standard deviation between "
                      "decodes of the same latents with other noise (grey levels), seed-mean PSNR the PSNR of their "
                      "average, chroma HF the high-frequency colour energy of the reconstructions over the originals'; "
                      "LPIPS with AlexNet beside the VGG above" + "".join(f"; rFID and PSNR at {px} px, the "
                      f"tokenizers trained at {rows[0]['resolution']} px" for px in resolutions[:1]) + ".", "",
                  "| tokenizer | noise σ | seed-mean PSNR | chroma HF | LPIPS (Alex) | " +
                  "".join(f"rFID at {px} px | PSNR at {px} px | " for px in resolutions),
                  "|---|---|---|---|---|" + "---|---|" * len(resolutions)]
        for row in rows:
            at = "".join(f"{cell(row, 'rfid', source=lambda run, p=px: run.get('by_resolution', {}).get(p, {}))} | "
                         f"{cell(row, 'psnr', '.2f', lambda run, p=px: run.get('by_resolution', {}).get(p, {}))} | "
                         for px in resolutions)
            lines.append(f"| {row['label']} | {cell(row, 'noise_std', '.2f')} | {cell(row, 'seed_mean_psnr', '.2f')} | "
                         f"{cell(row, 'chroma_hf_ratio', '.2f')} | {cell(row, 'lpips_alex', '.3f')} | {at}")
    settings = rows[0]["generation_settings"] if rows else {}
    subset = rows[0]["reconstruction_subset"] if rows else {}
    generation = ("gFID: not measured (the runs' pipeline.steps leave out the DiT)."
                  if settings.get("num_samples") is None else
                  f"gFID: {settings.get('num_samples')} samples, {settings.get('sampler')} {settings.get('steps')} "
                  f"steps, CFG {settings.get('cfg_scale')}, decoder NFE {settings.get('decoder_nfe')}, reference "
                  f"{settings.get('reference')}.")
    lines += ["", f"Reconstruction: {subset.get('images')} of {subset.get('of')} {subset.get('split')} images "
                  f"({subset.get('selection')}), the same images for every tokenizer; rFID/PSNR/LPIPS at the "
                  f"pipeline's decoder NFE. {generation}", ""]
    if meta.get("missing_runs"):
        lines += [f"Not yet finished, so not in this table: {', '.join(meta['missing_runs'])}.", ""]
    if floor:
        lines += [f"Floor: {floor['num_images']} real validation images (class-stratified) score FID "
                  f"{format_interval(floor['fid'], floor['fid_ci95'])} against the same reference: the best gFID possible "
                  f"at this sample count.", ""]
    if claim:
        lines += ["## Claims", "",
                  "Computed, never written by hand: reproduced where the 95% interval of the difference (ours − "
                  "baseline; throughput: the ratio) excludes no change in the paper's direction, contradicted where it "
                  "excludes it the other way, inconclusive otherwise. With several seeds the interval is over the "
                  "per-seed paired differences and the images (pipelines/claims.py); with one seed it is over the "
                  "images alone and ignores training-seed variance. A claim of equal quality names a margin, fixed "
                  "in its preset: the largest change in the worse direction that counts as the same; it is "
                  "reproduced where the interval excludes a worse change than that.", "",
                  "| claim | ours vs baseline | quantity | seeds | change [95% interval] | per-seed changes | paper | "
                  "verdict |", "|---|---|---|---|---|---|---|---|"]
        for item in claim:
            unit = "×" if item["metric"] == "throughput" else ""
            digits = 3 if item["metric"] in ("lpips", "throughput") else 2
            per_seed = " / ".join(f"{value:.{digits}f}" for value in item.get("per_seed") or []) or "—"
            margin = "" if item.get("margin") is None else f"; margin {item['margin']:g}"
            lines.append(f"| {item['claim'].replace('_', ' ')} | {item['ours']} vs {item['baseline']} | "
                         f"{item['metric']} ({item['paper_direction']} is better{margin}) | {item.get('seeds', 1)} | "
                         f"{format_interval(item['estimate'], item['ci95'], f'.{digits}f')}{unit} | {per_seed} | "
                         f"{item['paper']} | **{item['verdict']}** |")
    return "\n".join(lines) + "\n"


def plot_gfid_against_throughput(rows: list[dict], out: Path) -> None:
    """Each run's gFID with its interval over the samples, at its row's throughput (the first run's: speed does not
    depend on the training seed)."""
    figure, axis = plt.subplots(figsize=(5, 4))
    for index, row in enumerate(rows):
        speed = row["images_per_s"]["total"]
        for run in row.get("runs") or [row]:
            low, high = run["gfid_ci95"] or (run["gfid"], run["gfid"])
            axis.errorbar(speed, run["gfid"], yerr=[[run["gfid"] - low], [high - run["gfid"]]], fmt="o", capsize=3,
                          color=f"C{index}")
        axis.annotate(row["label"], (speed, row["gfid"]), fontsize=8)
    axis.set_xlabel("end-to-end images/s (DiT sampling + decoding)")
    axis.set_ylabel("gFID, 95% interval (lower is better)")
    axis.set_title("gFID vs throughput")
    save_figure(figure, out / "gfid_vs_throughput.png")


def plot(rows: list[dict], out: Path) -> None:
    generated = [row for row in rows if row["gfid"] is not None and row["images_per_s"] is not None]
    if generated:
        plot_gfid_against_throughput(generated, out)
    if swept_nfes(rows):  # without a sweep every row would draw as a one-pass decoder's flat line
        plot_rfid_against_nfe(rows, out)


def plot_rfid_against_nfe(rows: list[dict], out: Path) -> None:
    """Seed 0's rFID of each row against the decoder NFE; a one-pass decoder as a flat dashed line."""
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
    save_figure(figure, out / "rfid_vs_nfe.png")


def machine() -> str:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return summary(describe(device))


def main(cfg: DictConfig) -> dict:
    name, preset, extra = chosen_preset(cfg, "claims")  # a pilot's preset has rows but no claims
    return reproduce(cfg, name, selected_rows(preset, "tokenizers", name), extra)


def run_steps(cfg, preset: dict) -> list[str]:
    """The step folders of a finished run of a preset's row: the main job's and the sweeps'."""
    nfes = [] if cfg.tokenizer.kind == "vae" else [nfe for nfe in preset.get("nfe_sweep", []) if nfe != cfg.decode.nfe]
    scales = preset.get("cfg_sweep", []) if "sample" in cfg.pipeline.steps else []
    return [*cfg.pipeline.steps, *(f"reconstruct_nfe{nfe}" for nfe in nfes),
            *(f"reconstruct_{px}px" for px in preset.get("resolution_sweep", [])),
            *(f"{step}_cfg{scale:g}" for scale in scales for step in ("sample", "evaluate"))]


def train_and_measure(cfg, preset: dict) -> tuple[dict, Pipeline]:
    """Run (or resume) one run of a row, the main job and the preset's sweeps: (its record, its pipeline).
    `pipeline.steps=[tokenizer,reconstruct]` measures the reconstruction claims alone (no DiT, no guidance sweep)."""
    pipeline = Pipeline(cfg)
    cfg = pipeline.cfg  # with the tokenizer settings of the run that trained it, for a row given `tokenizer_run`
    report = pipeline.run()
    sweep = nfe_sweep(cfg, pipeline, preset.get("nfe_sweep", [cfg.decode.nfe]))
    resolutions = resolution_sweep(cfg, pipeline, preset.get("resolution_sweep", []))
    guided = guidance_sweep(cfg, pipeline, preset.get("cfg_sweep", []) if "sample" in cfg.pipeline.steps else [])
    return run_record(cfg, pipeline, report, sweep, resolutions, guided), pipeline


def finished_run(run_cfg, preset: dict) -> bool:
    """Whether every step the preset asks of the run has finished (false while the run whose tokenizer it takes has
    not finished training it)."""
    try:
        pipeline = Pipeline(run_cfg)
    except ConfigError:
        return False
    return all(finished_result(pipeline.folder(step)) is not None for step in run_steps(run_cfg, preset))


def reproduce(cfg: DictConfig, name: str, preset: dict, extra: list[str]) -> dict:
    """Run (or resume) every run of every row of `preset` (one per seed of a row's `seeds`), with the overrides
    `extra` on each, and write the results folder; returns what results.json holds. reproduce.train=false trains
    and measures nothing: it tabulates the runs that have finished and lists the others as missing."""
    check_claims(preset.get("claims"), name)  # before any run: a misspelt claim would otherwise fail hours later
    out = results_folder(cfg, name, extra)
    began = time.perf_counter()
    rows, missing, run_cfg = [], [], None
    for entry in preset["tokenizers"]:
        runs = []
        for seed in entry.get("seeds", [None]):
            run_cfg = run_config(preset, name, entry, extra, seed)
            if not cfg.reproduce.train and not finished_run(run_cfg, preset):
                missing.append(str(run_cfg.name))
                continue
            print(f"== {entry['label']}: {compression(run_cfg)} ({run_cfg.name})", flush=True)
            record, pipeline = train_and_measure(run_cfg, preset)
            run_cfg = pipeline.cfg
            runs.append(record)
            if len(runs) == 1:  # the grids of a row are its first run's
                for source, target in ((pipeline.folder("sample") / "grid.png", f"samples_{entry['slug']}.png"),
                                       (pipeline.folder("reconstruct") / f"reconstructions_nfe{run_cfg.decode.nfe}.png",
                                        f"reconstructions_{entry['slug']}.png")):
                    if source.is_file():
                        shutil.copyfile(source, out / target)
        if runs:
            rows.append(row_of(entry, run_cfg, runs))
    # The floor is what a gFID is read against: a reproduction of the reconstruction claims alone has none to read.
    floor = real_data_floor(run_cfg) if any(row["gfid"] is not None for row in rows) else None
    claim = claims({row["slug"]: row for row in rows}, preset.get("claims", {}), run_cfg.evaluate.bootstrap,
                   run_cfg.evaluate.subset_seed)
    meta = {"preset": name, "command": command_line(), "machine": machine(),
            "date": datetime.now().strftime("%Y-%m-%d %H:%M"), "wall_minutes": (time.perf_counter() - began) / 60,
            "compute_minutes": sum(sum(row["wall_seconds"].values()) for row in rows) / 60, "missing_runs": missing}
    results = {"meta": meta, "rows": rows, "claims": claim, "real_data_floor": floor}
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    (out / "table.md").write_text(render_table(rows, claim, meta, floor))
    plot(rows, out)
    print((out / "table.md").read_text())
    return results


if __name__ == "__main__":
    run_legacy_command("reproduce")
