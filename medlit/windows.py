"""Whole-volume inference in NumPy, for ``medlit.deploy`` (an exported network on
onnxruntime, no torch): the slice-by-slice pass of 2D/2.5D networks and the Gaussian
sliding window of 3D ones, with mirroring. They follow :mod:`medlit.sliding` and
``medlit.tasks.base.predict_slices`` step for step, so that a deployed model writes the
labels ``medlit.predict`` writes: the windows are placed as MONAI's
``sliding_window_inference`` places them (``dense_patch_slices``: a stride of
``int(side × (1 - overlap))``, the last window flush with the end, volumes smaller than a
patch zero-padded around the centre), weighted by nnU-Net's Gaussian map
(:func:`gaussian_weights`, which ``medlit.sliding`` gives MONAI too). Written by hand
because MONAI's inferer is torch-only."""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Sequence
from functools import lru_cache

import numpy as np
from scipy.ndimage import gaussian_filter

Network = Callable[[np.ndarray], np.ndarray]  # a batch (B, C, ...) -> logits (B, K, ...)


@lru_cache(maxsize=8)
def gaussian_weights(patch: tuple[int, ...], sigma_scale: float = 1 / 8, peak: float = 10.0):
    """nnU-Net's importance map of a patch: a Gaussian of sigma ``sigma_scale`` × side,
    centred on voxel ``side // 2``, scaled to ``peak`` (float64; zeros are left to the
    caller). Computed once per patch (a filter over the whole patch: 14 ms for the 3D
    demo's, 0.25 s for 128³) and shared, so read-only: callers copy it."""
    delta = np.zeros(patch)
    delta[tuple(p // 2 for p in patch)] = 1.0
    # The impulse response of scipy's Gaussian filter (zero outside the patch) is the map.
    weights = gaussian_filter(delta, [p * sigma_scale for p in patch], order=0, mode="constant")
    weights /= weights.max() / peak
    weights.setflags(write=False)
    return weights


def window_starts(size: int, side: int, overlap: float) -> list[int]:
    """Where the windows of one axis start (MONAI's ``dense_patch_slices``)."""
    step = side if side == size else max(int(side * (1 - overlap)), 1)
    count = next((d + 1 for d in range(math.ceil(size / step)) if d * step + side >= size), 1)
    return [i * step - max(i * step + side - size, 0) for i in range(count)]


def mirrored(net: Network, axes: Sequence[int]) -> Network:
    """``net`` averaged over every combination of flips of the spatial ``axes``."""
    flips = [
        tuple(2 + a for a in combo)
        for n in range(len(axes) + 1)
        for combo in itertools.combinations(axes, n)
    ]

    def run(x: np.ndarray) -> np.ndarray:
        total = net(x)
        for dims in flips[1:]:
            total = total + np.flip(net(np.ascontiguousarray(np.flip(x, dims))), dims)
        return total / len(flips)

    return run


def sliding_window(
    volume: np.ndarray, net: Network, patch: Sequence[int], overlap: float, batch_size: int
) -> np.ndarray:
    """Logits (K, Z, Y, X) of a (C, Z, Y, X) ``volume`` from windows of ``patch``."""
    patch = tuple(int(p) for p in patch)
    shape = volume.shape[1:]
    pads = [
        (max(p - s, 0) // 2, max(p - s, 0) - max(p - s, 0) // 2)
        for p, s in zip(patch, shape, strict=True)
    ]
    padded = np.pad(volume, [(0, 0), *pads])
    weights = gaussian_weights(patch).astype(np.float32)
    if (weights == 0).any():
        weights[weights == 0] = weights[weights > 0].min()
    starts = list(
        itertools.product(
            *(window_starts(n, p, overlap) for n, p in zip(padded.shape[1:], patch, strict=True))
        )
    )
    total: np.ndarray | None = None
    norm = np.zeros(padded.shape[1:], np.float32)
    for i in range(0, len(starts), batch_size):
        group = starts[i : i + batch_size]
        boxes = [tuple(slice(a, a + p) for a, p in zip(s, patch, strict=True)) for s in group]
        logits = net(np.stack([padded[(slice(None), *b)] for b in boxes]).astype(np.float32))
        if total is None:
            total = np.zeros((logits.shape[1], *padded.shape[1:]), np.float32)
        for out, box in zip(logits, boxes, strict=True):
            total[(slice(None), *box)] += out * weights
            norm[box] += weights
    assert total is not None
    total /= norm
    crop = tuple(slice(a, a + s) for (a, _), s in zip(pads, shape, strict=True))
    return total[(slice(None), *crop)]


def stacked(volume: np.ndarray, zs: np.ndarray, context: int) -> np.ndarray:
    """Slices ``zs`` of a (C, Z, Y, X) volume with ``context`` slices on each side
    (clamped at the ends) as channels: (N, C·(2·context + 1), Y, X), slice-major
    (``medlit.datasets.slices.stack_slices``)."""
    idx = np.clip(zs[:, None] + np.arange(-context, context + 1), 0, volume.shape[1] - 1)
    return np.moveaxis(volume[:, idx], 0, 2).reshape(len(zs), -1, *volume.shape[2:])


def slices(
    volume: np.ndarray, net: Network, in_channels: int, batch_size: int, multiple: int, least: int
) -> np.ndarray:
    """Logits (K, Z, Y, X) of a 2D/2.5D network over a (C, Z, Y, X) volume, slice by slice
    along z, each with its context slices (clamped at the ends) as channels; slices padded
    with zeros to a ``multiple`` of the network's downsampling, at least ``least``."""
    channels, depth, height, width = volume.shape
    context = (in_channels // channels - 1) // 2
    ph = max(-(-height // multiple) * multiple, least) - height
    pw = max(-(-width // multiple) * multiple, least) - width
    out = []
    for start in range(0, depth, batch_size):
        zs = np.arange(start, min(start + batch_size, depth))
        stack = np.pad(stacked(volume, zs, context), [(0, 0), (0, 0), (0, ph), (0, pw)])
        stack = stack.astype(np.float32)
        out.append(net(stack)[..., :height, :width])
    return np.concatenate(out).transpose(1, 0, 2, 3)


def linear_along(x: np.ndarray, axis: int, n: int, scale: float) -> np.ndarray:
    """``x`` sampled linearly at ``n`` points ``i * scale`` along ``axis``, the points
    clamped to the axis's end voxels (``medlit.tasks.segmentation``'s resampling back to a
    case's own grid)."""
    m = x.shape[axis]
    pos = np.clip(np.arange(n, dtype=np.float64) * scale, 0, m - 1)
    lo = np.floor(pos).astype(np.int64)
    hi = np.minimum(lo + 1, m - 1)
    view = [1] * x.ndim
    view[axis] = n
    w = (pos - lo).astype(x.dtype).reshape(view)
    return np.take(x, lo, axis) * (1 - w) + np.take(x, hi, axis) * w
