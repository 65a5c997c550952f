"""The FID / speed-up reproduction: several tokenizers at equal budget, the same DiT on each, one table.

    python pipelines/reproduce.py preset=mini      # Imagenette 64 px on this machine's CPU (about an hour)
    python pipelines/reproduce.py preset=paper data.root=/data/imagenet   # ImageNet 256 px, GPU nodes

For every tokenizer of `configs/reproduce/<preset>.yaml` it runs the main job (stage=pipeline: train the tokenizer,
measure reconstructions, cache latents, train the DiT, sample, decode, evaluate), plus reconstructions at every
decoder NFE of the sweep. Then it writes to `results/<preset>/`: the Table-4-style table (table.md, results.json),
the paper's two claims computed from the rows the preset names, and plots (gFID vs throughput, rFID vs decoder NFE,
sample and reconstruction grids). Everything resumes: rerun the same command after an interruption.
Extra `key=value` arguments are Hydra overrides applied to every run.
"""
from __future__ import annotations

import json
import platform
import shutil
import sys
import time
from datetime import datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import matplotlib  # noqa: E402

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
from hydra import compose, initialize_config_dir  # noqa: E402
from omegaconf import OmegaConf  # noqa: E402

import pipelines.run  # noqa: E402,F401  (registers the ${repo_root:} resolver)
from pipelines.pipeline import Pipeline  # noqa: E402
from shared.errors import ConfigError  # noqa: E402
from stage1_tokenizer.reconstruct import reconstruct  # noqa: E402


def merge_overrides(base: list[str], changes: list[str]) -> list[str]:
    """`base` Hydra overrides with those whose key appears in `changes` replaced, then the new ones appended."""
    changed = {override.split("=", 1)[0] for override in changes}
    return [override for override in base if override.split("=", 1)[0] not in changed] + changes


def load_preset(name: str) -> dict:
    """configs/reproduce/<name>.yaml, or a preset file given by its path.

    A preset may name a `base` preset: it then takes everything from it, its own `common` overrides replacing
    the base's overrides of the same keys, and its other keys replacing the base's.
    """
    path = Path(name) if name.endswith(".yaml") else ROOT / "configs" / "reproduce" / f"{name}.yaml"
    if not path.is_file():
        presets = sorted(p.stem for p in path.parent.glob("*.yaml"))
        raise ConfigError(f"no reproduction preset {name!r} (configs/reproduce/{name}.yaml); choose from {presets}")
    preset = OmegaConf.to_container(OmegaConf.load(path), resolve=False)
    if "base" not in preset:
        return preset
    base = load_preset(preset.pop("base"))
    common = merge_overrides(base.get("common", []), preset.pop("common", []))
    return {**base, **preset, "common": common}


def run_config(preset: dict, preset_name: str, entry: dict, extra: list[str]):
    overrides = ["stage=pipeline", f"experiment={preset['experiment']}", f"tokenizer={entry['tokenizer']}",
                 f"name=reproduce_{preset_name}_{entry['slug']}", *preset["common"], *entry["overrides"], *extra]
    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base="1.3"):
        return compose(config_name="config", overrides=overrides)


def nfe_sweep(cfg, pipeline: Pipeline, nfes: list[int]) -> dict[int, dict]:
    """rFID/PSNR/LPIPS of the tokenizer at each decoder NFE (one pass for the VAE, which has no NFE)."""
    results = {}
    for nfe in (nfes if cfg.tokenizer.kind != "vae" else [cfg.decode.nfe]):
        path = pipeline.folder("reconstruct") / f"metrics_nfe{nfe}.json"
        if not path.is_file():
            swept = OmegaConf.merge(cfg, {"decode": {"nfe": nfe}})
            reconstruct(swept, pipeline.tokenizer_checkpoint(), run_dir=pipeline.folder("reconstruct"))
        results[nfe] = json.loads(path.read_text())
    return results


