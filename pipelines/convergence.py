"""stage=convergence: how fast does a DiT learn each tokenizer's latents? (DGAE's claim of faster convergence)

    python pipelines/run.py stage=convergence reproduce=dgae32

Every row of the preset (`tokenizers`, as in stage=reproduce; its first training seed) is the run stage=reproduce of
the same preset makes: it trains its tokenizer (or takes another run's, the row's `tokenizer_run`), caches its
latents and trains the DiT, here keeping the DiT checkpoint after each of `ldm.train.keep_steps` (the preset's
common settings; the last of them is ldm.train.steps). Each kept checkpoint is sampled and evaluated as the
pipeline's sample and evaluate steps do, in the step folders dit_<steps>_sample and dit_<steps>_evaluate of the
row's pipeline folder: gFID with its bootstrap interval; and the DiT's training loss near it, the mean of the losses
logged after the first half of the steps up to it.

Each of the preset's `convergence` comparisons ({baseline, ours}) asks how much of the baseline's training the DiT
on ours' latents needs to reach the gFID the baseline's DiT has at its last checkpoint (shared.metrics.intervals:
steps_to_match, gFID linear in log2 steps between checkpoints, the same rule for both rows). Every checkpoint of a
row samples the same labels and noise, so one bootstrap resample of the samples serves all of a row's checkpoints
and keeps their correlation; both rows sample the same labels, and take the same resample. The verdict is the usual
rule in DGAE's direction (a ratio below 1). One DiT per row: the interval holds no training-seed variance. The
real-data floor says how low a gFID can go at the sample count; each row's decoder floor, how low its DiT's can go
through its decoder: the same validation images encoded and decoded by the row's tokenizer (the pipeline's
reconstruct step, in the row's folder), against the same reference. Whether the samples show their class is put
in numbers by a nearest-centroid probe on the same Inception features (shared.metrics.class_probe: the share of a
checkpoint's samples nearest the reference centroid of the class they were sampled for), read against the share of
the floor's real images and of their decodes; it needs a reference of labelled images (the default).

`reproduce.train=false` trains nothing and measures the checkpoints every row has; before the last checkpoint
exists the comparison is marked partial (its level is the baseline's gFID at the last checkpoint measured). The
measurements' wall time joins each run folder's seconds.json under dit_<steps>_* (stage=reproduce leaves it out of
its compute time). A preset without comparisons (`convergence: []`) measures its rows alone. Writes
results/<PRESET>/ (or reproduce.out): convergence.md, convergence.json, convergence.png and each checkpoint's sample
grid (samples_<row>_<steps>.png), beside stage=reproduce's table of the preset.
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
import numpy as np  # noqa: E402
import torch  # noqa: E402
from omegaconf import DictConfig, OmegaConf  # noqa: E402

from pipelines.configs import command_line  # noqa: E402
from pipelines.pipeline import Pipeline  # noqa: E402
from pipelines.plots import save_figure  # noqa: E402
from pipelines.reproduce import compression, machine, open_preset, real_data_floor, run_config  # noqa: E402
from shared.data.images import build_image_dataset  # noqa: E402
from shared.errors import ConfigError  # noqa: E402
from shared.files import json_text  # noqa: E402
from shared.metrics.class_probe import class_centroids, covers_every_class, recognised_share  # noqa: E402
from shared.metrics.fid_bootstrap import FrechetBootstrap  # noqa: E402
from shared.metrics.intervals import bootstrap_counts, format_interval, steps_to_match, verdict  # noqa: E402
from shared.metrics.paired import fid_spread, flat_metrics  # noqa: E402
from shared.train.checkpoint import CheckpointDir  # noqa: E402


def dit_budgets(cfg: DictConfig) -> list[int]:
    """The DiT checkpoints to measure: ldm.train.keep_steps, whose last must be the DiT's training length."""
    budgets = sorted(int(steps) for steps in cfg.ldm.train.keep_steps)
    if len(budgets) < 2 or budgets[-1] != cfg.ldm.train.steps:
        raise ConfigError(f"stage=convergence measures the DiT checkpoints of ldm.train.keep_steps={budgets}: give "
                          f"the preset at least two, the last equal to ldm.train.steps={cfg.ldm.train.steps}")
    return budgets


