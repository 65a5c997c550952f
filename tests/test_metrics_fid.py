"""FID: the Fréchet distance, its statistics, and the offline Inception against torch-fidelity's definition."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from shared.data.image_files import NpzWriter, open_images, save_images, write_npz
from shared.data.transforms import quantize_to_uint8
from shared.errors import DataError
from shared.metrics.fid import (
    InceptionStatistics,
    StatisticsAccumulator,
    feature_statistics,
    frechet_distance,
    load_statistics,
    precision_recall,
    save_statistics,
)
from shared.metrics.inception import InceptionFeatures, load_inception


def gaussian_features(n: int, dim: int, seed: int, shift: float = 0.0) -> np.ndarray:
    """n draws of one correlated Gaussian per dim (the mixing is fixed), shifted by `shift`."""
    mixing = np.random.default_rng(dim).normal(size=(dim, dim)) / np.sqrt(dim)
    return np.random.default_rng(seed).normal(size=(n, dim)) @ mixing + shift


def fid_by_eigenvalues(mu1, sigma1, mu2, sigma2) -> float:
    """Independent route: Tr sqrt(S1 S2) = Σ sqrt(λ_i(S1 S2)), the eigenvalues being real and >= 0 for PSD S1, S2."""
    eigenvalues = np.linalg.eigvals(sigma1 @ sigma2)
    return float(np.sum((mu1 - mu2) ** 2) + np.trace(sigma1) + np.trace(sigma2)
                 - 2 * np.sum(np.sqrt(np.clip(eigenvalues.real, 0, None))))


# ------------------------------------------------------------------------------------------ Fréchet distance
def test_statistics_match_numpy_mean_and_unbiased_covariance():
    features = gaussian_features(200, 16, seed=0)
    mu, sigma = feature_statistics(features)
    np.testing.assert_allclose(mu, features.mean(axis=0), atol=1e-12)
    np.testing.assert_allclose(sigma, np.cov(features, rowvar=False), atol=1e-12)


def test_streaming_accumulator_equals_one_shot_statistics():
    features = torch.from_numpy(gaussian_features(300, 12, seed=1, shift=5.0)).float()
    accumulator = StatisticsAccumulator()
    for chunk in features.split(37):  # batches of uneven size, float32 input
        accumulator.update(chunk)
    mu, sigma = accumulator.statistics()
    reference_mu, reference_sigma = feature_statistics(features.double())
    np.testing.assert_allclose(mu, reference_mu, rtol=1e-10)
    np.testing.assert_allclose(sigma, reference_sigma, rtol=1e-8, atol=1e-10)


def test_fid_of_a_set_against_itself_is_zero():
    mu, sigma = feature_statistics(gaussian_features(500, 32, seed=2))
    assert abs(frechet_distance(mu, sigma, mu, sigma)) < 1e-6


def test_fid_against_shifted_set_is_positive_symmetric_and_counts_the_mean_shift():
    mu1, sigma1 = feature_statistics(gaussian_features(500, 32, seed=3))
    mu2, sigma2 = mu1 + 0.5, sigma1  # same covariance: FID is exactly the squared mean shift
    assert frechet_distance(mu1, sigma1, mu2, sigma2) == pytest.approx(32 * 0.25, rel=1e-6)
    mu3, sigma3 = feature_statistics(gaussian_features(400, 32, seed=4, shift=0.3))
    forward = frechet_distance(mu1, sigma1, mu3, sigma3)
    assert forward > 0
    assert forward == pytest.approx(frechet_distance(mu3, sigma3, mu1, sigma1), rel=1e-6)


def test_fid_matches_independent_computations():
    from torch_fidelity.metric_fid import fid_statistics_to_metric

    mu1, sigma1 = feature_statistics(gaussian_features(300, 24, seed=5))
    mu2, sigma2 = feature_statistics(gaussian_features(250, 24, seed=6, shift=0.2))
    ours = frechet_distance(mu1, sigma1, mu2, sigma2)
    fidelity = fid_statistics_to_metric({"mu": mu1, "sigma": sigma1}, {"mu": mu2, "sigma": sigma2}, False)
    assert ours == pytest.approx(fidelity["frechet_inception_distance"], rel=1e-6)
    assert ours == pytest.approx(fid_by_eigenvalues(mu1, sigma1, mu2, sigma2), rel=1e-6)


def test_fid_with_fewer_samples_than_dimensions_stays_finite():
    mu1, sigma1 = feature_statistics(gaussian_features(10, 64, seed=7))
    mu2, sigma2 = feature_statistics(gaussian_features(10, 64, seed=8))
    assert np.isfinite(frechet_distance(mu1, sigma1, mu2, sigma2))


def test_fid_rejects_statistics_of_different_dimensions():
    mu, sigma = feature_statistics(gaussian_features(50, 8, seed=9))
    with pytest.raises(DataError):
        frechet_distance(mu, sigma, mu[:4], sigma[:4, :4])


def test_statistics_round_trip_and_adm_reference_layout(tmp_path):
    mu, sigma = feature_statistics(gaussian_features(100, 8, seed=10))
    loaded_mu, loaded_sigma = load_statistics(save_statistics(tmp_path / "ours.npz", mu, sigma))
    np.testing.assert_array_equal(loaded_mu, mu)
    np.testing.assert_array_equal(loaded_sigma, sigma)

    # ADM's reference batches: images in arr_0, float32 pool and spatial statistics.
    adm = tmp_path / "VIRTUAL_ref.npz"
    np.savez(adm, arr_0=np.zeros((2, 8, 8, 3), np.uint8), mu=mu.astype(np.float32),
             sigma=sigma.astype(np.float32), mu_s=mu[:4], sigma_s=sigma[:4, :4])
    adm_mu, adm_sigma = load_statistics(adm)
    assert adm_mu.dtype == np.float64 and adm_sigma.shape == (8, 8)
    assert load_statistics(adm, spatial=True)[0].shape == (4,)

    np.savez(tmp_path / "images_only.npz", arr_0=np.zeros((2, 8, 8, 3), np.uint8))
    with pytest.raises(DataError, match="images_only.npz"):
        load_statistics(tmp_path / "images_only.npz")
    with pytest.raises(DataError, match="missing.npz"):
        load_statistics(tmp_path / "missing.npz")


def test_precision_recall_separates_overlapping_from_disjoint_sets():
    real = torch.from_numpy(gaussian_features(200, 8, seed=11)).float()
    same_distribution = torch.from_numpy(gaussian_features(200, 8, seed=12)).float()
    far_away = same_distribution + 100.0
    overlapping = precision_recall(real, same_distribution)
    assert overlapping["precision"] > 0.7 and overlapping["recall"] > 0.7
    assert precision_recall(real, far_away) == {"precision": 0.0, "recall": 0.0}
    # A collapsed generator (all fakes near one real point) is precise but has no recall.
    collapsed = real[:1] + 1e-3 * torch.randn(200, 8, generator=torch.Generator().manual_seed(0))
    mode_collapse = precision_recall(real, collapsed)
    assert mode_collapse["precision"] == 1.0 and mode_collapse["recall"] < 0.1


# ------------------------------------------------------------------------------------------ images on disk
def test_quantize_matches_png_round_trip(tmp_path):
    images = torch.rand(3, 3, 9, 7, generator=torch.Generator().manual_seed(0)) * 2.2 - 1.1  # also out of range
    save_images(images, tmp_path, ["a", "b", "c"])
    on_disk = open_images(tmp_path).read(0, 3)
    assert torch.equal(on_disk, quantize_to_uint8(images))
    expected = torch.round(torch.clamp((images + 1) * 127.5, 0, 255)).to(torch.uint8)
    assert torch.equal(quantize_to_uint8(images), expected)


def test_npz_writer_streams_adm_layout_and_reader_slices_it(tmp_path):
    images = torch.rand(5, 3, 6, 4, generator=torch.Generator().manual_seed(1)) * 2 - 1
    with NpzWriter(tmp_path / "samples.npz", num_images=5, height=6, width=4) as writer:
        writer.write(images[:2], torch.tensor([3, 1]))
        writer.write(images[2:], torch.tensor([0, 0, 2]))
    with np.load(tmp_path / "samples.npz") as npz:
        assert npz["arr_0"].dtype == np.uint8 and npz["arr_0"].shape == (5, 6, 4, 3)
        np.testing.assert_array_equal(npz["arr_1"], [3, 1, 0, 0, 2])
    reader = open_images(tmp_path / "samples.npz")
    expected = quantize_to_uint8(images)
    assert torch.equal(reader.read(1, 4), expected[1:4])
    assert torch.equal(torch.cat([batch for _, batch in reader.batches(2)]), expected)
    with pytest.raises(ValueError):  # fewer images than declared leaves no file behind
        with NpzWriter(tmp_path / "short.npz", num_images=3, height=6, width=4) as writer:
            writer.write(images[:2])
    assert sorted(path.name for path in tmp_path.iterdir()) == ["samples.npz"]  # nor its temporary


def test_bad_image_sources_raise_data_error_naming_the_path(tmp_path):
    with pytest.raises(DataError, match="nowhere"):
        open_images(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="empty"):
        open_images(tmp_path / "empty")
    np.savez(tmp_path / "floats.npz", arr_0=np.zeros((2, 4, 4, 3), np.float32))
    with pytest.raises(DataError, match="floats.npz"):
        open_images(tmp_path / "floats.npz")
    save_images(torch.zeros(1, 3, 8, 8), tmp_path / "mixed", ["a"])
    save_images(torch.zeros(1, 3, 8, 6), tmp_path / "mixed", ["b"])
    with pytest.raises(DataError, match="b.png"):
        open_images(tmp_path / "mixed").read(0, 2)


# ------------------------------------------------------------------------------------------ Inception
def torch_fidelity_state_dict(ours: InceptionFeatures, monkeypatch, tmp_path) -> dict[str, torch.Tensor]:
    """Our TorchScript weights under torch-fidelity's InceptionV3 names (conv -> conv, beta -> bn.bias, ...)."""
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    empty = tmp_path / "empty.pth"
    torch.save({}, empty)
    with monkeypatch.context() as patch:  # an untrained skeleton, only to learn the parameter names in order
        patch.setattr(FeatureExtractorInceptionV3, "load_state_dict", lambda self, state: None)
        skeleton = FeatureExtractorInceptionV3("skeleton", ["2048"], feature_extractor_weights_path=str(empty))
    target = skeleton.state_dict()
    source = ours.net.state_dict()
    source_convs = [key[: -len(".weight")] for key in source if key.endswith(".weight")]
    target_convs = [key[: -len(".conv.weight")] for key in target if key.endswith(".conv.weight")]
    assert len(source_convs) == len(target_convs) == 94
    converted = {}
    for ts_name, tf_name in zip(source_convs, target_convs):
        assert source[f"{ts_name}.weight"].shape == target[f"{tf_name}.conv.weight"].shape, (ts_name, tf_name)
        converted[f"{tf_name}.conv.weight"] = source[f"{ts_name}.weight"]
        converted[f"{tf_name}.bn.weight"] = torch.ones_like(source[f"{ts_name}.beta"])  # the TF graph has no scale
        converted[f"{tf_name}.bn.bias"] = source[f"{ts_name}.beta"]
        converted[f"{tf_name}.bn.running_mean"] = source[f"{ts_name}.mean"]
        converted[f"{tf_name}.bn.running_var"] = source[f"{ts_name}.var"]
        converted[f"{tf_name}.bn.num_batches_tracked"] = torch.tensor(0)
    converted["fc.weight"] = torch.zeros_like(target["fc.weight"])  # the 1008-class head is not in our weights
    converted["fc.bias"] = torch.zeros_like(target["fc.bias"])
    return converted