def real_data_floor(cfg) -> dict:
    """The gFID a perfect generator would get here: real validation images, as many per class as the samples,
    against the same reference. FID is biased upward at small sample counts, so the table's gFIDs are read
    against this floor, not against zero."""
    from shared.data.images import make_image_loader
    from shared.metrics.evaluate import reference_statistics
    from shared.metrics.fid import InceptionStatistics, frechet_distance
    from shared.metrics.inception import quantize_to_uint8
    from shared.runtime import resolve_device

    device = resolve_device(cfg.device)
    settings = cfg.evaluate
    mu_ref, sigma_ref = reference_statistics(cfg.data, settings.reference_split, settings.reference_images, device,
                                             Path(cfg.output_root) / "reference_stats", settings.batch_size)
    per_class = cfg.sample.num_per_class
    taken: dict[int, int] = {}
    stats = InceptionStatistics(device)
    for batch in make_image_loader(cfg.data, "val", settings.batch_size, train=False):
        keep = []
        for position, label in enumerate(batch["label"].tolist()):
            if taken.get(label, 0) < per_class:
                taken[label] = taken.get(label, 0) + 1
                keep.append(position)
        if keep:
            stats.update(quantize_to_uint8(batch["image"][keep]))
    return {"fid": frechet_distance(mu_ref, sigma_ref, *stats.pool.statistics()), "num_images": stats.count,
            "images": f"data.{cfg.data.kind} split=val, up to {per_class} per class"}


def compression(cfg) -> str:
    return f"f{cfg.tokenizer.downsample}×{cfg.tokenizer.latent_channels}"


def row_of(entry: dict, cfg, report: dict, sweep: dict[int, dict]) -> dict:
    return {"label": entry["label"], "slug": entry["slug"], "tokenizer": entry["tokenizer"],
            "kind": cfg.tokenizer.kind, "compression": compression(cfg),
            "latent_shape": [cfg.tokenizer.latent_channels, cfg.data.resolution // cfg.tokenizer.downsample,
                             cfg.data.resolution // cfg.tokenizer.downsample],
            "gfid": report["generation"]["gfid"], "rfid": report["reconstruction"]["rfid"],
            "psnr": report["reconstruction"]["psnr"], "lpips": report["reconstruction"]["lpips"],
            "images_per_s": report["throughput_images_per_s"],
            "rfid_by_nfe": {str(nfe): result["rfid"] for nfe, result in sweep.items()},
            "psnr_by_nfe": {str(nfe): result["psnr"] for nfe, result in sweep.items()},
            "generation_settings": report["generation"], "wall_seconds": report["wall_seconds"]}


def claims(rows: dict[str, dict], spec: dict) -> dict:
    """The paper's two claims, computed from the rows the preset names (never chosen after the fact)."""
    result = {}
    equal = spec.get("equal_compression")
    if equal and equal["baseline"] in rows and equal["ours"] in rows:
        base, ours = rows[equal["baseline"]], rows[equal["ours"]]
        result["equal_compression"] = {
            "baseline": base["label"], "ours": ours["label"],
            "gfid_relative_change": (ours["gfid"] - base["gfid"]) / base["gfid"],
            "paper": "f8: SD-VAE 11.63 → ε-VAE (M) 9.39 / (H) 8.85, i.e. −19% / −24% (\"22% better\")"}
    speed = spec.get("speedup")
    if speed and speed["baseline"] in rows and speed["ours"] in rows:
        base, ours = rows[speed["baseline"]], rows[speed["ours"]]
        result["speedup"] = {
            "baseline": base["label"], "ours": ours["label"],
            "throughput_ratio": ours["images_per_s"]["total"] / base["images_per_s"]["total"],
            "gfid_baseline": base["gfid"], "gfid_ours": ours["gfid"],
            "equal_or_better_gfid": ours["gfid"] <= base["gfid"],
            "paper": "ε-VAE (M) f16 1192 img/1000s at gFID 10.68 vs SD-VAE f8 522 at 11.63: 2.3× faster, better gFID"}
    return result


def render_table(rows: list[dict], claim: dict, meta: dict, floor: dict | None = None) -> str:
    lines = [f"# Reproduction: {meta['preset']}", "",
             f"Command: `{meta['command']}`  ", f"Machine: {meta['machine']}  ",
             f"Date: {meta['date']}; {meta['compute_minutes']:.1f} min in the pipeline steps "
             f"({meta['wall_minutes']:.1f} min in the last invocation, NFE sweep included)", "",
             "| tokenizer | latent | rFID (NFE 1 / 2 / 3) | PSNR | LPIPS | gFID | images/s: DiT / decode / end-to-end |",
             "|---|---|---|---|---|---|---|"]
    for row in rows:
        rfid = " / ".join(f"{value:.1f}" for value in row["rfid_by_nfe"].values())
        speed = row["images_per_s"]
        lines.append(f"| {row['label']} | {row['compression']} ({'×'.join(map(str, row['latent_shape']))}) | {rfid} | "
                     f"{row['psnr']:.2f} | {row['lpips']:.3f} | {row['gfid']:.1f} | "
                     f"{speed['ldm']:.1f} / {speed['decode']:.1f} / {speed['total']:.1f} |")
    settings = rows[0]["generation_settings"] if rows else {}
    lines += ["", f"gFID: {settings.get('num_samples')} samples, {settings.get('sampler')} "
                  f"{settings.get('steps')} steps, CFG {settings.get('cfg_scale')}, decoder NFE "
                  f"{settings.get('decoder_nfe')}, reference {settings.get('reference')}. rFID in the PSNR/LPIPS "
                  f"columns at the pipeline's decoder NFE.", ""]
    if floor:
        lines += [f"Floor: {floor['num_images']} real images ({floor['images']}) score FID {floor['fid']:.1f} against "
                  f"the same reference; that is the best gFID possible at this sample count.", ""]
    if "equal_compression" in claim:
        c = claim["equal_compression"]
        lines.append(f"- Equal compression: {c['ours']} vs {c['baseline']}: gFID change "
                     f"{100 * c['gfid_relative_change']:+.1f}% (paper: {c['paper']}).")
    if "speedup" in claim:
        c = claim["speedup"]
        lines.append(f"- Higher compression: {c['ours']} is {c['throughput_ratio']:.2f}× the end-to-end throughput "
                     f"of {c['baseline']} at gFID {c['gfid_ours']:.1f} vs {c['gfid_baseline']:.1f} "
                     f"({'equal or better' if c['equal_or_better_gfid'] else 'worse'}) (paper: {c['paper']}).")
    return "\n".join(lines) + "\n"


def plot(rows: list[dict], out: Path) -> None:
    figure, axis = plt.subplots(figsize=(5, 4))
    for row in rows:
        axis.scatter(row["images_per_s"]["total"], row["gfid"])
        axis.annotate(row["label"], (row["images_per_s"]["total"], row["gfid"]), fontsize=8)
    axis.set_xlabel("end-to-end images/s (DiT sampling + decoding)")
    axis.set_ylabel("gFID (lower is better)")
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
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor()) if Path("/proc/cpuinfo").exists() else ""
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU only, {torch.get_num_threads()} threads"
    return f"{cpu}; {device}; torch {torch.__version__}; Python {platform.python_version()}"


