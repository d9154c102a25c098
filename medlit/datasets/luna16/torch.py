"""Torch datasets over cached LUNA16 scans: 2.5D slices with nodule boxes (detection),
whole scans (evaluation), and patches around candidates (false-positive reduction).

Coordinates: a nodule is (z, y, x, radius_mm) with (z, y, x) the continuous voxel index
of its centre in the cached grid. In a slice image, voxel index ``i`` covers pixels
``[i, i + 1)``, so its centre is at pixel coordinate ``i + 0.5`` (the convention of
YOLO's pixel boxes); ``pixel_to_index`` undoes it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import albumentations as A
import numpy as np
import torch
from torch.utils.data import Dataset

from medlit.datasets.io.cache import CacheEntry
from medlit.datasets.luna16.source import candidate_cube, cube_input, window
from medlit.datasets.seeding import seed_transforms
from medlit.datasets.slices import slice_boxes, spacing_zyx, stack_slices


def touched_slices(nodules: np.ndarray, depth: int, spacing: np.ndarray) -> np.ndarray:
    """Boolean (depth,): slices that cut any nodule at all (never used as negatives)."""
    z = np.arange(depth)[:, None]
    if len(nodules) == 0:
        return np.zeros(depth, bool)
    return (np.abs(z - nodules[None, :, 0]) * spacing[0] < nodules[None, :, 3]).any(1)


def pixel_to_index(xy: np.ndarray) -> np.ndarray:
    return xy - 0.5


def ct_augmentation() -> list[A.BasicTransform]:
    """CT-appropriate: left-right/up-down flips, small rotations and zoom, and mild noise
    and contrast jitter. HU are calibrated, so no colour or strong intensity changes."""
    return [
        A.HorizontalFlip(p=0.5),
        A.VerticalFlip(p=0.2),
        A.Affine(scale=(0.9, 1.1), rotate=(-10, 10), border_mode=0, fill=0, p=0.5),
        A.RandomBrightnessContrast(brightness_limit=0.05, contrast_limit=0.1, p=0.3),
        A.GaussNoise(std_range=(0.0, 0.02), p=0.3),
    ]


class NoduleSliceDataset(Dataset):
    """Random 2.5D axial training crops with YOLO boxes, balancing slices with and
    without nodules.

    With probability ``positive_fraction`` an item is a slice that cuts a nodule (drawn
    uniformly over all such slices of all scans) cropped so that at least one box is
    inside (albumentations' ``AtLeastOneBBoxRandomCrop``); otherwise a slice that touches
    no nodule, cropped anywhere.

    Items: ``image`` (C, P, P) float32 in [0, 1], ``boxes`` (M, 4) normalised centre x, y,
    width, height (YOLO), ``box_labels`` (M,), ``case_id``, ``slice_index``.
    """

    def __init__(
        self,
        entries: Sequence[CacheEntry],
        nodules: Sequence[np.ndarray],
        hu_window: Sequence[float],
        context: int,
        patch_size: int,
        positive_fraction: float = 0.5,
        length: int = 1000,
        augment: bool = True,
    ) -> None:
        self.entries = list(entries)
        self.nodules = [np.asarray(n, dtype=float).reshape(-1, 4) for n in nodules]
        self.window = tuple(hu_window)
        self.context = context
        self.positive_fraction = positive_fraction
        self.length = length
        self.spacing = [spacing_zyx(e.meta) for e in self.entries]
        self.positives: list[tuple[int, int]] = []
        self.negatives: list[np.ndarray] = []
        for k, e in enumerate(self.entries):
            depth = e.arrays["image"].shape[0]
            for z in range(depth):
                if len(slice_boxes(self.nodules[k], z, self.spacing[k])):
                    self.positives.append((k, z))
            self.negatives.append(
                np.flatnonzero(~touched_slices(self.nodules[k], depth, self.spacing[k]))
            )
        boxes = A.BboxParams(
            format="pascal_voc", label_fields=["labels"], min_visibility=0.3, clip=True
        )
        pad = A.PadIfNeeded(patch_size, patch_size, border_mode=0, fill=0)
        extra = ct_augmentation() if augment else []
        self.crop_positive = A.Compose(
            [pad, A.AtLeastOneBBoxRandomCrop(patch_size, patch_size), *extra], bbox_params=boxes
        )
        self.crop_any = A.Compose(
            [pad, A.RandomCrop(patch_size, patch_size), *extra], bbox_params=boxes
        )

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> dict[str, Any]:
        # np.random is seeded per worker by Lightning's worker_init_fn (seed_everything).
        seed_transforms(self.crop_positive, self.crop_any)
        if self.positives and np.random.rand() < self.positive_fraction:
            k, z = self.positives[np.random.randint(len(self.positives))]
        else:
            k = np.random.randint(len(self.entries))
            negatives = self.negatives[k]
            depth = self.entries[k].arrays["image"].shape[0]
            z = int(np.random.choice(negatives)) if len(negatives) else np.random.randint(depth)
        entry = self.entries[k]
        hu = stack_slices(entry.arrays["image"][None], z, self.context)
        image = window(hu, self.window).transpose(1, 2, 0)
        boxes = slice_boxes(self.nodules[k], z, self.spacing[k])
        h, w = image.shape[:2]
        boxes[:, [0, 2]] = boxes[:, [0, 2]].clip(0, w)
        boxes[:, [1, 3]] = boxes[:, [1, 3]].clip(0, h)
        boxes = boxes[(boxes[:, 2] - boxes[:, 0] > 0.5) & (boxes[:, 3] - boxes[:, 1] > 0.5)]
        crop = self.crop_positive if len(boxes) else self.crop_any
        out = crop(image=image, bboxes=boxes, labels=np.zeros(len(boxes), np.int64))
        img = np.ascontiguousarray(out["image"].transpose(2, 0, 1), dtype=np.float32)
        b = np.asarray(out["bboxes"], dtype=np.float32).reshape(-1, 4)
        size = np.array([img.shape[2], img.shape[1]] * 2, dtype=np.float32)
        xyxy = b / size
        xywh = np.stack(
            [
                (xyxy[:, 0] + xyxy[:, 2]) / 2,
                (xyxy[:, 1] + xyxy[:, 3]) / 2,
                xyxy[:, 2] - xyxy[:, 0],
                xyxy[:, 3] - xyxy[:, 1],
            ],
            1,
        )
        return {
            "image": torch.from_numpy(img),
            "boxes": torch.from_numpy(xywh),
            "box_labels": torch.as_tensor(np.asarray(out["labels"]), dtype=torch.long),
            "case_id": entry.meta["case_id"],
            "slice_index": z,
        }


def detection_collate(items: list[dict[str, Any]]) -> dict[str, Any]:
    """Stack images; concatenate boxes with ``batch_idx`` naming each box's image."""
    return {
        "image": torch.stack([it["image"] for it in items]),
        "boxes": torch.cat([it["boxes"] for it in items]),
        "box_labels": torch.cat([it["box_labels"] for it in items]),
        "batch_idx": torch.cat(
            [torch.full((len(it["boxes"]),), i, dtype=torch.long) for i, it in enumerate(items)]
        ),
        "case_id": [it["case_id"] for it in items],
        "slice_index": torch.tensor([it["slice_index"] for it in items]),
    }


class ScanDataset(Dataset):
    """Whole scans, one per item, for evaluation and prediction.

    Items: ``image`` (Z, Y, X) float32 windowed, ``case_id`` (seriesuid), ``meta`` (the
    cache metadata: geometry of the cached grid, source geometry and shape),
    ``nodules`` (N, 4) z, y, x, radius_mm of the reference nodules (empty when unknown).
    """

    def __init__(
        self,
        entries: Sequence[CacheEntry],
        nodules: Sequence[np.ndarray] | None,
        hu_window: Sequence[float],
    ) -> None:
        self.entries = list(entries)
        self.nodules = nodules
        self.window = tuple(hu_window)

    def __len__(self) -> int:
        return len(self.entries)

    def __getitem__(self, index: int) -> dict[str, Any]:
        entry = self.entries[index]
        nodules = (
            np.zeros((0, 4)) if self.nodules is None else np.asarray(self.nodules[index], float)
        )
        return {
            "image": torch.from_numpy(window(entry.arrays["image"], self.window)),
            "case_id": entry.meta["case_id"],
            "meta": entry.meta,
            "nodules": torch.from_numpy(nodules.reshape(-1, 4)),
        }


def first_item(items: list[Any]) -> Any:
    """Collate for one-scan batches: the scan itself, metadata untouched."""
    return items[0]


class CandidateDataset(Dataset):
    """Patches around candidates (``candidates.csv``) for false-positive reduction.

    Items: ``image`` (3, S, S) float32, ``label`` (1 = nodule), ``case_id`` (the
    candidate's id ``<seriesuid>#<row>``). Training patches are augmented in 3D: random
    flips along each axis, in-plane transposition and a shift of up to ``jitter`` voxels.
    """

    def __init__(
        self,
        entries: dict[str, CacheEntry],
        candidates: list[tuple[str, str, np.ndarray, int]],
        hu_window: Sequence[float],
        size: int,
        mode: str = "planes",
        context: int = 1,
        augment: bool = False,
        jitter: int = 2,
    ) -> None:
        self.entries = entries
        self.candidates = candidates  # (id, seriesuid, centre zyx, label)
        self.window = tuple(hu_window)
        self.size = size
        self.mode = mode
        self.context = context
        self.augment = augment
        self.jitter = jitter

    @property
    def labels(self) -> list[int]:
        return [c[3] for c in self.candidates]

    def __len__(self) -> int:
        return len(self.candidates)

    def __getitem__(self, index: int) -> dict[str, Any]:
        cid, uid, centre, label = self.candidates[index]
        centre = np.asarray(centre, dtype=float)
        if self.augment:
            centre = centre + np.random.randint(-self.jitter, self.jitter + 1, size=3)
        cube = candidate_cube(
            self.entries[uid].arrays["image"], centre, self.size, self.mode, self.context
        )
        cube = window(cube, self.window)
        if self.augment:
            for axis in range(3):
                if np.random.rand() < 0.5:
                    cube = cube[::-1] if axis == 0 else np.flip(cube, axis)
            if np.random.rand() < 0.5:
                cube = cube.transpose(0, 2, 1)
        return {
            "image": torch.from_numpy(np.ascontiguousarray(cube_input(cube, self.mode))),
            "label": int(label),
            "case_id": cid,
        }