def test_inception_features_equal_torch_fidelity_at_a_non_299_size(monkeypatch, tmp_path):
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    ours = load_inception("cpu")
    weights = tmp_path / "inception-2015-12-05-from-fid-helper.pth"
    torch.save(torch_fidelity_state_dict(ours, monkeypatch, tmp_path), weights)
    reference = FeatureExtractorInceptionV3("inception-test", ["2048"], feature_extractor_weights_path=str(weights))

    images = torch.randint(0, 256, (3, 3, 64, 80), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        (expected,) = reference(images)
        pool, spatial = ours.pool_and_spatial(images)
    assert pool.shape == (3, 2048) and spatial.shape == (3, 17 * 17 * 7)
    torch.testing.assert_close(pool, expected, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(ours(images), pool)  # the spatial path runs the same network
    assert (pool - pool.mean(dim=0)).abs().max() > 1e-3  # different images give different features


def test_inception_is_cached_frozen_and_rejects_float_input():
    model = load_inception("cpu")
    assert load_inception("cpu") is model
    assert not any(p.requires_grad for p in model.parameters())
    model.train()
    assert not model.training
    with pytest.raises(ValueError):
        model(torch.zeros(1, 3, 32, 32))


def test_inception_statistics_stream_batches_from_disk_like_one_batch(tmp_path):
    images = torch.rand(5, 3, 32, 32, generator=torch.Generator().manual_seed(3)) * 2 - 1
    write_npz(tmp_path / "images.npz", images)
    streamed = InceptionStatistics("cpu", spatial=True, keep_features=True)
    for _, batch in open_images(tmp_path / "images.npz").batches(2):
        streamed.update(batch)
    with torch.no_grad():
        pool, spatial = load_inception("cpu").pool_and_spatial(quantize_to_uint8(images))
    assert streamed.count == 5
    torch.testing.assert_close(streamed.features(), pool, rtol=1e-4, atol=1e-4)
    mu, sigma = streamed.pool.statistics()
    np.testing.assert_allclose(mu, pool.double().mean(dim=0).numpy(), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(streamed.spatial.statistics()[0], spatial.double().mean(dim=0).numpy(),
                               rtol=1e-4, atol=1e-5)


def test_a_batch_seen_before_takes_its_features_from_the_cache_and_another_batch_does_not(monkeypatch):
    from shared.metrics import fid as fid_module

    calls = []

    def counting_inception(images):
        calls.append(images.shape[0])
        return images.float().mean(dim=(2, 3)).repeat(1, 4)  # (B, 12): a stand-in for the pool features

    monkeypatch.setattr(fid_module, "load_inception", lambda device: counting_inception)
    monkeypatch.setattr(fid_module, "_POOL_CACHE", type(fid_module._POOL_CACHE)())
    images = torch.randint(0, 256, (3, 3, 8, 8), dtype=torch.uint8)
    first, again = InceptionStatistics("cpu", keep_features=True), InceptionStatistics("cpu", keep_features=True)
    first.update(images)
    again.update(images.clone())  # the same bytes in another tensor
    assert calls == [3] and torch.equal(first.features(), again.features())
    changed = images.clone()
    changed[0, 0, 0, 0] ^= 1  # one grey level of one pixel
    again.update(changed)
    assert calls == [3, 3] and not torch.equal(again.features()[3:], first.features())
    monkeypatch.setattr(fid_module, "POOL_CACHE_BATCHES", 1)
    InceptionStatistics("cpu").update(torch.zeros_like(images))  # evicts both earlier batches
    InceptionStatistics("cpu").update(images)
    assert calls == [3, 3, 3, 3]
