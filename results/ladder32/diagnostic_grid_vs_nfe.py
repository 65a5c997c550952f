"""Writes diagnostic_grid_vs_nfe.json (see README.md): run from the repository root as
PYTHONPATH=. .venv/bin/python results/ladder32/diagnostic_grid_vs_nfe.py > results/ladder32/diagnostic_grid_vs_nfe.json"""
# Post-hoc diagnostic of the last rung: separates the NFE change (5 -> 3) from the grid change (uniform -> reversed log).
import json
from pipelines.claims import compare
from shared.metrics.intervals import verdict
runs = "/work/runs/outputs/pipeline"
gamma5 = {"label": "γ 0.6, uniform grid, NFE 5", "files": {"per_image": f"{runs}/reproduce_ladder32_gamma/reconstruct/per_image_nfe5.npz"}}
uniform3 = {"label": "γ 0.6, uniform grid, NFE 3", "files": {"per_image": "/work/runs/diag/reconstruct/imagenette_mini/per_image_nfe3.npz"}}
reversed3 = {"label": "γ 0.6, reversed-log grid, NFE 3", "files": {"per_image": f"{runs}/reproduce_ladder32_reversed_log/reconstruct/per_image_nfe3.npz"}}
out = []
for ours, base in ((uniform3, gamma5), (reversed3, uniform3)):
    measured = compare(ours, base, ["rfid", "psnr"], 200, 0)
    out.append({"from": base["label"], "to": ours["label"], **measured, "verdict_lower_rfid": verdict(measured["rfid"]["ci95"], "lower")})
metrics = json.load(open("/work/runs/diag/reconstruct/imagenette_mini/metrics_nfe3.json"))
print(json.dumps({"uniform_nfe3": {k: metrics[k] for k in ("rfid", "rfid_ci95", "psnr", "psnr_ci95", "subset")}, "changes": out}, indent=1))
