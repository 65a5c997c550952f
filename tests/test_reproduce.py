"""pipelines/reproduce.py: the presets load, the claims are computed from the rows the preset names, outputs."""
import pytest

from pipelines import reproduce
from shared.errors import ConfigError
from tests.helpers import load_config


def row(slug, gfid, total, rfid_by_nfe):
    return {"label": slug.upper(), "slug": slug, "compression": "f8×4", "latent_shape": [4, 8, 8], "gfid": gfid,
            "rfid": 1.0, "psnr": 20.0, "lpips": 0.1, "images_per_s": {"ldm": 2 * total, "decode": 2 * total,
                                                                      "total": total},
            "rfid_by_nfe": rfid_by_nfe, "generation_settings": {"num_samples": 10}, "wall_seconds": {"ldm": 1.0}}


@pytest.mark.parametrize("name", ["mini", "mini_long", "paper"])
def test_presets_name_four_tokenizers_and_the_claim_rows(name):
    preset = reproduce.load_preset(name)
    slugs = [entry["slug"] for entry in preset["tokenizers"]]
    assert len(slugs) == len(set(slugs)) >= 4
    for claim in preset["claims"].values():
        assert claim["baseline"] in slugs and claim["ours"] in slugs


def test_a_preset_with_a_base_replaces_only_the_overrides_it_names(tmp_path):
    child = tmp_path / "child.yaml"
    child.write_text("base: mini\ncommon: [tokenizer.train.steps=7, sample.cfg_scale=2.0]\nnfe_sweep: [1]\n")
    base, preset = reproduce.load_preset("mini"), reproduce.load_preset(str(child))
    assert preset["tokenizers"] == base["tokenizers"] and preset["claims"] == base["claims"]
    assert preset["nfe_sweep"] == [1]
    assert [o for o in preset["common"] if o.startswith("tokenizer.train.steps=")] == ["tokenizer.train.steps=7"]
    assert "sample.cfg_scale=2.0" in preset["common"]
    untouched = [o for o in base["common"] if not o.startswith("tokenizer.train.steps=")]
    assert [o for o in preset["common"] if o in untouched] == untouched


def test_unknown_preset_is_a_config_error():
    with pytest.raises(ConfigError, match="no reproduction preset"):
        reproduce.load_preset("nope")


def test_claims_follow_the_named_rows():
    rows = {"vae": row("vae", 20.0, 10.0, {"3": 5.0}), "eps8": row("eps8", 15.0, 9.0, {"1": 6.0, "3": 4.0}),
            "eps16": row("eps16", 19.0, 30.0, {"1": 8.0, "3": 7.0})}
    claims = reproduce.claims(rows, {"equal_compression": {"baseline": "vae", "ours": "eps8"},
                                     "speedup": {"baseline": "vae", "ours": "eps16"}})
    assert claims["equal_compression"]["gfid_relative_change"] == pytest.approx(-0.25)
    assert claims["speedup"]["throughput_ratio"] == pytest.approx(3.0)
    assert claims["speedup"]["equal_or_better_gfid"] is True
    worse = reproduce.claims({**rows, "eps16": row("eps16", 25.0, 30.0, {"3": 7.0})},
                             {"speedup": {"baseline": "vae", "ours": "eps16"}})
    assert worse["speedup"]["equal_or_better_gfid"] is False


def test_table_and_plots_are_written(tmp_path):
    rows = [row("vae", 20.0, 10.0, {"3": 5.0}), row("eps8", 15.0, 9.0, {"1": 6.0, "2": 5.0, "3": 4.0})]
    claims = reproduce.claims({r["slug"]: r for r in rows}, {"equal_compression": {"baseline": "vae", "ours": "eps8"}})
    meta = {"preset": "test", "command": "python pipelines/reproduce.py", "machine": "m", "date": "d",
            "wall_minutes": 1.0, "compute_minutes": 2.0}
    table = reproduce.render_table(rows, claims, meta)
    assert "| EPS8 | f8×4 (4×8×8) | 6.0 / 5.0 / 4.0 |" in table and "-25.0%" in table
    reproduce.plot(rows, tmp_path)
    assert (tmp_path / "gfid_vs_throughput.png").stat().st_size > 0 and (tmp_path / "rfid_vs_nfe.png").is_file()


def test_real_data_floor_takes_as_many_real_images_per_class_as_the_samples(tmp_path):
    cfg = load_config(["experiment=smoke", "device=cpu", "data.val_size=50", "sample.num_per_class=3",
                       "evaluate.reference_images=40", "evaluate.batch_size=16"], tmp_path)
    floor = reproduce.real_data_floor(cfg)
    assert floor["num_images"] == 3 * cfg.data.num_classes
    assert floor["fid"] > 0
    assert (tmp_path / "reference_stats").is_dir()  # the reference is the evaluate stage's cached one
    meta = {"preset": "t", "command": "c", "machine": "m", "date": "d", "wall_minutes": 1.0, "compute_minutes": 1.0}
    assert f"score FID {floor['fid']:.1f}" in reproduce.render_table([], {}, meta, floor)