def dit_checkpoint(pipeline: Pipeline, steps: int) -> Path:
    return CheckpointDir(pipeline.folder("ldm") / "checkpoints").path(steps)


def logged_losses(pipeline: Pipeline) -> list[tuple[int, float]]:
    """(step, loss) of every row the DiT's training logged."""
    log = pipeline.folder("ldm") / "metrics.jsonl"
    rows = [json.loads(line) for line in log.read_text().splitlines()] if log.is_file() else []
    return [(row["step"], row["loss"]) for row in rows if "loss" in row]


def measure(pipeline: Pipeline, steps: int, losses: list[tuple[int, float]]) -> dict:
    """Sample and evaluate the DiT checkpoint after `steps` steps, each in its own step folder; its training loss is
    the mean of `losses` (logged_losses) in (steps / 2, steps]."""
    samples, evaluation = pipeline.sample_and_evaluate(pipeline.cfg, dit_checkpoint(pipeline, steps),
                                                       f"dit_{steps}_sample", f"dit_{steps}_evaluate")
    near = [loss for step, loss in losses if steps / 2 < step <= steps]
    sampling = (f"{samples['sampler']} sampler, {samples['steps']} steps, guidance {samples['cfg_scale']:g}, "
                f"decoder NFE {samples['decoder_nfe']}")
    return {"steps": steps, "gfid": evaluation["fid"], "gfid_ci95": evaluation["fid_ci95"],
            "loss": float(np.mean(near)) if near else None, "samples": samples["num_samples"], "sampling": sampling,
            "grid": str(pipeline.folder(f"dit_{steps}_sample") / "grid.png"), "samples_file": samples["samples"],
            "sample_features": evaluation["sample_features"], "reference": evaluation["reference_path"]}


def reference_centroids(cfg: DictConfig, reference: str) -> np.ndarray | None:
    """(C, D) class centroids of the gFID `reference`'s Inception features (shared.metrics.class_probe), or None
    where the reference keeps no features, its images' labels cannot be read in the features' order (a stream, or
    a reference that is not the evaluate settings' cached subset) or it lacks a class (fewer images than classes)."""
    from shared.data.subsets import dataset_labels, evaluation_subset

    settings = cfg.evaluate
    with np.load(reference) as statistics:
        if not {"features", "subset"} <= set(statistics.files):
            return None
        features, record = statistics["features"], json.loads(str(statistics["subset"]))
    subset = evaluation_subset(cfg.data, settings.reference_split, settings.reference_images, settings.subset_seed)
    if subset.total is None or {**subset.record(), "images": len(features)} != record:
        return None
    dataset = build_image_dataset(cfg.data, settings.reference_split)
    labels = dataset_labels(dataset)
    labels = labels if subset.indices is None else labels[subset.indices]
    if not covers_every_class(labels, dataset.num_classes):
        return None
    return class_centroids(features, labels, dataset.num_classes)


def recognised_samples(measured: dict, centroids: np.ndarray) -> dict:
    """recognised_share of a checkpoint's samples, each for the class it was sampled for."""
    with np.load(measured["samples_file"]) as samples:
        labels = samples["arr_1"]  # (N,) the class of each sample, in the order of its features
    return recognised_share(np.load(measured["sample_features"]), labels, centroids)


