"""Wall time of every run of a reproduce preset, from its run folders:

    python results/wall_times.py /work/runs/outputs dgae32 > results/dgae32/wall_times.json

Per run (`reproduce_<preset>_<row>_s<seed>`) and finished pipeline step, in minutes:
- training (tokenizer, ldm): the loop's own count over every invocation (result.json's train_seconds), since the
  pipeline's seconds.json held only the last invocation's time before d1625c6;
- every other step: seconds.json. `dit_checkpoints` sums stage=convergence's dit_<steps>_sample and _evaluate steps
  (the measurement of the kept DiT checkpoints); `total`, every step.
`paused`: the part of the step's span that fell in the SIGSTOP pauses of the background workers listed in PAUSES
(taken to time the test suite on idle cores), which the wall times include. A training's span runs from its first to
its last logged step; any other step's ends at its DONE marker and lasts its seconds (an approximation for a step
resumed after a session's end, whose span the marker does not record). Two workers shared the machine's two cores
throughout, so every time is one of two processes on two cores.
"""
import json
import sys
from datetime import datetime, timezone
from pathlib import Path

TRAINING = ("tokenizer", "ldm")
PAUSES = [("2026-12-04 20:32:00", "2026-12-04 20:43:00"), ("2026-12-04 20:48:00", "2026-12-04 20:58:00"),
          ("2026-12-04 21:15:00", "2026-12-04 21:22:00"), ("2026-12-04 21:23:33", "2026-12-04 21:24:47"),
          ("2026-12-04 22:07:00", "2026-12-04 22:15:00"), ("2026-12-05 00:56:19", "2026-12-05 01:02:04"),
          ("2026-12-05 01:34:38", "2026-12-05 01:41:30"), ("2026-12-05 02:06:31", "2026-12-05 02:12:38"),
          ("2026-12-05 06:19:04", "2026-12-05 06:26:15"), ("2026-12-05 06:26:48", "2026-12-05 06:28:14"),
          ("2026-12-05 06:42:19", "2026-12-05 06:49:58"), ("2026-12-05 06:50:31", "2026-12-05 06:59:31")]  # UTC


def stamp(clock: str) -> float:
    return datetime.fromisoformat(clock).replace(tzinfo=timezone.utc).timestamp()


def paused_seconds(start: float, end: float) -> float:
    return sum(max(0.0, min(end, stamp(b)) - max(start, stamp(a))) for a, b in PAUSES)


def step_seconds(folder: Path, step: str, seconds: float) -> tuple[float, float]:
    """(wall seconds, of which paused) of a finished step of the run folder."""
    if step in TRAINING:
        seconds = json.loads((folder / step / "result.json").read_text())["train_seconds"]
        logged = [row["time"] for row in map(json.loads, (folder / step / "metrics.jsonl").read_text().splitlines())
                  if "time" in row]
        start, end = min(logged), max(logged)
    else:
        end = (folder / step / "DONE").stat().st_mtime
        start = end - seconds
    return seconds, paused_seconds(start, end)


def minutes(spans: list[tuple[float, float]]) -> dict:
    return {"minutes": round(sum(s for s, _ in spans) / 60, 1), "paused": round(sum(p for _, p in spans) / 60, 1)}


def run_times(folder: Path) -> dict:
    """{step: {minutes, paused}} for every finished step of the run, the DiT checkpoints' measurement and the
    total."""
    record = folder / "seconds.json"  # written when the run's first step finishes
    recorded = json.loads(record.read_text()) if record.is_file() else {}
    spans = {step: step_seconds(folder, step, seconds) for step, seconds in recorded.items()
             if (folder / step / "DONE").is_file()}
    measurement = [span for step, span in spans.items() if step.startswith("dit_")]
    return {"steps": {step: minutes([span]) for step, span in spans.items()},
            "dit_checkpoints": minutes(measurement), "total": minutes(list(spans.values()))}


if __name__ == "__main__":
    root, preset = Path(sys.argv[1]) / "pipeline", sys.argv[2]
    runs = {folder.name: run_times(folder) for folder in sorted(root.glob(f"reproduce_{preset}_*_s*"))}
    total = {key: sum(run["total"][key] for run in runs.values()) for key in ("minutes", "paused")}
    print(json.dumps({"runs": runs, "core_hours": round(total["minutes"] / 60, 1),
                      "core_hours_without_pauses": round((total["minutes"] - total["paused"]) / 60, 1)}, indent=2))
