"""Writes compare_runs.json (see README.md): run from the repository root as
PYTHONPATH=. .venv/bin/python results/budget32/compare_runs.py > results/budget32/compare_runs.json

Post-hoc, from the two results.json files alone (no weights are read):
- the trend of each difference ε-VAE − VAE in this run (results.json, trained on the H200) with the interval its
  residuals around the line give, beside the preset's interval from image resamples (the CPU run's diagnostic,
  cpu_run_to_4800/diagnostic_raw_vs_ema.py, computes it the same way);
- the two runs of the same preset and seed side by side at the budgets both measured (600 to 4,800 steps): each
  row's change from the CPU run to the H200 run, and the difference ε-VAE − VAE with its verdict in each run. The
  runs differ only in the hardware's floating-point rounding, which a chaotic GAN run turns into a different run:
  how far they part is a first look at the run-to-run spread that one run per row cannot show.
"""
import importlib.util
import json
from pathlib import Path

HERE = Path(__file__).parent
METRICS = ("rfid", "psnr", "lpips")


def load_module(path: Path):
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def by_steps(results: dict) -> dict:
    """{slug: {steps: measurement}} of a results.json."""
    return {row["slug"]: {m["steps"]: m for m in row["measurements"]} for row in results["rows"]}


def main() -> dict:
    h200 = json.loads((HERE / "results.json").read_text())
    cpu = json.loads((HERE / "cpu_run_to_4800" / "results.json").read_text())
    diagnostic = load_module(HERE / "cpu_run_to_4800" / "diagnostic_raw_vs_ema.py")
    runs = {"h200": by_steps(h200), "cpu": by_steps(cpu)}
    shared_steps = sorted(set(runs["h200"]["vae_f4"]) & set(runs["cpu"]["vae_f4"]))
    rows = {slug: [{"steps": steps, **{f"{metric}_{run}": runs[run][slug][steps][metric] for run in runs
                                       for metric in METRICS},
                    **{f"{metric}_change": runs["h200"][slug][steps][metric] - runs["cpu"][slug][steps][metric]
                       for metric in METRICS}} for steps in shared_steps] for slug in runs["h200"]}
    differences = {}
    for metric in METRICS:
        by_run = {name: {b["steps"]: b for b in results["comparison"][metric]["by_budget"]}
                  for name, results in (("h200", h200), ("cpu", cpu))}
        differences[metric] = [{"steps": steps, **{f"{run}_estimate": by_run[run][steps]["estimate"] for run in by_run},
                                **{f"{run}_verdict": by_run[run][steps]["verdict"] for run in by_run}}
                               for steps in shared_steps]
    return {"residual_trends_h200": diagnostic.residual_trends(h200), "rows_cpu_to_h200": rows,
            "difference_in_each_run": differences}


if __name__ == "__main__":
    print(json.dumps(main(), indent=1))