def decoder_floor(pipeline: Pipeline, floor: dict, reference: str, centroids: np.ndarray | None) -> dict:
    """The gFID of a DiT that sampled exactly the latents of the real-data `floor`'s validation images: those images
    encoded and decoded by the row's tokenizer (the pipeline's reconstruct step, with the decoder settings the
    samples are decoded with), against the `reference` statistics, with its bootstrap spread. The DiT's samples pass
    through the same decoder, so no amount of DiT training brings its gFID far below this. With `centroids`, also
    the class probe's share of the decoded images ("recognised") and of their originals ("originals_recognised")."""
    from shared.data.subsets import dataset_labels
    from stage1_tokenizer.reconstruct import per_image_path

    reconstruction = pipeline.run_step("reconstruct", pipeline.run_reconstruct)
    if reconstruction["subset"] != floor["subset"]:
        raise ConfigError(f"{pipeline.folder('reconstruct')} reconstructed other validation images "
                          f"({reconstruction['subset']}) than the real-data floor's ({floor['subset']}): set "
                          f"reconstruct.num_images to the sample count, sample.num_per_class × the classes")
    with np.load(per_image_path(pipeline.folder("reconstruct"), reconstruction["decoder_nfe"])) as per_image:
        # (N, 2048) each; row i: validation image `index[i]` and its decode
        index, originals, decoded = per_image["index"], per_image["real_features"], per_image["fake_features"]
    with np.load(reference) as statistics:
        moments = (statistics["mu"], statistics["sigma"])
    settings = pipeline.cfg.evaluate
    fid = fid_spread(torch.from_numpy(decoded), reference=moments, bootstrap=settings.bootstrap,
                     seed=settings.subset_seed)
    result = {**flat_metrics({"fid": fid}), "decoder_nfe": reconstruction["decoder_nfe"]}
    if centroids is not None:
        labels = dataset_labels(build_image_dataset(pipeline.cfg.data, pipeline.cfg.reconstruct.split))[index]
        result.update(recognised=recognised_share(decoded, labels, centroids),
                      originals_recognised=recognised_share(originals, labels, centroids))
    return result


def gfid_replicates(row: dict, counts: np.ndarray) -> np.ndarray:
    """(R, K) gFIDs of the row's K checkpoints on the R resamples `counts` (R, n) of their samples."""
    with np.load(row["measurements"][0]["reference"]) as reference:
        statistics = (reference["mu"], reference["sigma"])
    weights = torch.as_tensor(counts, dtype=torch.float64)
    columns = []
    for measured in row["measurements"]:
        fids = FrechetBootstrap(np.load(measured["sample_features"]), reference=statistics)
        columns.append([fids.fid(w) for w in weights])
    return np.array(columns).T


def compare(ours: dict, base: dict, resamples: int, seed: int) -> dict:
    """steps_to_match of ours against the baseline, with the verdict on DGAE's direction (a ratio below 1)."""
    steps = [measured["steps"] for measured in base["measurements"]]
    sizes = {measured["samples"] for row in (ours, base) for measured in row["measurements"]}
    references = {measured["reference"] for row in (ours, base) for measured in row["measurements"]}
    if len(sizes) != 1 or len(references) != 1:
        raise ConfigError(f"{ours['label']} and {base['label']} were sampled with different sample counts or "
                          f"evaluated against different references: give both the same sample and evaluate settings")
    (size,) = sizes
    generator = np.random.default_rng(seed)
    counts = np.stack([bootstrap_counts(size, generator) for _ in range(resamples)])  # (R, samples)
    estimate = lambda row: np.array([measured["gfid"] for measured in row["measurements"]])  # noqa: E731
    found = steps_to_match(steps, estimate(ours), estimate(base), gfid_replicates(ours, counts),
                           gfid_replicates(base, counts))
    return {"ours": ours["slug"], "baseline": base["slug"], **found,
            "verdict": verdict([bound - 1 for bound in found["ratio_ci95"]], "lower")}


