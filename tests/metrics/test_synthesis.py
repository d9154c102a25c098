"""Synthesis metrics: masked MAE/PSNR/SSIM, Fréchet distance, diversity, feature extractor."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from medlit.metrics.synthesis import (
    FeatureExtractor,
    frechet_distance,
    masked_image_metrics,
    mean_pairwise_distance,
)


def _volume_and_mask() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    vol = torch.rand(4, 24, 24, generator=g)  # intensities in [0, 1)
    mask = torch.zeros(4, 24, 24, dtype=torch.bool)
    mask[:, 6:18, 6:18] = True
    return vol, mask


def test_masked_metrics_identical_volumes() -> None:
    vol, mask = _volume_and_mask()
    m = masked_image_metrics(vol, vol.clone(), mask)
    assert m["mae"] == 0.0
    assert m["psnr"] == math.inf
    assert m["ssim"] == pytest.approx(1.0, abs=1e-6)
    m2d = masked_image_metrics(vol[0], vol[0].clone(), mask[0])
    assert m2d["mae"] == 0.0 and m2d["ssim"] == pytest.approx(1.0, abs=1e-6)


def test_masked_metrics_constant_offset_hand_computed() -> None:
    vol, mask = _volume_and_mask()
    pred = vol.clone()
    pred[mask] += 0.1
    # MAE = |0.1| = 0.1; MSE = 0.1² = 0.01; data_range = 2.0 (given):
    # PSNR = 10·log10(2.0² / 0.01) = 10·log10(400) = 26.0206 dB.
    m = masked_image_metrics(pred, vol, mask, data_range=2.0)
    assert m["mae"] == pytest.approx(0.1, rel=1e-6)
    assert m["psnr"] == pytest.approx(10 * math.log10(400.0), rel=1e-6)
    assert m["psnr"] == pytest.approx(26.0206, abs=1e-4)
    assert 0.0 < m["ssim"] < 1.0
    # Default data_range: max - min of the target over the mask.
    r = float(vol[mask].max() - vol[mask].min())
    m = masked_image_metrics(pred, vol, mask)
    assert m["psnr"] == pytest.approx(10 * math.log10(r**2 / 0.01), rel=1e-6)


def test_masked_metrics_ignore_voxels_outside_mask() -> None:
    vol, mask = _volume_and_mask()
    pred = vol + 0.05
    ref = masked_image_metrics(pred, vol, mask, data_range=1.0)
    far = torch.zeros_like(mask)  # more than SSIM's kernel radius (5) away from the mask
    far[:, :, :1] = True
    changed = pred.clone()
    changed[far] = 100.0
    target_changed = vol.clone()
    target_changed[far] = -50.0
    out = masked_image_metrics(changed, target_changed, mask, data_range=1.0)
    assert out == pytest.approx(ref, rel=1e-9)
    # mae and psnr ignore any voxel outside, even adjacent ones.
    pred_all = pred.clone()
    pred_all[~mask] = 7.0
    out = masked_image_metrics(pred_all, vol, mask, data_range=1.0)
    assert out["mae"] == pytest.approx(ref["mae"]) and out["psnr"] == pytest.approx(ref["psnr"])


def test_masked_metrics_empty_mask_raises() -> None:
    vol, mask = _volume_and_mask()
    with pytest.raises(ValueError, match="mask"):
        masked_image_metrics(vol, vol, torch.zeros_like(mask))


def test_frechet_distance_identical_and_symmetric() -> None:
    rng = np.random.default_rng(0)
    a = rng.normal(size=(500, 4))
    assert abs(frechet_distance(a, a)) < 1e-6
    assert abs(frechet_distance(torch.from_numpy(a), torch.from_numpy(a.copy()))) < 1e-6
    b = rng.normal(1.0, 2.0, size=(400, 4))
    assert frechet_distance(a, b) == pytest.approx(frechet_distance(b, a), rel=1e-9)


def test_frechet_distance_closed_form_diagonal_gaussians() -> None:
    rng = np.random.default_rng(1)
    mu_a, mu_b = np.array([0.0, 1.0, -1.0, 2.0]), np.array([1.0, 1.0, 0.5, 0.0])
    var_a, var_b = np.array([1.0, 4.0, 0.25, 2.0]), np.array([2.0, 1.0, 1.0, 0.5])
    a = mu_a + rng.normal(size=(4000, 4)) * np.sqrt(var_a)
    b = mu_b + rng.normal(size=(4000, 4)) * np.sqrt(var_b)
    # ||Δμ||² = 1 + 0 + 2.25 + 4 = 7.25
    # Σ(σa + σb − 2√(σa σb)) = (3 − 2√2) + (5 − 4) + (1.25 − 1) + (2.5 − 2) = 1.75 + 3 − 2√2
    expected = 7.25 + 1.75 + 3.0 - 2.0 * math.sqrt(2.0)
    assert expected == pytest.approx(
        np.sum((mu_a - mu_b) ** 2) + np.sum(var_a + var_b - 2 * np.sqrt(var_a * var_b))
    )
    assert frechet_distance(a, b) == pytest.approx(expected, rel=0.02)


def test_frechet_distance_singular_covariance() -> None:
    rng = np.random.default_rng(2)
    a, b = rng.normal(size=(3, 8)), rng.normal(size=(3, 8))  # N < D: singular covariances
    fd = frechet_distance(a, b)
    assert math.isfinite(fd) and fd >= 0.0


def test_mean_pairwise_distance() -> None:
    pts = torch.tensor([[0.0, 0.0], [3.0, 0.0], [0.0, 4.0]])
    # Pairs: |(0,0)-(3,0)| = 3, |(0,0)-(0,4)| = 4, |(3,0)-(0,4)| = 5; mean = 12 / 3 = 4.
    assert mean_pairwise_distance(pts) == pytest.approx(4.0)
    assert mean_pairwise_distance(torch.ones(5, 3)) == 0.0


@pytest.fixture
def no_downloads(monkeypatch: pytest.MonkeyPatch) -> None:
    def _refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("FeatureExtractor tried to download weights")

    monkeypatch.setattr(torch.hub, "download_url_to_file", _refuse)
    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", _refuse)
    import timm.models

    monkeypatch.setattr(timm.models, "load_checkpoint", _refuse)


def test_feature_extractor_deterministic_offline(no_downloads: None) -> None:
    state = torch.get_rng_state()
    ext = FeatureExtractor("resnet18", image_size=32, seed=0)
    assert torch.equal(torch.get_rng_state(), state)
    assert ext.name == "fd_resnet18_random" and "fid" not in ext.name
    assert not ext.training and not any(p.requires_grad for p in ext.parameters())
    ext.train()
    assert not ext.training and not ext.net.training

    images = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1
    feats = ext(images)
    assert feats.shape == (2, 512) and feats.dtype == torch.float32
    assert not feats.requires_grad
    assert torch.equal(feats, FeatureExtractor("resnet18", image_size=32, seed=0)(images))
    other = FeatureExtractor("resnet18", image_size=32, seed=1)(images)
    assert not torch.allclose(feats, other)
    assert ext(images[:, :1]).shape == (2, 512)


def test_feature_extractor_local_weights(tmp_path, no_downloads: None) -> None:
    src = FeatureExtractor("resnet10t", image_size=32, seed=3)
    path = tmp_path / "my_encoder.pt"
    torch.save(src.net.state_dict(), path)
    ext = FeatureExtractor("resnet10t", weights=str(path), image_size=32, seed=0)
    assert ext.name == "fd_resnet10t_my_encoder"
    images = torch.zeros(1, 1, 40, 40)
    assert torch.equal(ext(images), src(images))


def test_frechet_distance_separates_noise_from_constant() -> None:
    g = torch.Generator().manual_seed(0)
    ext = FeatureExtractor("resnet10t", image_size=32, seed=0)
    noise_a = ext(torch.rand(16, 1, 32, 32, generator=g) * 2 - 1)
    noise_b = ext(torch.rand(16, 1, 32, 32, generator=g) * 2 - 1)
    const = ext(torch.full((16, 1, 32, 32), 0.3))
    assert frechet_distance(noise_a, noise_b) < frechet_distance(noise_a, const)
    assert mean_pairwise_distance(const) == pytest.approx(0.0, abs=1e-4)
    assert mean_pairwise_distance(noise_a) > 0.0
