"""stage=metrics (two image sets) and stage=evaluate (samples against reference statistics)."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from omegaconf import open_dict

from shared.data.image_files import open_images, save_images, write_npz
from shared.data.transforms import quantize_to_uint8
from shared.errors import DataError
from shared.metrics import compare, evaluate
from shared.metrics.fid import InceptionStatistics, frechet_distance, save_statistics
from shared.metrics.image_quality import psnr
from shared.metrics.paired import PairedMetrics, flat_metrics
from tests.helpers import load_config, run_cli


def random_images(count: int, size: int, seed: int) -> torch.Tensor:
    return torch.rand(count, 3, size, size, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def image_folders(tmp_path, count: int = 4, size: int = 32):
    """real/ and fake/ with the same file names; fake = real plus noise."""
    real = random_images(count, size, seed=0)
    fake = (real + 0.2 * random_images(count, size, seed=1)).clamp(-1, 1)
    names = [f"class_{i % 2}/image_{i}" for i in range(count)]
    save_images(real, tmp_path / "real", names)
    save_images(fake, tmp_path / "fake", names)
    return tmp_path / "real", tmp_path / "fake"


# ------------------------------------------------------------------------------------------ stage=metrics
@pytest.mark.slow
def test_stage_metrics_prints_one_json_line_with_fid_psnr_ssim_lpips(tmp_path):
    real, fake = image_folders(tmp_path)
    result = run_cli("stage=metrics", f"real={real}", f"fake={fake}", "device=cpu", "wandb.mode=disabled",
                     f"output_root={tmp_path / 'outputs'}", "progress=false", timeout=300)
    lines = [line for line in result.stdout.splitlines() if line.strip()]
    assert len(lines) == 1, result.stdout
    metrics = json.loads(lines[0])
    assert metrics["paired"] and metrics["num_real"] == metrics["num_fake"] == 4
    assert np.isfinite(metrics["fid"]) and metrics["fid"] > 0
    assert 0 < metrics["ssim"] < 1 and metrics["lpips"] > 0
    expected_psnr = psnr(open_images(real).read(0, 4), open_images(fake).read(0, 4)).mean().item()
    assert metrics["psnr"] == pytest.approx(expected_psnr)


def test_metrics_main_prints_exactly_one_json_line(tmp_path, capsys):
    real, fake = image_folders(tmp_path, count=3)
    cfg = load_config(["stage=metrics", f"real={real}", f"fake={fake}", "device=cpu", "lpips_net=alex"], tmp_path)
    returned = compare.main(cfg)
    lines = [line for line in capsys.readouterr().out.splitlines() if line.strip()]
    assert len(lines) == 1
    printed = json.loads(lines[0])
    assert {"fid", "psnr", "ssim", "lpips"} <= set(printed) and printed["fid"] == pytest.approx(returned["fid"])


def test_compare_images_without_matching_names_gives_the_fid_of_the_fake_set_against_the_real_one(tmp_path):
    save_images(random_images(3, 32, seed=2), tmp_path / "a", ["x", "y", "z"])
    write_npz(tmp_path / "b.npz", random_images(4, 48, seed=3))  # other names and size: fine for FID
    result = compare.compare_images(tmp_path / "a", tmp_path / "b.npz", "cpu", lpips_net="alex", bootstrap=20)
    assert not result["paired"] and "psnr" not in result and "lpips" not in result
    assert result["num_real"] == 3 and result["num_fake"] == 4 and result["fid"] > 0
    # `real` is the reference, as stage=evaluate's: the same figure and spread as the fake set evaluated against the
    # real set's statistics.
    real = InceptionStatistics("cpu")
    real.update_from_set(open_images(tmp_path / "a"), batch_size=2)
    as_evaluated, _ = evaluate.evaluate_samples(tmp_path / "b.npz", *real.pool.statistics(), "cpu", bootstrap=20)
    for key in ("fid", "fid_std", "bootstrap_resamples"):
        assert result[key] == pytest.approx(as_evaluated[key])
    assert result["fid_std"] > 0 and result["fid_ci95"][0] < result["fid"] < result["fid_ci95"][1]


def test_compare_images_of_a_set_with_itself_is_perfect_and_counts_its_identical_pairs(tmp_path):
    real, _ = image_folders(tmp_path, count=3)
    result = compare.compare_images(real, real, "cpu", lpips_net="alex", bootstrap=10)
    assert abs(result["fid"]) < 1e-3 and result["fid_std"] < 1e-3
    # every PSNR is +inf, which has no place in a mean: no PSNR, and the pairs that were identical
    assert result["psnr"] is None and result["psnr_ci95"] is None and result["identical_pairs"] == 3
    assert result["ssim"] == pytest.approx(1.0) and result["lpips"] < 1e-6


def test_compare_images_of_pairs_gives_means_with_intervals_and_leaves_identical_pairs_out(tmp_path):
    real, fake = image_folders(tmp_path, count=4)
    names = [f"class_{i % 2}/image_{i}" for i in range(4)]
    save_images(open_images(real).read(0, 1), fake, names[:1])  # pair 0 now identical
    result = compare.compare_images(real, fake, "cpu", lpips_net="vgg", bootstrap=20)
    per_pair = psnr(open_images(real).read(0, 4), open_images(fake).read(0, 4))
    assert per_pair[0] == float("inf") and result["identical_pairs"] == 1
    assert result["psnr"] == pytest.approx(per_pair[1:].mean().item())
    for name in ("psnr", "ssim", "lpips", "lpips_alex"):  # the secondary LPIPS too, beside the reported VGG one
        low, high = result[f"{name}_ci95"]
        assert low < result[name] < high
    assert result["lpips_net"] == "vgg" and "lpips_vgg" not in result
    assert result["fid_std"] > 0 and result["bootstrap_resamples"] == 20


def test_paired_sets_of_different_sizes_and_bad_paths_raise_data_error(tmp_path):
    save_images(random_images(2, 32, seed=4), tmp_path / "small", ["a", "b"])
    save_images(random_images(2, 40, seed=5), tmp_path / "large", ["a", "b"])
    with pytest.raises(DataError, match="equal sizes"):
        compare.compare_images(tmp_path / "small", tmp_path / "large", "cpu", lpips_net="alex")
    with pytest.raises(DataError, match="missing_folder"):
        compare.compare_images(tmp_path / "missing_folder", tmp_path / "small", "cpu", lpips_net="alex")
    cfg = load_config(["stage=metrics", f"real={tmp_path / 'small'}", "device=cpu"], tmp_path)
    with pytest.raises(DataError, match="fake="):
        compare.main(cfg)


def test_paired_metrics_see_float_images_as_saved_and_lay_out_the_stage_keys():
    real = random_images(4, 32, seed=8)
    fake = (real + 0.1 * random_images(4, 32, seed=9)).clamp(-1, 1)
    as_float, as_saved = (PairedMetrics("cpu", "alex") for _ in range(2))
    as_float.update(real[:3], fake[:3])
    as_float.update(real[3:], fake[3:])
    as_saved.update(quantize_to_uint8(real), quantize_to_uint8(fake))
    floats, saved = as_float.arrays(), as_saved.arrays()
    assert list(floats) == ["psnr", "ssim", "lpips", "lpips_vgg", "real_features", "fake_features"]
    assert as_float.count == 4
    for name in ("psnr", "ssim"):  # of the saved images either way
        np.testing.assert_array_equal(floats[name], saved[name])
    np.testing.assert_allclose(floats["real_features"], saved["real_features"], rtol=1e-4, atol=1e-4)
    summary = as_float.result(bootstrap=10, seed=0)
    assert summary["psnr"]["n"] == 4 and summary["fid"]["resamples"] == 10
    assert list(flat_metrics(summary, names={"fid": "rfid"})) == [
        "rfid", "rfid_std", "rfid_ci95", "bootstrap_resamples", "psnr", "psnr_ci95", "ssim", "ssim_ci95", "lpips",
        "lpips_ci95", "lpips_vgg", "lpips_vgg_ci95"]


# ------------------------------------------------------------------------------------------ stage=evaluate
def test_evaluate_against_a_reference_npz(tmp_path):
    reference_images = random_images(5, 32, seed=6)
    reference = InceptionStatistics("cpu", spatial=True)
    for batch in reference_images.split(4):
        reference.update(torch.round((batch + 1) * 127.5).to(torch.uint8))
    mu, sigma = reference.pool.statistics()
    mu_s, sigma_s = reference.spatial.statistics()
    # ADM's layout: reference images and both statistics in one file.
    reference_path = save_statistics(tmp_path / "reference.npz", mu, sigma, mu_s=mu_s, sigma_s=sigma_s,
                                     arr_0=np.asarray(torch.round((reference_images + 1) * 127.5).to(torch.uint8)
                                                      .permute(0, 2, 3, 1)))
    samples_path = write_npz(tmp_path / "samples.npz", random_images(4, 32, seed=7))

    cfg = load_config(["stage=evaluate", f"evaluate.samples={samples_path}", f"evaluate.reference={reference_path}",
                       "evaluate.sfid=true", "evaluate.precision_recall=true", "evaluate.batch_size=4",
                       "evaluate.bootstrap=20", "device=cpu", "name=eval_test"], tmp_path)
    result = evaluate.main(cfg)
    assert result["num_samples"] == 4
    assert {"fid", "sfid", "precision", "recall"} <= set(result)
    assert "inception_score" in result["not_computed"]
    samples = InceptionStatistics("cpu", spatial=True)
    samples.update(open_images(samples_path).read(0, 4))
    # The reference file's statistics against the samples', for both FID and sFID.
    assert result["fid"] == pytest.approx(frechet_distance(mu, sigma, *samples.pool.statistics()), rel=1e-4)
    assert result["sfid"] == pytest.approx(frechet_distance(mu_s, sigma_s, *samples.spatial.statistics()), rel=1e-4)
    low, high = result["fid_ci95"]
    assert result["fid_std"] > 0 and low < result["fid"] < high and result["bootstrap_resamples"] == 20
    run_dir = tmp_path / "evaluate" / "eval_test"
    saved = json.loads((run_dir / "result.json").read_text())
    assert saved["fid"] == pytest.approx(result["fid"])
    assert np.load(run_dir / evaluate.SAMPLE_FEATURES).shape == (4, 2048)


def test_evaluate_without_samples_names_the_key(tmp_path):
    cfg = load_config(["stage=evaluate", "device=cpu"], tmp_path)
    with pytest.raises(DataError, match="evaluate.samples"):
        evaluate.main(cfg)


def test_reference_statistics_from_data_are_cached_by_fingerprint(tmp_path, monkeypatch):
    cfg = load_config(["stage=evaluate", "data=synthetic", "data.resolution=32"], tmp_path)
    cache_dir = tmp_path / "reference_stats"
    mu, sigma = evaluate.reference_statistics(cfg.data, "val", 5, 0, "cpu", cache_dir, batch_size=4)
    assert mu.shape == (2048,) and sigma.shape == (2048, 2048)
    assert len(list(cache_dir.glob("*.npz"))) == 1

    def must_not_recompute(*args, **kwargs):
        raise AssertionError("the cached statistics were not used")

    monkeypatch.setattr(evaluate, "_compute_reference", must_not_recompute)
    cached = evaluate.load_reference_cache(cfg.data, "val", 5, 0, "cpu", cache_dir, batch_size=4)
    np.testing.assert_array_equal(cached["mu"], mu)
    assert cached["subset"]["images"] == 5 and cached["subset"]["seed"] == 0  # it says which images it holds
    path = evaluate.reference_cache_path(cfg.data, "val", 5, 0, cache_dir)
    assert path.is_file()
    with open_dict(cfg):
        cfg.data.num_workers = 3  # loader settings do not change the statistics...
    assert evaluate.reference_cache_path(cfg.data, "val", 5, 0, cache_dir) == path
    # ...everything that chooses or measures the images does: subset seed, size, split, resolution, weights.
    assert evaluate.reference_cache_path(cfg.data, "val", 5, 1, cache_dir) != path
    assert evaluate.reference_cache_path(cfg.data, "val", 6, 0, cache_dir) != path
    assert evaluate.reference_cache_path(cfg.data, "train", 5, 0, cache_dir) != path
    # the whole split has no subset, so the seed cannot matter
    assert (evaluate.reference_cache_path(cfg.data, "val", None, 0, cache_dir)
            == evaluate.reference_cache_path(cfg.data, "val", None, 1, cache_dir))
    monkeypatch.setattr(evaluate, "weights_digest", lambda: "other-weights")
    assert evaluate.reference_cache_path(cfg.data, "val", 5, 0, cache_dir) != path
    monkeypatch.undo()
    with open_dict(cfg):
        cfg.data.resolution = 64
    assert evaluate.reference_cache_path(cfg.data, "val", 5, 0, cache_dir) != path


def test_reference_statistics_of_the_real_imagenet_subset(tmp_path, imagenette):
    cfg = load_config(["stage=evaluate", "data=imagefolder", f"data.root={imagenette}", "data.resolution=32",
                       "data.num_workers=0"], tmp_path)
    reference = evaluate.load_reference_cache(cfg.data, "val", 4, 0, "cpu", tmp_path, batch_size=2)
    assert reference["features"].shape == (4, 2048)
    assert reference["mu_s"].shape == (17 * 17 * 7,)
    np.testing.assert_allclose(reference["mu"], reference["features"].astype(np.float64).mean(axis=0), rtol=1e-5,
                               atol=1e-6)
