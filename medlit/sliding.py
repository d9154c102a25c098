"""Whole-volume inference of a patch network: nnU-Net's recipe on MONAI's inferer.

* The windows, their batching, padding of volumes smaller than a patch and the weighted
  stitching are MONAI's ``sliding_window_inference``.
* The weights are nnU-Net's Gaussian importance map (:func:`gaussian_importance`), given to
  MONAI as ``roi_weight_map``: MONAI's own ``mode="gaussian"`` map is built differently
  (a separable kernel centred between voxels, clamped at a floor of 1e-3 of its peak), so
  windows would blend differently from nnU-Net's.
* Mirroring TTA (:class:`Mirrored`) averages the logits of every combination of axis flips
  of each window, as nnU-Net does, before any activation.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from medlit.windows import gaussian_weights

Predictor = Callable[[Tensor], Tensor]


def gaussian_importance(
    patch: Sequence[int],
    sigma_scale: float = 1.0 / 8,
    peak: float = 10.0,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
) -> Tensor:
    """nnU-Net's importance map of a patch: a Gaussian of sigma ``sigma_scale`` × side,
    centred on voxel ``side // 2``, scaled to ``peak`` at the centre; voxels whose weight
    rounds to 0 in ``dtype`` take the smallest non-zero weight (a zero would divide by zero
    where only border voxels cover the volume). nnU-Net scales to 10 (its
    ``value_scaling_factor``); stitching divides by the summed weights, so the scale only
    matters for float16 range."""
    cached = gaussian_weights(tuple(int(p) for p in patch), float(sigma_scale), float(peak))
    weights = torch.tensor(cached, dtype=dtype, device=device)  # a copy: MONAI clamps it
    zero = weights == 0
    if zero.any():
        weights[zero] = weights[~zero].min()
    return weights


MIRROR_AXES = (0, 1, 2)


class Mirrored(torch.nn.Module):
    """``net`` averaged over every combination of flips of ``axes`` (spatial axes, 0 = z):
    8 passes for three axes, logits averaged (nnU-Net's test-time mirroring)."""

    def __init__(self, net: Predictor, axes: Sequence[int] = MIRROR_AXES) -> None:
        super().__init__()
        self.net = net
        self.flips = [
            tuple(2 + a for a in combo)
            for n in range(len(axes) + 1)
            for combo in itertools.combinations(axes, n)
        ]

    def forward(self, x: Tensor) -> Tensor:
        total = self.net(x)
        for dims in self.flips[1:]:
            total = total + torch.flip(self.net(torch.flip(x, dims)), dims)
        return total / len(self.flips)


def sliding_window(
    volume: Tensor,
    predictor: Predictor,
    patch: Sequence[int],
    overlap: float = 0.5,
    batch_size: int = 2,
    out_device: torch.device | str | None = None,
) -> Tensor:
    """Logits of a (B, C, Z, Y, X) ``volume``: ``predictor`` over windows of ``patch``
    voxels, ``overlap`` of a side shared by neighbours, ``batch_size`` windows per call,
    blended with nnU-Net's Gaussian weights. The windows run on the volume's device;
    ``out_device`` (default the volume's) holds the stitched output: give ``"cpu"`` for a
    volume whose logits do not fit beside the network on the accelerator."""
    from monai.inferers import sliding_window_inference  # MONAI takes ~2 s to import

    weights = gaussian_importance(patch, device=volume.device)
    return sliding_window_inference(
        volume,
        roi_size=tuple(int(p) for p in patch),
        sw_batch_size=batch_size,
        predictor=predictor,
        overlap=overlap,
        mode="gaussian",  # unused: roi_weight_map replaces MONAI's map
        roi_weight_map=weights,
        padding_mode="constant",
        cval=0.0,
        sw_device=volume.device,
        device=out_device or volume.device,
    )
