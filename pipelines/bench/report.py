"""A benchmark's report: the machine it records, the bench's Markdown table, and writing
<stem>.json with <stem>.md (also `stage=paper_speed`'s)."""
from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

from shared.machine import describe
from shared.metrics.intervals import format_interval
from shared.runtime import Runtime


def machine(runtime: Runtime) -> dict:
    return describe(runtime.device, str(runtime.autocast_dtype or "fp32"))


def fraction(value: float | None) -> str:
    return "–" if value is None else f"{100 * value:.1f}%"


def markdown(report: dict) -> str:
    m, limit = report["machine"], report["limit"]
    lines = [
        "# Speed benchmark: ours vs what users would pick instead",
        "",
        f"- Command: `{report['command']}`",
        f"- Date: {report['date']}; total {report['seconds']:.0f} s in one process",
        f"- Machine: {m['cpu']}, {m['cores']} cores, torch {m['torch']} with {m['threads']} threads, device "
        f"{m['device']}{', ' + m['gpu'] if 'gpu' in m else ''}, precision {m['precision']}; load average "
        f"{m['load_average_1min']:.1f} at the end (other processes compete for the cores when it exceeds them)",
        f"- Measured limit ({limit['dtype']}): {limit['flops_per_second'] / 1e9:.1f} GFLOP/s, the better of a "
        f"{limit['matmul']['size']}² matmul ({limit['matmul']['flops_per_second'] / 1e9:.1f} GFLOP/s) and a "
        f"channels-last 3×3 convolution, {limit['conv3x3']['channels']} channels at {limit['conv3x3']['size']}² "
        f"({limit['conv3x3']['flops_per_second'] / 1e9:.1f} GFLOP/s)",
        f"- Settings: {report['settings']}",
        f"- DiT parameters: ours {report['params']['dit']['ours']:,}, diffusers {report['params']['dit']['theirs']:,}; "
        f"SD-VAE parameters: ours {report['params']['sd_vae']['ours']}, diffusers {report['params']['sd_vae']['theirs']}",
        "- Throughput of the fastest call of each side; ours / theirs is their ratio, with in brackets the lowest and "
        "highest ratio of one round (call i of ours against call i of theirs, timed back to back); a loader row is "
        "one timed pass of each, without a range",
        "",
        "| benchmark | unit | ours | theirs | ours / theirs | target | ours % of limit | theirs % | note |",
        "|---|---|---:|---:|---:|---:|---:|---:|---|",
    ]
    for row in report["rows"]:
        target = "" if row["target"] is None else f"≥ {row['target']:g}" + (" **missed**" if row["missed"] else "")
        lines.append(f"| {row['name']} | {row['unit']} | {row['ours']:.4g} | {row['theirs']:.4g} | "
                     f"{format_interval(row['ratio'], row['ratio_range'], '.2f')} "
                     f"| {target} | {fraction(row['ours_flops_fraction'])} | {fraction(row['theirs_flops_fraction'])} "
                     f"| {row['note']} |")
    return "\n".join(lines) + "\n"


def write_report(report: dict, stem: Path, render: Callable[[dict], str] = markdown) -> None:
    """<stem>.json (the report) and <stem>.md (`render` of it)."""
    stem.parent.mkdir(parents=True, exist_ok=True)
    stem.with_suffix(".json").write_text(json.dumps(report, indent=1) + "\n")
    stem.with_suffix(".md").write_text(render(report))
