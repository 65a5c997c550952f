"""Wall time of each row's seed-0 run of dgae32 (the convergence measurements), from its run folder:

    python results/dgae32/wall_times.py /work/runs/outputs > results/dgae32/wall_times.json

Training: the loop's own count over every invocation (result.json's train_seconds), since the pipeline's
seconds.json held only the last invocation's time when these runs were made. Measurement: the dit_<steps>_sample and
_evaluate steps of seconds.json. `paused`: the minutes of the training's span that fell in the SIGSTOP pauses taken
to time the test suite on idle cores (session of 2026-12-04), which the wall times include.
"""
import json
import sys
from datetime import datetime, timezone
from pathlib import Path

ROWS = ("vae_f4", "epsvae_f4", "epsvae_f4x2", "dgae_f4x2")
PAUSES = [("20:32:00", "20:43:00"), ("20:48:00", "20:58:00"), ("21:15:00", "21:22:00"), ("21:23:33", "21:24:47"),
          ("22:07:00", "22:15:00")]  # UTC, 2026-12-04


def stamp(clock: str) -> float:
    return datetime.fromisoformat(f"2026-12-04T{clock}").replace(tzinfo=timezone.utc).timestamp()


def paused_minutes(metrics: Path) -> float:
    times = [row["time"] for row in map(json.loads, metrics.read_text().splitlines()) if "time" in row]
    start, end = min(times), max(times)
    return sum(max(0.0, min(end, stamp(b)) - max(start, stamp(a))) for a, b in PAUSES) / 60


def row_times(folder: Path) -> dict:
    seconds = json.loads((folder / "seconds.json").read_text())
    times = {}
    for step in ("tokenizer", "ldm"):
        trained = json.loads((folder / step / "result.json").read_text())["train_seconds"]
        paused = paused_minutes(folder / step / "metrics.jsonl")
        times[step] = {"minutes": round(trained / 60, 1), "paused": round(paused, 1)}
    times["cache_minutes"] = round(seconds["cache"] / 60, 1)
    times["measurement_minutes"] = round(sum(v for k, v in seconds.items() if k.startswith("dit_")) / 60, 1)
    return times


if __name__ == "__main__":
    root = Path(sys.argv[1]) / "pipeline"
    print(json.dumps({row: row_times(root / f"reproduce_dgae32_{row}_s0") for row in ROWS}, indent=2))
