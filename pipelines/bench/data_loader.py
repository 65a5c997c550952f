"""Throughput of the image loaders: an image folder against webdataset shards of the same images.

    python pipelines/bench/data_loader.py [--root ../shared/data/imagenette2-224] [--batches 30] [--warmup 5]

(or `python -m pipelines.bench.data_loader ...`).

Shards are written from the folder's train split into a temporary folder first. Each measurement is a training
loader (shuffle, random flips, ADM crop) with `--workers` workers: `--warmup` batches (worker start-up, first
reads) are discarded, then `--batches` batches are timed. The measurements are repeated `--repeats` times,
interleaved, and the median is reported with the range, since other jobs on a small machine disturb single runs.
The Markdown table is printed and written to
benchmarks/data_loader.md with the command, the machine and the versions.
"""
from __future__ import annotations

import argparse
import datetime
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:  # run as a script from a checkout without `pip install -e`
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from pipelines.bench.settings import IMAGENETTE  # noqa: E402
from pipelines.bench.timing import loader_items_per_second  # noqa: E402
from shared.data import make_image_loader  # noqa: E402
from shared.data.shards import write_shards  # noqa: E402
from shared.machine import describe  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", type=Path, default=IMAGENETTE)
    parser.add_argument("--split", default="train")
    parser.add_argument("--resolutions", type=int, nargs="+", default=[64, 256])
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--batches", type=int, default=30)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--shard-size", type=int, default=1000)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "data_loader.md")
    args = parser.parse_args()

    rates: dict[tuple[int, str], list[float]] = {}
    with tempfile.TemporaryDirectory() as shard_dir:
        start = time.perf_counter()
        manifest = write_shards(args.root, shard_dir, args.split, args.shard_size, progress=False)
        shard_seconds = time.perf_counter() - start
        sources = {
            "imagefolder": {"kind": "imagefolder", "root": str(args.root), "train_split": args.split},
            "webdataset": {"kind": "webdataset", "train_urls": manifest["url_pattern"], "shuffle_buffer": 1000,
                           "num_classes": manifest["num_classes"]},
        }
        for repeat in range(args.repeats):
            for resolution in args.resolutions:
                for name, source in sources.items():
                    data_cfg = {**source, "resolution": resolution, "random_flip": True}
                    loader = make_image_loader(data_cfg, "train", args.batch_size, train=True,
                                               num_workers=args.workers)
                    rate = loader_items_per_second(loader, "image", args.warmup, batches=args.batches)
                    del loader  # stops its persistent workers before the next measurement
                    rates.setdefault((resolution, name), []).append(rate)
                    print(f"run {repeat + 1}: {resolution:>4} px  {name:<12} {rate:8.0f} images/s", flush=True)

    table = ["| resolution | source | images/s (median) | range | ms per batch (median) |", "|---:|---|---:|---:|---:|"]
    for (resolution, name), runs in rates.items():
        median = statistics.median(runs)
        table.append(f"| {resolution} px | {name} | {median:.0f} | {min(runs):.0f}–{max(runs):.0f} | "
                     f"{1000 * args.batch_size / median:.0f} |")
    command = "python " + " ".join([os.path.relpath(sys.argv[0], ROOT), *sys.argv[1:]])
    machine = describe(torch.device("cpu"))
    report = "\n".join([
        "# Image loader throughput: image folder vs webdataset shards",
        "",
        f"Command (from the repository root): `{command}`",
        "",
        f"- Data: `{args.root.name}/{args.split}`, {manifest['total']} JPEGs of 224×224, sharded into "
        f"{len(manifest['shards'])} tar files of {args.shard_size} in {shard_seconds:.1f} s (original bytes).",
        f"- Loader: training mode (shuffle, random flip, ADM centre crop to the resolution), batch "
        f"{args.batch_size}, {args.workers} workers; {args.warmup} warm-up batches discarded, {args.batches} "
        f"batches timed; {args.repeats} interleaved repeats.",
        f"- Machine: {machine['cpu']}, {machine['cores']} cores, load average {machine['load_average_1min']:.1f} at "
        f"the end; {platform.platform()}.",
        f"- Versions: Python {machine['python']}, torch {machine['torch']}.",
        f"- Date: {datetime.datetime.now().isoformat(timespec='minutes')}.",
        "",
        *table,
        "",
        "The source images are 224×224, so at 256 px the ADM crop is an upscaling BICUBIC resize. Full-size",
        "ImageNet JPEGs take longer to decode: expect lower rates there. The machine's other jobs share its cores:",
        "compare the rows with each other rather than with other machines.",
        "",
    ])
    print("\n" + "\n".join(table))
    args.out.write_text(report)
    print(f"\nwritten to {args.out}")


if __name__ == "__main__":
    main()
