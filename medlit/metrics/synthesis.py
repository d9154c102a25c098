"""Metrics for image synthesis (GAN) tasks.

Paired metrics (:func:`masked_image_metrics`) compare a synthesised volume with the real one
only inside a mask, the BraTS synthesis-challenge (BraSyn) convention of scoring within the
brain so that the empty background does not inflate the scores. Unpaired metrics compare
distributions of images through features: :func:`frechet_distance` between Gaussians fitted
to two feature sets, and :func:`mean_pairwise_distance` as a diversity measure.

:class:`FeatureExtractor` never downloads anything. Without local weights it is a fixed
randomly initialised network: Fréchet distances in the feature space of a random network are
still a consistent distance between image distributions (random-network features as used by
Naeem et al. 2020, "Reliable Fidelity and Diversity Metrics for Generative Models", and
Kynkäänniemi et al. 2019/2023), but they are *not* FID and are named accordingly.
"""

from __future__ import annotations

import math
import warnings
from pathlib import Path

import numpy as np
import timm
import torch
import torch.nn.functional as F
from scipy import linalg
from torch import Tensor
from torchmetrics.functional.image import structural_similarity_index_measure

from medlit.models import load_weights

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def masked_image_metrics(
    pred: Tensor, target: Tensor, mask: Tensor, data_range: float | None = None
) -> dict[str, float]:
    """MAE, PSNR and SSIM of one volume, evaluated only inside ``mask`` (e.g. the brain).

    Follows the BraTS synthesis-challenge convention of scoring within the brain. The SSIM
    map is computed slice-wise in 2D over the whole image (gaussian kernel 11, sigma 1.5,
    reflect padding, torchmetrics), then averaged over the mask voxels only.

    Args:
        pred: Synthesised volume, (Z, Y, X) or a 2D image (Y, X); Y and X must exceed 5.
        target: Real volume, same shape and intensity units as ``pred``.
        mask: Boolean mask, same shape; only its voxels are scored.
        data_range: Intensity range for PSNR and SSIM, in the units of ``target``. Default:
            ``target.max() - target.min()`` over the mask.

    Returns:
        ``{"mae": ..., "psnr": ..., "ssim": ...}``: MAE in intensity units, PSNR in dB
        (``inf`` when the MSE is 0), SSIM in [-1, 1].

    Raises:
        ValueError: on shape mismatch, an empty ``mask``, or a zero data range.
    """
    if not (pred.shape == target.shape == mask.shape) or pred.ndim not in (2, 3):
        raise ValueError(
            f"pred, target and mask must share a (Z, Y, X) or (Y, X) shape, "
            f"got {tuple(pred.shape)}, {tuple(target.shape)}, {tuple(mask.shape)}"
        )
    mask = mask.bool()
    if not mask.any():
        raise ValueError("mask is empty: no voxels to score")
    pred, target = pred.detach().double(), target.detach().double()
    if pred.ndim == 2:
        pred, target, mask = pred[None], target[None], mask[None]
    p, t = pred[mask], target[mask]
    if data_range is None:
        data_range = float(t.max() - t.min())
    if not data_range > 0:
        raise ValueError(f"data_range must be > 0, got {data_range} (pass it explicitly)")
    err = p - t
    mse = float((err**2).mean())
    psnr = math.inf if mse == 0 else 10.0 * math.log10(data_range**2 / mse)
    _, ssim_map = structural_similarity_index_measure(
        pred[:, None],
        target[:, None],
        gaussian_kernel=True,
        sigma=1.5,
        kernel_size=11,
        data_range=data_range,
        reduction="none",
        return_full_image=True,
    )
    ssim = float(ssim_map[:, 0][mask].mean())
    return {"mae": float(err.abs().mean()), "psnr": psnr, "ssim": ssim}


def _as_2d_float64(feats: Tensor | np.ndarray, name: str) -> np.ndarray:
    if isinstance(feats, Tensor):
        feats = feats.detach().cpu().double().numpy()
    feats = np.asarray(feats, dtype=np.float64)
    if feats.ndim != 2 or feats.shape[0] < 2:
        raise ValueError(f"{name} must be (N, D) with N >= 2, got shape {feats.shape}")
    return feats


