"""Torch datasets over cached BraTS cases: random 2D/2.5D training slices, and whole cases.

Both read memory-mapped cache entries (``medlit.datasets.io.cache``), so a worker touches
only the slices it returns. Volumes are (C, z, y, x); slices are taken along z (axial).
Nothing here is BraTS-specific beyond the layout of a cache entry (``image`` (C, z, y, x),
optional ``seg``) and the target function it is given, so another volumetric
segmentation dataset can use them as they are.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import albumentations as A
import numpy as np
import torch
from torch.utils.data import Dataset

from medlit.datasets.io.cache import CacheEntry
from medlit.datasets.seeding import seed_transforms
from medlit.datasets.slices import split_target, stack_slices

TargetFn = Callable[[np.ndarray], np.ndarray]


class SliceDataset(Dataset):
    """Random axial (2.5D) patches with foreground oversampling, for training.

    Each item draws a case uniformly, then with probability ``foreground_fraction`` a
    slice that contains foreground (and a patch around it, via albumentations'
    ``CropNonEmptyMaskIfExists``), else any slice of the case, as nnU-Net oversamples.

    Args:
        entries: cached cases with ``image`` (C, Z, Y, X) and ``seg`` (Z, Y, X).
        target_fn: maps a label slice (Y, X) to the training target ((K, Y, X) or (Y, X)).
        patch_size: side of the square patch, in voxels.
        context: neighbouring slices on each side stacked as extra channels.
        foreground_fraction: share of samples forced to contain foreground.
        length: samples per epoch.
        augment: optional albumentations pipeline applied after cropping.
        target_channels: the last modalities of the volume that are targets, not inputs
            (modality synthesis): cropped and augmented with the inputs, then returned
            as ``target_image`` (their centre slice) instead of part of ``image``.
    """

    def __init__(
        self,
        entries: Sequence[CacheEntry],
        target_fn: TargetFn,
        patch_size: int,
        context: int = 0,
        foreground_fraction: float = 0.33,
        length: int = 1000,
        augment: A.BasicTransform | A.Compose | None = None,
        target_channels: int = 0,
    ) -> None:
        self.entries = list(entries)
        self.target_channels = target_channels
        self.target_fn = target_fn
        self.context = context
        self.foreground_fraction = foreground_fraction
        self.length = length
        self.crop_any = A.Compose(
            [
                A.PadIfNeeded(patch_size, patch_size, border_mode=0, fill=0, fill_mask=0),
                A.RandomCrop(patch_size, patch_size),
            ]
        )
        self.crop_fg = A.Compose(
            [
                A.PadIfNeeded(patch_size, patch_size, border_mode=0, fill=0, fill_mask=0),
                A.CropNonEmptyMaskIfExists(patch_size, patch_size),
            ]
        )
        self.augment = augment
        # Slices with foreground, per case: from the entry's metadata (computed when it
        # was built), else once from the (memory-mapped) labels.
        self.fg_slices = [
            np.asarray(e.meta["fg_slices"], np.int64)
            if "fg_slices" in e.meta
            else np.flatnonzero(e.arrays["seg"].reshape(e.arrays["seg"].shape[0], -1).any(1))
            for e in self.entries
        ]

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> dict[str, torch.Tensor | str | int]:
        # np.random is seeded per worker by Lightning's worker_init_fn (seed_everything).
        seed_transforms(self.crop_any, self.crop_fg, self.augment)
        k = np.random.randint(len(self.entries))
        entry, fg = self.entries[k], self.fg_slices[k]
        want_fg = len(fg) > 0 and np.random.rand() < self.foreground_fraction
        z = (
            int(np.random.choice(fg))
            if want_fg
            else np.random.randint(entry.arrays["image"].shape[1])
        )
        label = np.asarray(entry.arrays["seg"][z])
        crop = self.crop_fg if want_fg else self.crop_any
        out = crop(image=_pixel_grid(label.shape), mask=label)
        out["image"] = _cropped(entry.arrays["image"], z, self.context, out["image"])
        if self.augment is not None:
            out = self.augment(image=out["image"], mask=out["mask"])
        image = np.ascontiguousarray(out["image"].transpose(2, 0, 1))
        item = {
            "mask": torch.from_numpy(self.target_fn(out["mask"])),
            "case_id": entry.meta["case_id"],
            "slice_index": z,
        }
        if self.target_channels:
            image, item["target_image"] = split_target(image, self.context, self.target_channels)
        item["image"] = torch.from_numpy(np.ascontiguousarray(image))
        return item


_GRIDS: dict[tuple[int, int], np.ndarray] = {}


def _pixel_grid(shape: tuple[int, ...]) -> np.ndarray:
    """(H, W, 2) int32: each pixel's row and column + 1 (0 is padding). Cropped in place
    of the image, it tells where the crop's window lies: the crop depends on the shapes
    and the mask only, so its random draws are the same."""
    key = (int(shape[0]), int(shape[1]))
    if key not in _GRIDS:
        rows, cols = np.mgrid[1 : key[0] + 1, 1 : key[1] + 1]
        _GRIDS[key] = np.stack([rows, cols], -1).astype(np.int32)
    return _GRIDS[key]


def _cropped(volume: np.ndarray, z: int, context: int, grid: np.ndarray) -> np.ndarray:
    """The 2.5D stack of slice ``z`` inside the window a cropped :func:`_pixel_grid`
    shows, (h, w, channels) float32, zero where the crop padded. Only the window is read
    from the memory-mapped cache and cast (not the whole slice)."""
    inside = grid[..., 0] > 0
    out = np.zeros((*grid.shape[:2], volume.shape[0] * (2 * context + 1)), np.float32)
    if inside.any():
        ys, xs = np.flatnonzero(inside.any(1)), np.flatnonzero(inside.any(0))
        (a0, a1), (b0, b1) = (ys[0], ys[-1] + 1), (xs[0], xs[-1] + 1)
        r0, c0 = int(grid[a0, b0, 0]) - 1, int(grid[a0, b0, 1]) - 1
        window = volume[:, :, r0 : r0 + a1 - a0, c0 : c0 + b1 - b0]
        out[a0:a1, b0:b1] = stack_slices(window, z, context).transpose(1, 2, 0)
    return out


class CaseDataset(Dataset):
    """Whole cases, one per item, for validation, testing and prediction.

    Evaluating whole cases (instead of collecting slices across batches) makes every
    volume metric exact and lets a distributed sampler hand out cases, not slices.
    Items: ``image`` (C, Z, Y, X) float32, ``mask`` (targets of the full volume, when
    labelled; on the source's grid when the case was resampled), ``case_id``, ``spacing``
    (z, y, x) mm of the source, ``shape`` of the uncropped volume,
    ``bbox`` (z0, z1, y0, y1, x0, x1) of the crop inside it.
    """

    def __init__(
        self, entries: Sequence[CacheEntry], target_fn: TargetFn | None, target_channels: int = 0
    ) -> None:
        self.entries = list(entries)
        self.target_fn = target_fn
        self.target_channels = target_channels

    def __len__(self) -> int:
        return len(self.entries)

    def __getitem__(self, index: int) -> dict:
        entry = self.entries[index]
        meta = entry.meta
        item = {
            "image": torch.from_numpy(np.asarray(entry.arrays["image"], dtype=np.float32)),
            "case_id": meta["case_id"],
            "spacing": torch.tensor(
                list(reversed(meta["geometry"]["spacing"])), dtype=torch.float64
            ),
            # (z, y, x) mm of the cached grid (the source's unless resampled in the cache)
            "grid_spacing": torch.tensor(
                meta.get("spacing_zyx", list(reversed(meta["geometry"]["spacing"]))),
                dtype=torch.float64,
            ),
            "shape": torch.tensor(meta["shape"]),
            "bbox": torch.tensor([v for pair in meta["bbox"] for v in pair]),
        }
        if self.target_fn is not None and "seg" in entry.arrays:
            # A case cached at another spacing is scored on its own grid (``seg_native``).
            seg = entry.arrays.get("seg_native", entry.arrays["seg"])
            item["mask"] = torch.from_numpy(self.target_fn(np.asarray(seg)))
        if k := self.target_channels:  # modality synthesis: inputs, target, brain mask
            item["target_image"] = item["image"][-k:]
            item["image"] = item["image"][:-k]
            item["brain"] = (item["image"] != 0).any(0)
        return item
