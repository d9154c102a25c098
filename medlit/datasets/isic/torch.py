"""Torch datasets over 2D image files (JPEG/PNG): classification labels or binary masks.

Segmentation evaluation items follow the whole-case protocol of ``CaseDataset`` (an image
is a one-slice volume) and keep the mask at the file's own resolution, so metrics are
computed where the official scorers compute them.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import albumentations as A
import numpy as np
import torch
from torch.utils.data import Dataset

from medlit.datasets.io.images import read_mask, read_rgb
from medlit.datasets.seeding import seed_transforms


class ImageDataset(Dataset):
    """Items ``image`` (3, H, W) float, ``case_id``, and ``label`` or ``mask`` (1, H, W).

    Args:
        ids: image ids, in order.
        images: image id -> file.
        transform: albumentations pipeline (image, and mask when given), ending in
            normalisation.
        labels: image id -> class index (classification).
        masks: image id -> mask file (segmentation).
        evaluation: segmentation evaluation items: ``image`` (3, 1, H', W') transformed,
            ``mask`` (1, 1, H, W) at the file's resolution, unit ``spacing`` and ``shape``;
            without masks (prediction), ``size`` (H, W) of the file instead.
    """

    def __init__(
        self,
        ids: Sequence[str],
        images: dict[str, Path],
        transform: A.Compose,
        labels: dict[str, int] | None = None,
        masks: dict[str, Path] | None = None,
        evaluation: bool = False,
    ) -> None:
        self.ids = list(ids)
        self.images, self.labels, self.masks = images, labels, masks
        self.transform = transform
        self.evaluation = evaluation

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, index: int) -> dict:
        seed_transforms(self.transform)
        image_id = self.ids[index]
        image = read_rgb(self.images[image_id])
        item: dict = {"case_id": image_id}
        if self.masks is None and self.evaluation:  # prediction: a one-slice volume
            x = self.transform(image=image)["image"].transpose(2, 0, 1)
            item["image"] = torch.from_numpy(x[:, None].copy())
            item["size"] = torch.tensor(image.shape[:2])
            return item
        if self.masks is None:
            item["image"] = torch.from_numpy(
                self.transform(image=image)["image"].transpose(2, 0, 1).copy()
            )
            if self.labels is not None:
                item["label"] = torch.tensor(self.labels[image_id])
            return item
        mask = read_mask(self.masks[image_id])
        if self.evaluation:
            x = self.transform(image=image)["image"].transpose(2, 0, 1)
            item["image"] = torch.from_numpy(x[:, None].copy())
            item["mask"] = torch.from_numpy(mask[None, None])
            item["spacing"] = torch.ones(3, dtype=torch.float64)
            item["shape"] = torch.tensor([1, *mask.shape])
            return item
        out = self.transform(image=image, mask=mask)
        item["image"] = torch.from_numpy(out["image"].transpose(2, 0, 1).copy())
        item["mask"] = torch.from_numpy(out["mask"][None].astype(np.uint8))
        return item
