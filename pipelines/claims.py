"""The paper's claims on the rows of a reproduction, each with the interval of its difference and a computed verdict.

A row is one tokenizer setting; it holds one run per training seed (`runs`; a row without them is its own single
run). Two rows are compared seed by seed: seed s of both was trained on the same data order from the same encoder
initialisation, so the per-seed differences d_s pair up, and every run was measured on the same validation images.
The interval of mean_s d_s (shared.metrics.intervals.seeded_difference) holds the spread of d_s over seeds and the
variance that measuring on a sample of images (or of generated samples) adds:

- per-image metrics (PSNR, LPIPS): d_s the mean over images of the paired differences; the evaluation variance that
  of the mean over images of the seed-averaged per-image difference;
- rFID (not a mean over images): the same bootstrap resamples of the images for every run, d_s the FID difference
  and the evaluation variance the variance over resamples of the seed-averaged difference;
- gFID: each run's samples are its own, so their bootstrap variances add up;
- throughput: the ratio of the first paired runs, with the widest ratio of their ranges over timed batches (speed
  does not depend on the training seed).

With one seed per row the interval holds the evaluation variance alone, and the claim says so (`seeds`: 1).

A claim of equal quality (DGAE's "the same quality with half the channels") is a non-inferiority claim: its preset
entry gives each metric a `margin`, the largest change in the worse direction that still counts as the same, and
the verdict is the usual rule on the interval moved by the margin: reproduced where the interval excludes a change
worse than the margin, contradicted where it lies wholly beyond it. A preset entry names its kind of claim with
`claim:` when its key is not one (two comparisons of one kind need two keys).
"""
from __future__ import annotations

import numpy as np

from shared.errors import ConfigError
from shared.metrics.intervals import (paired_image_differences, replicate_evaluation_variance, seeded_difference,
                                      seeded_difference_of_differences, verdict)

# The paper's direction for each compared quantity (ours − baseline): what "reproduced" means.
PAPER_DIRECTION = {"gfid": "lower", "gfid_cfg": "lower", "rfid": "lower", "psnr": "higher", "lpips": "lower",
                   "throughput": "higher"}
PER_IMAGE = ("psnr", "lpips")
SAMPLE_FILES = {"gfid": "sample_features", "gfid_cfg": "sample_features_cfg"}  # the files a gFID is computed from

# The paper's numbers behind each claim (SPEC.md, ImageNet 256 px; Fig. 2 and Table 1 at 128 px training).
PAPER = {
    "equal_compression": {"rfid": "f8: SD-VAE 0.74 → ε-VAE (M) 0.47", "psnr": "f8: 25.68 → 27.65 dB",
                          "lpips": "not reported", "gfid": "f8: SD-VAE 11.63 → ε-VAE (M) 9.39 (−19%)",
                          "gfid_cfg": "f8 with guidance: SD-VAE 3.51 → ε-VAE (M) 2.83"},
    "speedup": {"throughput": "ε-VAE (M) f16 1192 vs SD-VAE f8 522 images/1000 s: 2.28×",
                "gfid": "ε-VAE (M) f16 10.68 vs SD-VAE f8 11.63"},
    "compression_trend": {"rfid": "Fig. 2 (right): the rFID gap to the VAE widens from f8 to f16 and f32",
                          "psnr": "not reported per factor"},
    "resolution": {"rfid": "Table 1, trained at 128 px, measured at 256 px: SD-VAE 1.21 → ε-VAE-SD (B) 0.65",
                   "psnr": "not reported", "lpips": "not reported"},
    # DGAE's abstract (SPEC.md): a diffusion decoder guided by a conventional one; the same quality with half the
    # latent channels. No numbers at this scale.
    "dgae_design": {metric: "DGAE: its guided decoder reconstructs better than a plain diffusion decoder at the "
                            "same latent size" for metric in ("rfid", "psnr", "lpips", "gfid")},
    "half_channels": {metric: "DGAE: the same quality with a 2× smaller latent (half the channels)"
                      for metric in ("rfid", "psnr", "lpips", "gfid")},
}
CLAIM_METRICS = {"equal_compression": ["rfid", "psnr", "lpips", "gfid", "gfid_cfg"], "speedup": ["throughput", "gfid"],
                 "compression_trend": ["rfid", "psnr"], "resolution": ["rfid", "psnr", "lpips"],
                 "dgae_design": ["rfid", "psnr", "lpips", "gfid"], "half_channels": ["rfid", "psnr", "lpips", "gfid"]}


