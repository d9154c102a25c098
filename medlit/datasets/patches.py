"""3D training patches read straight from memory-mapped cache entries, nnU-Net style.

Each item of :class:`PatchBatches` is a whole batch (the data loader runs with
``batch_size=None``), because nnU-Net's foreground oversampling is a property of a batch,
not of a sample: of ``B`` patches, the last ``B - round(B * (1 - p))`` are forced to
contain foreground, whatever the sampler or the number of DDP ranks. A patch is read by
slicing the memory-mapped arrays, so a worker touches only the pages of its patch, never
a whole volume.

Sampling follows nnU-Net's data loader: a random patch may stick out of the volume by
half of what the volume lacks of a patch (zero-padded); a foreground patch is centred on a
voxel of a label drawn uniformly among the labels the case has, then shifted to stay
inside those bounds. Foreground voxels are indexed once per case when its cache entry is
built (``fg_locations``: at most ``MAX_LOCATIONS`` per label, as nnU-Net stores them).

Augmentation is MONAI's dictionary transforms, with metadata tracking off: nnU-Net's
default pipeline (rotation, scaling, Gaussian noise and blur, brightness, contrast,
low resolution, gamma, mirroring) with nnU-Net's probabilities; elastic deformation is
optional, as it is in nnU-Net (off by default; it is slow).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from medlit.datasets.io.cache import CacheEntry
from medlit.datasets.io.cases import foreground_index
from medlit.datasets.seeding import seed_transforms
from medlit.errors import ConfigError

TargetFn = Callable[[np.ndarray], np.ndarray]


def by_label(index: np.ndarray) -> list[np.ndarray]:
    """The (N, 3) voxel rows of each label of a :func:`foreground_index`."""
    return [index[index[:, 0] == v, 1:] for v in np.unique(index[:, 0])]


def patch_dims(
    patch_size: int | Sequence[int], context_slices: int = 0, synthesis: bool = False
) -> tuple[int, int, int] | None:
    """A data module's ``patch_size``: (z, y, x) for 3D patches, None for 2D slices (an
    int); anything else, or 3D patches with 2.5D context or synthesis, is a ConfigError."""
    if isinstance(patch_size, int):
        return None
    patch = tuple(int(p) for p in patch_size)
    if len(patch) != 3:
        raise ConfigError(
            f"data.patch_size={list(patch)}: one side (2D slices) or [z, y, x] (3D patches)"
        )
    if context_slices:
        raise ConfigError(
            f"data.context_slices={context_slices} stacks neighbouring slices for 2.5D; "
            "3D patches (data.patch_size=[z, y, x]) hold them already: set it to 0"
        )
    if synthesis:
        raise ConfigError("modality synthesis trains on 2D slices: give data.patch_size one side")
    return patch  # type: ignore[return-value]


def patch_bounds(shape: Sequence[int], patch: Sequence[int]) -> tuple[list[int], list[int]]:
    """Lowest and highest start of a patch along each axis (nnU-Net's ``get_bbox``): a
    volume smaller than the patch is centred in it, padded on both sides."""
    need = [max(p - s, 0) for s, p in zip(shape, patch, strict=True)]
    low = [-n // 2 for n in need]
    high = [s + n // 2 + n % 2 - p for s, n, p in zip(shape, need, patch, strict=True)]
    return low, high


def read_patch(array: np.ndarray, start: Sequence[int], patch: Sequence[int]) -> np.ndarray:
    """``array[..., start : start + patch]`` over the last three axes, zero where the
    window leaves the array; only the window's part of ``array`` is read."""
    spatial = array.shape[-3:]
    inside = tuple(
        slice(max(a, 0), min(a + p, s)) for a, p, s in zip(start, patch, spatial, strict=True)
    )
    block = np.asarray(array[(Ellipsis, *inside)])
    pad = [(0, 0)] * (array.ndim - 3) + [
        (sl.start - a, a + p - sl.stop) for sl, a, p in zip(inside, start, patch, strict=True)
    ]
    if any(w for pair in pad for w in pair):
        block = np.pad(block, pad)
    return block


@dataclass(frozen=True)
class Augment3D:
    """nnU-Net's default 3D augmentation, as MONAI transforms (probabilities are
    nnU-Net's). Turn parts off for data where they do not hold (``mirror: false`` when
    left and right differ in meaning, or ``mirror_axes`` without the axis whose flip
    would swap labels, as x for the left and right lung)."""

    rotate_degrees: float = 30.0
    scale: tuple[float, float] = (0.7, 1.4)
    elastic: bool = False
    mirror: bool = True
    intensity: bool = True
    mirror_axes: tuple[int, ...] = (0, 1, 2)

    def build(self, keys: tuple[str, str] = ("image", "label")) -> Any:
        from monai import transforms as T

        image, label = keys
        angle = math.radians(self.rotate_degrees)
        steps: list[Any] = [
            T.RandAffined(
                keys,
                prob=0.2,
                rotate_range=(angle, angle, angle),
                scale_range=tuple(s - 1.0 for s in self.scale),
                mode=("bilinear", "nearest"),
                padding_mode="zeros",
            )
        ]
        if self.elastic:
            steps.append(
                T.Rand3DElasticd(
                    keys,
                    sigma_range=(9, 13),
                    magnitude_range=(0, 200),
                    prob=0.2,
                    mode=("bilinear", "nearest"),
                    padding_mode="zeros",
                )
            )
        if self.intensity:
            steps += [
                T.RandGaussianNoised(image, prob=0.1, std=0.1),
                T.RandGaussianSmoothd(
                    image, sigma_x=(0.5, 1.0), sigma_y=(0.5, 1.0), sigma_z=(0.5, 1.0), prob=0.2
                ),
                T.RandScaleIntensityd(image, factors=0.25, prob=0.15),  # brightness ×0.75–1.25
                T.RandScaleIntensityFixedMeand(
                    image, factors=0.25, preserve_range=True, prob=0.15
                ),  # contrast
                T.RandSimulateLowResolutiond(image, zoom_range=(0.5, 1.0), prob=0.25),
                T.RandAdjustContrastd(
                    image, gamma=(0.7, 1.5), invert_image=True, retain_stats=True, prob=0.1
                ),
                T.RandAdjustContrastd(image, gamma=(0.7, 1.5), retain_stats=True, prob=0.3),
            ]
        if self.mirror:
            steps += [T.RandFlipd(keys, prob=0.5, spatial_axis=a) for a in self.mirror_axes]
        return T.Compose(steps)


@contextlib.contextmanager
def plain_tensors() -> Iterator[None]:
    """MONAI transforms on plain tensors inside the block (its metadata costs time and is
    unused here), MONAI's process-wide setting restored after it: a user's own MONAI code
    in the same process keeps its MetaTensors."""
    from monai.data import get_track_meta, set_track_meta

    before = get_track_meta()
    set_track_meta(False)
    try:
        yield
    finally:
        set_track_meta(before)


class PatchBatches(Dataset):
    """Batches of 3D patches from cached cases, for training.

    Args:
        entries: cached cases with ``image`` (C, Z, Y, X) and ``seg`` (Z, Y, X).
        target_fn: maps a label patch (Z, Y, X) to the training target.
        patch_size: (z, y, x) voxels.
        batch_size: patches per item.
        foreground_fraction: nnU-Net's ``oversample_foreground_percent``.
        length: items (batches) per epoch.
        augment: a MONAI transform of ``{"image", "label"}`` dictionaries, or None.
    """

    yields_batches = True  # BaseDataModule's loader then batches nothing (batch_size=None)

    def __init__(
        self,
        entries: Sequence[CacheEntry],
        target_fn: TargetFn,
        patch_size: Sequence[int],
        batch_size: int,
        foreground_fraction: float = 0.33,
        length: int = 250,
        augment: Any = None,
    ) -> None:
        self.entries = list(entries)
        self.target_fn = target_fn
        self.patch = tuple(int(p) for p in patch_size)
        self.batch_size = batch_size
        self.random_count = round(batch_size * (1 - foreground_fraction))
        self.length = length
        self.augment = augment
        self.locations = [
            by_label(
                np.asarray(e.arrays["fg_locations"])
                if "fg_locations" in e.arrays
                else foreground_index(e.arrays["seg"])
            )
            for e in self.entries
        ]

    def __len__(self) -> int:
        return self.length

    def sample(self, k: int, forced: bool) -> dict[str, Any]:
        entry = self.entries[k]
        shape = entry.arrays["image"].shape[1:]
        low, high = patch_bounds(shape, self.patch)
        labels = self.locations[k]
        if forced and labels:
            voxels = labels[np.random.randint(len(labels))]
            centre = voxels[np.random.randint(len(voxels))]
            start = [
                int(np.clip(c - p // 2, lo, hi))
                for c, p, lo, hi in zip(centre, self.patch, low, high, strict=True)
            ]
        else:
            start = [np.random.randint(lo, hi + 1) for lo, hi in zip(low, high, strict=True)]
        image = read_patch(entry.arrays["image"], start, self.patch).astype(np.float32)
        label = read_patch(entry.arrays["seg"], start, self.patch)
        if self.augment is not None:
            with plain_tensors():
                out = self.augment({"image": image, "label": label[None]})
            image = np.asarray(out["image"], dtype=np.float32)
            label = np.asarray(out["label"])[0].round().astype(np.uint8)
        return {
            "image": image,
            "mask": self.target_fn(label),
            "case_id": entry.meta["case_id"],
            "start": start,
        }

    def __getitem__(self, index: int) -> dict[str, Any]:
        # np.random is seeded per worker by Lightning's worker_init_fn (seed_everything).
        seed_transforms(self.augment)
        cases = np.random.randint(len(self.entries), size=self.batch_size)
        samples = [self.sample(int(k), forced=i >= self.random_count) for i, k in enumerate(cases)]
        return {
            "image": torch.from_numpy(np.stack([s["image"] for s in samples])),
            "mask": torch.from_numpy(np.stack([s["mask"] for s in samples])),
            "case_id": [s["case_id"] for s in samples],
            "start": torch.tensor([s["start"] for s in samples]),
        }
