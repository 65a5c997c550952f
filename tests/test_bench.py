"""stage=bench in quick mode: one run produces every section with positive numbers and equivalent models."""
from __future__ import annotations

import json
import sys

import pytest

from pipelines import bench
from shared.errors import ConfigError
from tests.helpers import load_config, run_cli

SECTIONS = ("DiT train step", "DiT sampling step", "DiT sampling of", "SD-VAE encode", "SD-VAE decode",
            "ε-VAE decode NFE 1", "ε-VAE decode NFE 2", "ε-VAE decode NFE 3", "Loader: cached latents",
            "FID Inception features")


@pytest.mark.slow
def test_quick_bench_reports_every_section_with_equivalent_models(tmp_path):
    pytest.importorskip("diffusers")  # the bench extra, the other side of its comparisons
    run_cli("stage=bench", "bench.quick=true", "wandb.mode=disabled", f"output_root={tmp_path}",
            f"bench.out={tmp_path / 'copy' / 'bench'}", timeout=400)
    (run_dir,) = (tmp_path / "bench").iterdir()
    report = json.loads((run_dir / "bench.json").read_text())
    assert (tmp_path / "copy" / "bench.md").read_text().startswith("# Speed benchmark")
    assert json.loads((tmp_path / "copy" / "bench.json").read_text())["rows"] == report["rows"]

    names = [row["name"] for row in report["rows"]]
    for section in SECTIONS:
        assert sum(name.startswith(section) for name in names) == 1, section
    for row in report["rows"]:
        assert row["ours"] > 0 and row["theirs"] > 0 and row["ratio"] > 0, row
        if row["name"].startswith("Loader"):  # one timed pass of each side: no rounds, no range
            assert row["ratio_range"] is None
        else:  # the ratio of the fastest calls lies between those of the rounds that timed them
            low, high = row["ratio_range"]
            assert low * (1 - 1e-9) <= row["ratio"] <= high * (1 + 1e-9), row
            assert row["ours_flops"] > 0 and row["theirs_flops"] > 0, row
            assert row["ours_flops_fraction"] > 0 and row["theirs_flops_fraction"] > 0, row
    limit = report["limit"]
    assert limit["flops_per_second"] == max(limit["matmul"]["flops_per_second"], limit["conv3x3"]["flops_per_second"])
    assert {"cpu", "cores", "torch", "threads"} <= report["machine"].keys()

    dit = report["params"]["dit"]
    assert abs(dit["ours"] - dit["theirs"]) <= 0.01 * dit["theirs"]
    vae = report["params"]["sd_vae"]
    for part in ("encoder", "decoder"):
        assert abs(vae["ours"][part] - vae["theirs"][part]) <= 0.03 * vae["theirs"][part]


def test_bench_without_diffusers_says_how_to_install_it_before_writing_anything(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "diffusers", None)  # `import diffusers` now fails, as where it is missing
    cfg = load_config(["stage=bench", "bench.quick=true", "device=cpu"], output_root=tmp_path)
    with pytest.raises(ConfigError, match=r"pip install -e '\.\[bench\]'"):
        bench.main(cfg)
    assert not (tmp_path / "bench").exists()
