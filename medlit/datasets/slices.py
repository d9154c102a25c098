"""Axial slices of (C, z, y, x) volumes, shared by the 2D/2.5D datasets and the tasks
that evaluate them slice by slice: 2.5D channel stacks, and the boxes of spheres (nodules)
cut by a slice.

Coordinates: a sphere is (z, y, x, radius_mm) with (z, y, x) the continuous voxel index of
its centre. In a slice image, voxel index ``i`` covers pixels ``[i, i + 1)``, so its centre
is at pixel coordinate ``i + 0.5`` (the convention of YOLO's pixel boxes).
"""

from __future__ import annotations

import numpy as np
import torch


def stack_slices(volume: np.ndarray, z: int | np.ndarray, context: int) -> np.ndarray:
    """Channels of slices ``z-context .. z+context`` (clamped at the ends), for 2.5D input.

    ``volume`` is (C, Z, Y, X), a numpy array or a torch tensor; returns (C*(2*context+1), Y, X) for a scalar ``z`` and
    (N, C*(2*context+1), Y, X) for an array of indices. Channel order: slice-major,
    modality-minor, i.e. [z-1: t1 t1ce t2 flair, z: ..., z+1: ...].
    """
    zs = np.atleast_1d(z)
    idx = np.clip(zs[:, None] + np.arange(-context, context + 1), 0, volume.shape[1] - 1)
    out = volume[:, idx]  # C, N, K, Y, X
    move = torch.movedim if isinstance(out, torch.Tensor) else np.moveaxis
    out = move(out, 0, 2).reshape(len(zs), -1, *volume.shape[2:])
    return out[0] if np.ndim(z) == 0 else out


def split_target(stack: np.ndarray, context: int, k: int) -> tuple[np.ndarray, np.ndarray]:
    """(S·M, Y, X) slice-major stack -> inputs (S·(M-k), Y, X) and the last ``k``
    modalities of the centre slice (k, Y, X) (see ``stack_slices`` for the order)."""
    s = 2 * context + 1
    per = stack.reshape(s, -1, *stack.shape[1:])
    inputs = per[:, :-k].reshape(-1, *stack.shape[1:])
    return inputs, torch.as_tensor(np.ascontiguousarray(per[context, -k:]))


# A slice gets a box for a nodule when the sphere's cut through it has at least this
# fraction of the nodule's radius: the last sliver at each pole looks like nothing.
MIN_CUT = 0.3


def spacing_zyx(meta: dict) -> np.ndarray:
    return np.asarray(meta["geometry"]["spacing"], dtype=float)[::-1]


def slice_boxes(nodules: np.ndarray, z: int, spacing: np.ndarray) -> np.ndarray:
    """Pixel boxes (M, 4) x1, y1, x2, y2 of the nodules' spheres cut by axial slice ``z``.

    The sphere of radius r (mm) centred at index (cz, cy, cx) cuts the plane z in a
    circle of radius sqrt(r² - ((z - cz)·sz)²) mm, i.e. an ellipse of half-axes r'/sx and
    r'/sy voxels (anisotropic spacing).
    """
    if len(nodules) == 0:
        return np.zeros((0, 4), np.float32)
    dz = (z - nodules[:, 0]) * spacing[0]
    r = nodules[:, 3]
    cut = np.sqrt(np.clip(r**2 - dz**2, 0, None))
    keep = cut >= MIN_CUT * r
    cy, cx, cut = nodules[keep, 1] + 0.5, nodules[keep, 2] + 0.5, cut[keep]
    ry, rx = cut / spacing[1], cut / spacing[2]
    return np.stack([cx - rx, cy - ry, cx + rx, cy + ry], 1).astype(np.float32)