def runs_of(row: dict) -> list[dict]:
    """The row's runs, one per training seed (a row recorded without them is its own single run)."""
    return row.get("runs") or [row]


def paired_runs(ours: dict, base: dict) -> list[tuple[dict, dict]]:
    """(ours, baseline) runs of the seeds both rows trained, in the baseline's order."""
    by_seed = {run.get("seed"): run for run in runs_of(ours)}
    pairs = [(by_seed[run.get("seed")], run) for run in runs_of(base) if run.get("seed") in by_seed]
    if not pairs:
        raise ConfigError(f"{ours['label']} and {base['label']} share no training seed to compare")
    return pairs


def _per_image_files(pairs: list[tuple[dict, dict]], key: str, labels: tuple[str, str]) -> list[tuple[dict, dict]]:
    """The per-image files (npz `files[key]`) of every pair, all on the same validation images."""
    loaded = [tuple(dict(np.load(run["files"][key])) for run in pair) for pair in pairs]
    index = loaded[0][1]["index"]
    for ours, base in loaded:
        if not (np.array_equal(ours["index"], index) and np.array_equal(base["index"], index)):
            raise ConfigError(f"{labels[0]} and {labels[1]} were reconstructed on different images: give them the "
                              f"same reconstruct.num_images and evaluate.subset_seed")
    return loaded