def main(argv: list[str]) -> None:
    preset_name = next((a.split("=", 1)[1] for a in argv if a.startswith("preset=")), "mini")
    label = Path(preset_name).stem
    out = Path(next((a.split("=", 1)[1] for a in argv if a.startswith("out=")), ROOT / "results" / label))
    extra = [a for a in argv if not a.startswith(("preset=", "out="))]
    preset = load_preset(preset_name)
    began = time.perf_counter()
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for entry in preset["tokenizers"]:
        cfg = run_config(preset, label, entry, extra)
        print(f"== {entry['label']}: {compression(cfg)} ({cfg.name})", flush=True)
        pipeline = Pipeline(cfg)
        report = pipeline.run()
        sweep = nfe_sweep(cfg, pipeline, preset.get("nfe_sweep", [cfg.decode.nfe]))
        rows.append(row_of(entry, cfg, report, sweep))
        for source, target in ((pipeline.folder("sample") / "grid.png", f"samples_{entry['slug']}.png"),
                               (pipeline.folder("reconstruct") / f"reconstructions_nfe{cfg.decode.nfe}.png",
                                f"reconstructions_{entry['slug']}.png")):
            if source.is_file():
                shutil.copyfile(source, out / target)
    floor = real_data_floor(cfg)
    claim = claims({row["slug"]: row for row in rows}, preset.get("claims", {}))
    meta = {"preset": label, "command": "python pipelines/reproduce.py " + " ".join(argv),
            "machine": machine(), "date": datetime.now().strftime("%Y-%m-%d %H:%M"),
            "wall_minutes": (time.perf_counter() - began) / 60,
            "compute_minutes": sum(sum(row["wall_seconds"].values()) for row in rows) / 60}
    (out / "results.json").write_text(json.dumps({"meta": meta, "rows": rows, "claims": claim, "real_data_floor": floor},
                                                    indent=2) + "\n")
    (out / "table.md").write_text(render_table(rows, claim, meta, floor))
    plot(rows, out)
    print((out / "table.md").read_text())


if __name__ == "__main__":
    main(sys.argv[1:])