def frechet_distance(
    feats_a: Tensor | np.ndarray, feats_b: Tensor | np.ndarray, eps: float = 1e-6
) -> float:
    """Fréchet distance between Gaussians fitted to two feature sets.

    ``||mu_a - mu_b||² + Tr(S_a + S_b - 2 (S_a S_b)^(1/2))``, in float64, with the matrix
    square root from ``scipy.linalg.sqrtm`` as in the reference implementations (pytorch-fid,
    TTUR): when the product is singular, ``eps·I`` is added to both covariances, and a
    negligible imaginary part from numerical error is dropped. Written here rather than with
    torchmetrics' FID because that one is tied to its Inception network.

    Args:
        feats_a: Features of the first set, (N_a, D).
        feats_b: Features of the second set, (N_b, D).
        eps: Diagonal offset used only when ``S_a S_b`` is singular.

    Returns:
        The distance (≥ 0, in squared feature units).

    Raises:
        ValueError: on bad shapes, or a large imaginary part in the square root.
    """
    a, b = _as_2d_float64(feats_a, "feats_a"), _as_2d_float64(feats_b, "feats_b")
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"feature dimensions differ: {a.shape[1]} vs {b.shape[1]}")
    mu_a, mu_b = a.mean(0), b.mean(0)
    s_a, s_b = np.atleast_2d(np.cov(a, rowvar=False)), np.atleast_2d(np.cov(b, rowvar=False))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", linalg.LinAlgWarning)
        covmean = linalg.sqrtm(s_a @ s_b)
    singular = any(issubclass(w.category, linalg.LinAlgWarning) for w in caught)
    if singular or not np.isfinite(covmean).all():
        offset = np.eye(s_a.shape[0]) * eps
        covmean = linalg.sqrtm((s_a + offset) @ (s_b + offset))
    if np.iscomplexobj(covmean):
        imag = np.abs(np.diagonal(covmean).imag).max()
        if imag > 1e-3:
            raise ValueError(f"matrix square root has a large imaginary component {imag}")
        covmean = covmean.real
    diff = mu_a - mu_b
    fd = diff @ diff + np.trace(s_a) + np.trace(s_b) - 2.0 * np.trace(covmean)
    return max(float(fd), 0.0)


def mean_pairwise_distance(feats: Tensor | np.ndarray) -> float:
    """Mean Euclidean distance over all distinct pairs of rows (diversity; ~0 on collapse).

    Args:
        feats: Features, (N, D) with N >= 2.

    Returns:
        The mean of the N(N-1)/2 pairwise distances, in feature units.
    """
    x = torch.from_numpy(_as_2d_float64(feats, "feats"))
    return float(torch.pdist(x).mean())


class FeatureExtractor(torch.nn.Module):
    """Frozen timm backbone giving global-pooled features for :func:`frechet_distance`.

    Never downloads: the model is built with ``pretrained=False`` and either loaded from a
    local state dict (``weights``) or initialised deterministically from ``seed`` without
    touching the global RNG. Always in eval mode, with no gradients.

    Attributes:
        name: Honest metric name, ``fd_<model>_random`` or ``fd_<model>_<weights stem>``.
    """

    def __init__(
        self,
        model: str = "resnet18",
        weights: str | None = None,
        image_size: int = 64,
        seed: int = 0,
    ) -> None:
        """Build the backbone.

        Args:
            model: timm model name (``num_classes=0`` gives pooled features).
            weights: Path to a local state dict; ``None`` for fixed random weights.
            image_size: Side in pixels that inputs are resized to.
            seed: Seed of the random initialisation (ignored for tensors loaded from weights).
        """
        super().__init__()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            try:
                # Residual branches left random rather than zeroed, so a random-weights
                # ResNet is not reduced to its stem and shortcut convolutions.
                self.net = timm.create_model(
                    model, pretrained=False, num_classes=0, zero_init_last=False
                )
            except TypeError:  # models without that option
                self.net = timm.create_model(model, pretrained=False, num_classes=0)
        if weights is not None:
            load_weights(self.net, weights)
        self.name = f"fd_{model}_{Path(weights).stem if weights else 'random'}"
        self.image_size = image_size
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1))
        self.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True) -> FeatureExtractor:
        """Stay in eval mode whatever a parent module asks (batch-norm statistics fixed)."""
        return super().train(False)

    @torch.no_grad()
    def forward(self, images: Tensor) -> Tensor:
        """Features of a batch.

        Args:
            images: (N, C, H, W) with C 1 or 3, intensities in [-1, 1].

        Returns:
            (N, F) float32 features (F = 512 for resnet18).
        """
        if images.ndim != 4 or images.shape[1] not in (1, 3):
            raise ValueError(f"images must be (N, 1 or 3, H, W), got {tuple(images.shape)}")
        x = images.float().expand(-1, 3, -1, -1)
        if x.shape[-2:] != (self.image_size, self.image_size):
            size = (self.image_size, self.image_size)
            x = F.interpolate(x, size=size, mode="bilinear", align_corners=False)
        x = ((x + 1) / 2 - self.mean) / self.std
        return self.net(x).float()