def per_seed_replicates(metric: str, pairs: list[tuple[dict, dict]], labels: tuple[str, str], *, key: str,
                        weights: list | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(ours, baseline) values of `metric` on the files `key` of each paired run: per-image metrics (S, N), one
    value per image; rFID (S, 1 + R), the FID on all images and then on each bootstrap resample `weights`."""
    from shared.metrics.fid_bootstrap import FrechetBootstrap

    files = _per_image_files(pairs, key, labels)
    if metric in PER_IMAGE:
        return tuple(np.stack([pair[side][metric] for pair in files]) for side in (0, 1))
    sides = []
    for side in (0, 1):
        fids = [FrechetBootstrap(pair[side]["fake_features"], real=pair[side]["real_features"]) for pair in files]
        sides.append(np.array([[fid.fid(), *(fid.fid(w) for w in weights)] for fid in fids]))
    return tuple(sides)


def _interval_parts(metric: str, pairs, labels, *, key: str, weights) -> tuple[np.ndarray, float]:
    """(d (S,), evaluation variance of mean_s d_s) of a per-image metric or rFID."""
    ours, base = per_seed_replicates(metric, pairs, labels, key=key, weights=weights)
    if metric in PER_IMAGE:
        return paired_image_differences(ours, base)
    differences = ours - base  # (S, 1 + R)
    return differences[:, 0], replicate_evaluation_variance(differences[:, 1:])


def _gfid_parts(pairs, labels, resamples: int, seed: int, *, features: str) -> tuple[np.ndarray, float]:
    """gFID: per-seed differences and the summed bootstrap variances of the runs' independent sample sets."""
    from shared.metrics.fid_bootstrap import FrechetBootstrap

    ours0, base0 = pairs[0]
    if ours0["files"]["reference"] != base0["files"]["reference"]:
        raise ConfigError(f"{labels[0]} and {labels[1]} were evaluated against different references")
    with np.load(base0["files"]["reference"]) as reference:
        statistics = (reference["mu"], reference["sigma"])
    differences, variance = [], 0.0
    for pair in pairs:
        spreads = [FrechetBootstrap(np.load(run["files"][features]), reference=statistics).spread(resamples, seed)
                   for run in pair]
        differences.append(spreads[0]["fid"] - spreads[1]["fid"])
        variance += sum(spread["std"] ** 2 for spread in spreads)
    return np.array(differences), variance / len(pairs) ** 2


def resample_weights(pairs, key: str, labels, resamples: int, seed: int) -> list:
    """The bootstrap resamples of the validation images shared by every run's rFID (counts (N,) each)."""
    from shared.metrics.fid_bootstrap import FrechetBootstrap

    first = _per_image_files(pairs[:1], key, labels)[0][0]
    images = FrechetBootstrap(first["fake_features"], real=first["real_features"])
    generator = np.random.default_rng(seed)
    return [images.resample(generator) for _ in range(resamples)]


def parts(metric: str, ours: dict, base: dict, resamples: int, seed: int, key: str = "per_image"):
    """(d (S,), evaluation variance) of `metric` between two rows, seed by seed."""
    labels = (ours["label"], base["label"])
    pairs = paired_runs(ours, base)
    if metric in ("gfid", "gfid_cfg"):
        return _gfid_parts(pairs, labels, resamples, seed, features=SAMPLE_FILES[metric])
    weights = resample_weights(pairs, key, labels, resamples, seed) if metric == "rfid" else None
    return _interval_parts(metric, pairs, labels, key=key, weights=weights)


def throughput_ratio(ours: dict, base: dict) -> dict:
    """ours / baseline images/s of the first paired runs, with the widest ratio of their timed-batch ranges."""
    ours_run, base_run = paired_runs(ours, base)[0]
    ours_speed, base_speed = ours_run["images_per_s"], base_run["images_per_s"]
    ours_range, base_range = ours_speed["range"]["total"], base_speed["range"]["total"]
    return {"estimate": ours_speed["total"] / base_speed["total"], "seeds": 1,
            "ci95": [ours_range[0] / base_range[1], ours_range[1] / base_range[0]]}


def compare(ours: dict, base: dict, metrics: list[str], resamples: int, seed: int,
            key: str = "per_image") -> dict[str, dict]:
    """{metric: seeded_difference(...)} of ours − baseline (throughput: ours / baseline) for each of `metrics`
    both rows measured."""
    result = {}
    runs = runs_of(ours) + runs_of(base)
    for metric in metrics:
        if metric == "throughput":
            if all(run["images_per_s"] is not None for run in runs):
                result[metric] = throughput_ratio(ours, base)
        elif metric in SAMPLE_FILES and not all(SAMPLE_FILES[metric] in run["files"] for run in runs):
            continue  # a run that measured no generation (pipeline.steps without the DiT)
        else:
            differences, evaluation_variance = parts(metric, ours, base, resamples, seed, key)
            result[metric] = {**seeded_difference(differences, evaluation_variance),
                              "per_seed": differences.tolist()}
    return result


def trend(lower: tuple[dict, dict], higher: tuple[dict, dict], metrics: list[str], resamples: int,
          seed: int) -> dict[str, dict]:
    """{metric: interval} of (ours − baseline at the higher compression) − (ours − baseline at the lower): the
    difference of two seeded differences; both are measured on the same validation images, so an rFID resample
    draws the same images for all four rows."""
    result = {}
    for metric in metrics:
        high, low, evaluation_variance = _trend_parts(metric, lower, higher, resamples, seed)
        result[metric] = seeded_difference_of_differences(high, low, evaluation_variance)
    return result


def _trend_parts(metric: str, lower: tuple[dict, dict], higher: tuple[dict, dict], resamples: int, seed: int):
    """(d at the higher compression (S,), d at the lower (S',), the evaluation variance of the difference of their
    seed means: per image, or per rFID resample, the same images for all four rows, subtracted before the
    variance)."""
    pairs_low, pairs_high = paired_runs(*lower), paired_runs(*higher)
    labels = (f"{lower[0]['label']} / {higher[0]['label']}", f"{lower[1]['label']} / {higher[1]['label']}")
    weights = resample_weights(pairs_low, "per_image", labels, resamples, seed) if metric == "rfid" else None
    low_ours, low_base = per_seed_replicates(metric, pairs_low, labels, key="per_image", weights=weights)
    high_ours, high_base = per_seed_replicates(metric, pairs_high, labels, key="per_image", weights=weights)
    if low_ours.shape[1] != high_ours.shape[1]:
        raise ConfigError(f"{labels[0]} and {labels[1]} were reconstructed on different images")
    low, high = low_ours - low_base, high_ours - high_base
    if metric in PER_IMAGE:
        joint = high.mean(axis=0) - low.mean(axis=0)  # (N,) per image
        return high.mean(axis=1), low.mean(axis=1), float(joint.var(ddof=1) / len(joint))
    joint = high[:, 1:].mean(axis=0) - low[:, 1:].mean(axis=0)  # (R,) per resample
    return high[:, 0], low[:, 0], float(joint.var(ddof=1))


def check_claims(spec: dict, name: str) -> None:
    """Refuse, before any run, a claim of no known kind, or a margin for a metric its claim does not measure or
    below zero (a misspelt margin would silently turn an equal-quality claim into a plain one)."""
    for key, roles in (spec or {}).items():
        if roles is None:
            continue
        kind = roles.get("claim", key)
        if kind not in PAPER:
            raise ConfigError(f"claims.{key} of the preset {name}: no claim of the kind {kind!r}; the kinds are "
                              f"{sorted(PAPER)}")
        margin = roles.get("margin", {})
        unknown = set(margin) - set(CLAIM_METRICS[kind])
        if unknown or any(value < 0 for value in margin.values()):
            raise ConfigError(f"claims.{key}.margin of the preset {name}: {margin} must give numbers >= 0 for "
                              f"metrics of {CLAIM_METRICS[kind]}")


def claims(rows: dict[str, dict], spec: dict, resamples: int = 200, seed: int = 0) -> list[dict]:
    """The paper's claims on the rows the preset names (chosen before any result), each with the interval of its
    difference and the verdict of shared.metrics.intervals.verdict: never written by hand."""
    check_claims(spec, "given")
    result = []
    for name, roles in spec.items():
        if roles is None:  # a preset that extends another drops an inherited claim by setting it to null
            continue
        kind = roles.get("claim", name)
        if kind == "compression_trend":
            low, high = roles["lower"], roles["higher"]  # the two compressions, each {baseline, ours}
            needed = [low["ours"], low["baseline"], high["ours"], high["baseline"]]
            if not set(needed) <= set(rows):
                continue
            measured = trend((rows[low["ours"]], rows[low["baseline"]]), (rows[high["ours"]], rows[high["baseline"]]),
                             CLAIM_METRICS[kind], resamples, seed)
            ours_label = f"({rows[high['ours']]['label']} − {rows[high['baseline']]['label']})"
            base_label = f"({rows[low['ours']]['label']} − {rows[low['baseline']]['label']})"
        else:
            if roles["baseline"] not in rows or roles["ours"] not in rows:
                continue
            ours, base = rows[roles["ours"]], rows[roles["baseline"]]
            key = f"per_image_{roles['resolution']}px" if kind == "resolution" else "per_image"
            measured = compare(ours, base, CLAIM_METRICS[kind], resamples, seed, key)
            ours_label, base_label = ours["label"], base["label"]
        for metric, interval in measured.items():
            # A ratio is compared with 1, a difference with 0; a non-inferiority claim with its margin on the worse
            # side (rFID: ours − baseline < +margin; PSNR: > −margin).
            margin = roles.get("margin", {}).get(metric)
            worse = 1.0 if PAPER_DIRECTION[metric] == "lower" else -1.0
            offset = (1.0 if metric == "throughput" else 0.0) + (0.0 if margin is None else worse * margin)
            shifted = None if interval["ci95"] is None else [bound - offset for bound in interval["ci95"]]
            result.append({"claim": name, "metric": metric, "ours": ours_label, "baseline": base_label, **interval,
                           "paper": PAPER[kind][metric], "paper_direction": PAPER_DIRECTION[metric],
                           "margin": margin, "verdict": verdict(shifted, PAPER_DIRECTION[metric])})
    return result