def render(rows: list[dict], comparisons: list[dict], floor: dict, meta: dict) -> str:
    labels = {row["slug"]: row["label"] for row in rows}
    lines = [f"# DiT convergence: {meta['preset']}", "", f"Command: `{meta['command']}`  ",
             f"Machine: {meta['machine']}  ",
             f"Date: {meta['date']}; {meta['wall_minutes']:.1f} min in the last invocation", "",
             f"The same DiT ({meta['dit']}) trained on each row's latents (one run per row, its first training "
             f"seed), measured at each kept checkpoint on {meta['samples']} samples ({meta['sampling']}) against the "
             f"same reference: gFID with its 95% bootstrap interval, and the mean training loss logged over the second "
             f"half of the steps up to the checkpoint. Floor: {floor['num_images']} real validation images score FID "
             f"{format_interval(floor['fid'], floor['fid_ci95'])}, the lowest gFID this sample count can show. "
             f"Decoder floor: the same images encoded and decoded by the row's tokenizer, against the same reference: "
             f"the gFID of a DiT that sampled exactly their latents, the lowest its DiT's samples, decoded the same "
             f"way, can come near.", "",
             "| row | latent | decoder floor | " +
             " | ".join(f"{steps:,} steps: gFID / loss" for steps in meta["measured_steps"]) + " |",
             "|---|---|---|" + "---|" * len(meta["measured_steps"])]
    for row in rows:
        cells = [f"{format_interval(m['gfid'], m['gfid_ci95'])} / "
                 f"{'n/a' if m['loss'] is None else format(m['loss'], '.4f')}" for m in row["measurements"]]
        decoded = row["decoder_floor"]
        lines.append(f"| {row['label']} | {row['compression']} | "
                     f"{format_interval(decoded['fid'], decoded['fid_ci95'])} | " + " | ".join(cells) + " |")
    if meta["partial"]:
        lines += ["", f"**Partial**: the DiTs have not reached {meta['budgets'][-1]:,} steps yet" + (
            f"; the level below is the baseline's gFID at {meta['measured_steps'][-1]:,} steps, and the verdicts will "
            f"change." if comparisons else ".")]
    if comparisons:
        lines += comparison_section(comparisons, labels)
    if probed(rows):
        lines += class_section(rows, meta)
    lines += ["", "## Samples", "", "The first samples of each class, one row per class, at each checkpoint:", "",
              "| row | " + " | ".join(f"{steps:,} steps" for steps in meta["measured_steps"]) + " |",
              "|---|" + "---|" * len(meta["measured_steps"])]
    for row in rows:
        lines.append(f"| {row['label']} | " + " | ".join(f"![]({grid_name(row['slug'], m['steps'])})"
                                                         for m in row["measurements"]) + " |")
    return "\n".join(lines) + "\n"


def comparison_section(comparisons: list[dict], labels: dict[str, str]) -> list[str]:
    """The markdown lines of the steps-to-match table, a row per comparison."""
    lines = ["", "## How much of the baseline's training does ours need?", "",
             "The level is the baseline's gFID at its last checkpoint; each row's steps to reach it are "
             "interpolated linearly in log2 steps between checkpoints (shared.metrics.intervals: steps_to_match). "
             "Ratio: ours' steps over the baseline's; below 1 ours converges faster (DGAE's claim). Its 95% interval "
             "comes from resamples of the samples shared by every checkpoint of a row; ∞ where ours does not reach "
             "the level within the budget in enough resamples to exclude never reaching it. Verdict: reproduced where "
             "the interval lies below 1, contradicted where above, inconclusive otherwise. No training-seed "
             "variance: one DiT per row.", "",
             "| ours vs baseline | level (baseline's last gFID) | steps to it: ours / baseline | "
             "ratio [95% interval] | resamples reaching it | verdict |", "|---|---|---|---|---|---|"]
    for item in comparisons:
        reached = "not reached" if item["steps"] is None else (
            f"≤ {item['steps']:,.0f} (the first checkpoint)" if item["at_first_budget"] else f"{item['steps']:,.0f}")
        lines.append(f"| {labels[item['ours']]} vs {labels[item['baseline']]} | {item['level']:.1f} | {reached} / "
                     f"{item['baseline_steps']:,.0f} | "
                     f"{format_interval(item['ratio'], item['ratio_ci95'], '.2f')} | {item['reached']:.0%} | "
                     f"**{item['verdict']}** |")
    return lines


def probed(rows: list[dict]) -> bool:
    """Whether the class probe measured every row (a reference of labelled images)."""
    return all("recognised" in row["decoder_floor"] for row in rows)


def share_cell(probe: dict) -> str:
    return format_interval(probe["share"], probe["ci95"], ".0%")


