"""stage=paper_speed: the chain composed from its timed parts, FLOPs per part, the paper's ratios, the report."""
import json

import pytest
from omegaconf import OmegaConf, open_dict

from pipelines import paper_speed
from tests.helpers import load_config

DECODERS = [{"label": "SD", "tokenizer": "sd_vae", "channels": [32, 32], "nfe": [1]},
            {"label": "eps", "tokenizer": "epsvae_tiny", "nfe": [1, 2]}]
CLAIMS = [{"label": "eps f8 / SD f4", "ours": {"f": 8, "decoder": "eps"},
           "baseline": {"f": 4, "decoder": "SD", "nfe": 1}, "nfe": [1, 2], "paper": {"ours": 1192, "baseline": 522}},
          {"label": "eps f8 / f4", "ours": {"f": 8, "decoder": "eps"},
           "baseline": {"f": 4, "decoder": "eps", "nfe": None}, "nfe": [1, 2],
           "paper": {"ours": 3865, "baseline": 1192}}]


def settings(**changes):
    return OmegaConf.create({"steps": 10, "batch_size": 4, "compressions": [4, 8], "decoders": DECODERS,
                             "claims": CLAIMS, **changes})


def timed(fastest: float, slowest: float) -> dict:
    return {"seconds": fastest, "seconds_range": [fastest, slowest]}


def constructed_parts():
    """Timings as if measured: the DiT step costs 4× as much at f4 (4× the tokens) as at f8."""
    return {"dit": {"4": {**timed(2.0, 2.2), "flops": 8e9}, "8": {**timed(0.5, 0.6), "flops": 2e9}},
            "decoders": {"SD": {"4": {**timed(1.0, 1.5), "flops": 3e9}, "8": {**timed(1.0, 1.1), "flops": 3e9}},
                         "eps": {"4": {**timed(0.4, 0.5), "flops": 1e9}, "8": {**timed(0.4, 0.4), "flops": 1e9}}}}


def test_the_chain_is_composed_from_its_parts():
    rows = paper_speed.throughput_table(constructed_parts(), settings())
    assert [(row["f"], row["decoder"], row["nfe"]) for row in rows] == [
        (4, "SD", 1), (4, "eps", 1), (4, "eps", 2), (8, "SD", 1), (8, "eps", 1), (8, "eps", 2)]
    by_cell = {(row["f"], row["decoder"], row["nfe"]): row for row in rows}
    # 4 images take 10 DiT steps of 0.5 s and two decoder passes of 0.4 s: 5.8 s.
    assert by_cell[(8, "eps", 2)]["images_per_1000s"] == pytest.approx(4 / 5.8 * 1000)
    # its range: from the slowest calls (10 × 0.6 + 2 × 0.4 = 6.8 s) to the fastest
    assert by_cell[(8, "eps", 2)]["images_per_1000s_range"] == pytest.approx([4 / 6.8 * 1000, 4 / 5.8 * 1000])
    assert by_cell[(8, "eps", 2)]["gflops_per_image"] == pytest.approx((2e9 * 10 + 1e9 * 2) / 1e9)
    # each extra NFE adds one decoder pass, in time and in FLOPs
    assert (by_cell[(4, "eps", 2)]["gflops_per_image"] - by_cell[(4, "eps", 1)]["gflops_per_image"]) == \
        pytest.approx(1.0)
    assert by_cell[(4, "eps", 1)]["images_per_1000s"] > by_cell[(4, "eps", 2)]["images_per_1000s"]


def test_the_paper_s_ratios_are_computed_beside_the_paper_s():
    rows = paper_speed.throughput_table(constructed_parts(), settings())
    claims = paper_speed.ratios(rows, settings())
    by_cell = {(row["f"], row["decoder"], row["nfe"]): row for row in rows}
    cell = {key: row["images_per_1000s"] for key, row in by_cell.items()}
    assert [(claim["claim"], claim["nfe"]) for claim in claims] == [
        ("eps f8 / SD f4", 1), ("eps f8 / SD f4", 2), ("eps f8 / f4", 1), ("eps f8 / f4", 2)]
    assert claims[1]["ours"] == pytest.approx(cell[(8, "eps", 2)] / cell[(4, "SD", 1)])
    assert claims[3]["ours"] == pytest.approx(cell[(8, "eps", 2)] / cell[(4, "eps", 2)])  # null: the same NFE
    assert claims[0]["paper"] == pytest.approx(1192 / 522)
    # the range pairs the slowest of one side with the fastest of the other, and holds the estimate
    ours, baseline = (by_cell[(8, "eps", 2)]["images_per_1000s_range"],
                      by_cell[(4, "SD", 1)]["images_per_1000s_range"])
    assert claims[1]["range"] == pytest.approx([ours[0] / baseline[1], ours[1] / baseline[0]])
    assert all(claim["range"][0] < claim["ours"] <= claim["range"][1] for claim in claims)


def test_decoder_columns_gain_levels_with_the_compression():
    sd = paper_speed.decoder_config(OmegaConf.create(DECODERS[0]), 8)
    assert sd["downsample"] == 8 and sd["decoder"]["channel_mult"] == [1, 1, 1, 1]
    eps = paper_speed.decoder_config(OmegaConf.create(DECODERS[1]), 16)
    assert eps["downsample"] == 16 and len(eps["encoder"]["channel_mult"]) == 5 and eps["latent_channels"] == 4


def test_a_tiny_paper_speed_run_writes_its_table(tmp_path):
    cfg = load_config(["stage=paper_speed", "device=cpu"], output_root=tmp_path)
    with open_dict(cfg):
        cfg.paper_speed = settings(ldm="dit_tiny", image_size=32, warmup=0, repeats=2, out=str(tmp_path / "speed"))
    report = paper_speed.main(cfg)
    parts = report["parts"]
    assert parts["dit"]["4"]["flops"] > parts["dit"]["8"]["flops"] > 0  # 4× the tokens at f4
    timed_parts = [*parts["dit"].values(), *(part for by_f in parts["decoders"].values() for part in by_f.values())]
    assert all(0 < part["seconds"] == part["seconds_range"][0] <= part["seconds_range"][1] for part in timed_parts)
    assert len(report["rows"]) == 6 and len(report["ratios"]) == 4
    written = json.loads((tmp_path / "speed.json").read_text())
    assert written["rows"] == report["rows"]
    table = (tmp_path / "speed.md").read_text()
    assert "**composed**" in table and "| 8 | " in table and "eps f8 / SD f4" in table


def test_its_settings_leave_every_other_run_s_fingerprint_alone():
    """Runs and pipeline folders made before stage=paper_speed existed must still resume."""
    from shared.runtime import config_fingerprint

    cfg = load_config(["stage=tokenizer"])
    before = config_fingerprint(cfg)
    with open_dict(cfg):
        cfg.paper_speed.batch_size = 8
        del cfg.paper_speed  # as in a config saved before the section existed
    assert config_fingerprint(cfg) == before