def class_section(rows: list[dict], meta: dict) -> list[str]:
    """The markdown lines of the class probe's table: the share recognised of each row's samples at each checkpoint
    and of its decodes of the floor's images."""
    originals = rows[0]["decoder_floor"]["originals_recognised"]  # the same images in every row (decoder_floor)
    lines = ["", "## Do the samples show their class?", "",
             "A nearest-centroid probe on the same Inception features (shared.metrics.class_probe): the share of "
             "images whose feature lies nearest the centroid, over the reference images, of their class (for a "
             "sample, the class it was sampled for), with its 95% Wilson interval. Chance is "
             f"{1 / len(originals['per_class']):.0%}; the floor's {originals['n']} real validation images score "
             f"{share_cell(originals)}, the most the probe recognises of real images. Decodes: the same images through "
             "the row's tokenizer.", "",
             "| row | decodes | " + " | ".join(f"{steps:,} steps" for steps in meta["measured_steps"]) + " |",
             "|---|---|" + "---|" * len(meta["measured_steps"])]
    for row in rows:
        lines.append(f"| {row['label']} | {share_cell(row['decoder_floor']['recognised'])} | " +
                     " | ".join(share_cell(m["recognised"]) for m in row["measurements"]) + " |")
    return lines


def grid_name(slug: str, steps: int) -> str:
    return f"samples_{slug}_{steps}.png"


def error_bars(values: np.ndarray, intervals: list[list[float]]) -> list[np.ndarray]:
    bounds = np.array(intervals).T
    return [values - bounds[0], bounds[1] - values]


def plot(rows: list[dict], comparisons: list[dict], floor: dict, out: Path) -> None:
    """gFID (with intervals) and training loss of every row against DiT steps, and the class probe's share where it
    was measured; each comparison's level dashed grey, each row's decoder floor (and its decodes' share)
    dash-dotted in the row's colour, the real images' floor and share dotted black."""
    with_probe = probed(rows)
    figure, axes = plt.subplots(1, 3 if with_probe else 2, figsize=(15 if with_probe else 10, 3.8))
    gfid_axis, loss_axis = axes[:2]
    for index, row in enumerate(rows):
        steps = [m["steps"] for m in row["measurements"]]
        gfids = np.array([m["gfid"] for m in row["measurements"]])
        drawn = gfid_axis.errorbar(steps, gfids, yerr=error_bars(gfids, [m["gfid_ci95"] for m in row["measurements"]]),
                                   marker="o", capsize=3, label=row["label"])
        colour = drawn.lines[0].get_color()
        # one legend entry for all the rows' floors (each in its row's colour), so that the legend leaves the curves be
        gfid_axis.axhline(row["decoder_floor"]["fid"], linestyle="-.", linewidth=0.8, color=colour,
                          label="decoder floors" if index == 0 else None)
        losses = [m["loss"] for m in row["measurements"]]
        if None not in losses:
            loss_axis.plot(steps, losses, marker="o", color=colour, label=row["label"])
        if with_probe:
            shares = np.array([m["recognised"]["share"] for m in row["measurements"]])
            axes[2].errorbar(steps, shares, yerr=error_bars(shares, [m["recognised"]["ci95"] for m in
                                                                     row["measurements"]]),
                             marker="o", capsize=3, color=colour, label=row["label"])
            axes[2].axhline(row["decoder_floor"]["recognised"]["share"], linestyle="-.", linewidth=0.8, color=colour,
                            label="decodes of real images" if index == 0 else None)
    for item in comparisons:
        gfid_axis.axhline(item["level"], linestyle="--", color="gray", linewidth=0.8)
    gfid_axis.axhline(floor["fid"], linestyle=":", color="black", linewidth=0.8, label="real-data floor")
    labels = [(gfid_axis, "gFID (95% interval)"), (loss_axis, "DiT training loss")]
    if with_probe:
        originals = rows[0]["decoder_floor"]["originals_recognised"]
        axes[2].axhline(originals["share"], linestyle=":", color="black", linewidth=0.8, label="real images")
        axes[2].axhline(1 / len(originals["per_class"]), linestyle="--", color="gray", linewidth=0.8, label="chance")
        labels.append((axes[2], "samples recognised by class (95%)"))
    for axis, label in labels:
        axis.set_xscale("log", base=2)
        axis.set_xlabel("DiT training steps")
        axis.set_ylabel(label)
        axis.legend(fontsize=8)
    save_figure(figure, out / "convergence.png")


def main(cfg: DictConfig) -> dict:
    name, preset, extra, out = open_preset(cfg, "convergence")
    began = time.perf_counter()
    configs = {entry["slug"]: run_config(preset, name, entry, extra, entry.get("seeds", [None])[0])
               for entry in preset["tokenizers"]}
    budgets = {slug: dit_budgets(run_cfg) for slug, run_cfg in configs.items()}
    if len({tuple(steps) for steps in budgets.values()}) != 1:
        raise ConfigError(f"the rows of {name} keep different DiT checkpoints {budgets}: set ldm.train.keep_steps in "
                          f"the preset's common settings")
    budgets = next(iter(budgets.values()))
    pipelines = {}
    for entry in preset["tokenizers"]:  # in order: a row may take the tokenizer a row above it trains
        slug = entry["slug"]
        pipelines[slug] = Pipeline(OmegaConf.merge(configs[slug],
                                                   {"pipeline": {"steps": ["tokenizer", "cache", "ldm"]}}))
        if cfg.reproduce.train:
            print(f"== {entry['label']} ({configs[slug].name}): a DiT of {budgets[-1]:,} steps", flush=True)
            pipelines[slug].run()
        else:
            pipelines[slug].check_config()  # measuring writes into the run folder: it must be this preset's run
    measured = [steps for steps in budgets if all(dit_checkpoint(p, steps).is_file() for p in pipelines.values())]
    if len(measured) < 2:
        raise ConfigError(f"fewer than two of the DiT checkpoints {budgets} exist in every row: run without "
                          f"reproduce.train=false to train them")
    first = next(iter(pipelines.values())).cfg
    floor = real_data_floor(first)
    rows, centroids = [], {}
    for entry in preset["tokenizers"]:
        pipeline = pipelines[entry["slug"]]
        losses = logged_losses(pipeline)
        measurements = [measure(pipeline, steps, losses) for steps in measured]
        reference = measurements[0]["reference"]
        if reference not in centroids:
            centroids[reference] = reference_centroids(pipeline.cfg, reference)
        if centroids[reference] is not None:
            for measurement in measurements:
                measurement["recognised"] = recognised_samples(measurement, centroids[reference])
        rows.append({"label": entry["label"], "slug": entry["slug"], "compression": compression(pipeline.cfg),
                     "measurements": measurements,
                     "decoder_floor": decoder_floor(pipeline, floor, reference, centroids[reference])})
    by_slug = {row["slug"]: row for row in rows}
    comparisons = []
    for roles in preset["convergence"]:
        if not {roles["ours"], roles["baseline"]} <= set(by_slug):
            raise ConfigError(f"the preset {name} compares {roles['ours']} with {roles['baseline']}: keep both rows")
        comparisons.append(compare(by_slug[roles["ours"]], by_slug[roles["baseline"]], first.evaluate.bootstrap,
                                   first.evaluate.subset_seed))
    meta = {"preset": name, "command": command_line(), "machine": machine(),
            "date": datetime.now().strftime("%Y-%m-%d %H:%M"), "wall_minutes": (time.perf_counter() - began) / 60,
            "budgets": budgets, "measured_steps": measured, "partial": measured != budgets,
            "samples": rows[0]["measurements"][0]["samples"],
            "sampling": "; ".join(dict.fromkeys(m["sampling"] for row in rows for m in row["measurements"])),
            "dit": f"depth {first.ldm.depth}, width {first.ldm.hidden_size}, patch {first.ldm.patch_size}, "
                   f"{first.ldm.train.batch_size} latents per step"}
    results = {"meta": meta, "rows": rows, "comparisons": comparisons, "real_data_floor": floor}
    (out / "convergence.json").write_text(json_text(results))
    (out / "convergence.md").write_text(render(rows, comparisons, floor, meta))
    plot(rows, comparisons, floor, out)
    for row in rows:
        for measurement in row["measurements"]:
            if Path(measurement["grid"]).is_file():
                shutil.copyfile(measurement["grid"], out / grid_name(row["slug"], measurement["steps"]))
    print((out / "convergence.md").read_text())
    return results
