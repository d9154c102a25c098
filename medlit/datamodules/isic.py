"""ISIC DataModule: checked records, splits by lesion/patient, dermoscopy augmentation,
class balancing."""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Literal

import albumentations as A
import numpy as np
from torch.utils.data import DataLoader

from medlit.datamodules.base import BaseDataModule, balanced_sampler, cache_root
from medlit.datamodules.splits import split_groups
from medlit.datasets.images import ImageDataset
from medlit.datasets.isic import (
    ISICRecords,
    check_records,
    read_records,
    write_mask,
    write_submission,
)
from medlit.datasets.synthetic_isic import write_isic
from medlit.errors import ConfigError

log = logging.getLogger(__name__)
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


class ISICDataModule(BaseDataModule):
    """ISIC 2018 Task 1 / Task 3 (HAM10000), 2019 and 2020 dermoscopy.

    Args:
        root: folder holding the release (ground-truth CSVs / masks and the JPEGs, found by
            name anywhere below it).
        demo: when ``root`` is empty or missing, first write a seeded synthetic release of
            ``demo_year`` there.
        demo_year: release written by ``demo``: ``2018_task3`` (classification) or
            ``2018_task1`` (segmentation), ``2019``, ``2020``.
        demo_lesions: lesions in the demo (each photographed 1-4 times).
        year: force the release instead of detecting it from the files.
        target: ``label`` (diagnosis) or ``mask`` (lesion segmentation, 2018 Task 1).
        image_size: side of the square model input, in pixels.
        normalize: ``imagenet`` (mean/std, for pretrained-style classifiers) or
            ``symmetric`` (pixels mapped to [-1, 1], for GAN generators with tanh output).
        augment: ``full`` (crops, flips, rotations, colour jitter), ``flips`` (flips and
            90° rotations only: keeps the image distribution a generator must learn), or
            ``none``.
        balance: ``sampler`` draws training images with inverse class frequency;
            ``none`` leaves imbalance to the loss (ClassificationTask.class_weights).
        val_fraction: share of groups (lesions/patients) for validation.
        test_fraction: share of groups held out for testing.
        split_file: YAML/JSON ``{train, val, test}`` of group ids (lesion_id/patient_id,
            or image ids where the release has no groups); overrides the ratios.
        num_folds: k for k-fold cross-validation over the non-test groups.
        fold: which fold validates.
        seed: seed of the split and of the demo data.
        cache_dir: where the record of verified images is kept.
        batch_size: images per training batch (segmentation evaluation: one per batch).
        num_workers: data loader workers.
    """

    def __init__(
        self,
        root: str = "data/ISIC2018",
        demo: bool = False,
        demo_year: Literal["2018_task1", "2018_task3", "2019", "2020"] = "2018_task3",
        demo_lesions: int = 300,
        year: Literal["2018_task1", "2018_task3", "2019", "2020"] | None = None,
        target: Literal["label", "mask"] = "label",
        image_size: int = 224,
        normalize: Literal["imagenet", "symmetric"] = "imagenet",
        augment: Literal["full", "flips", "none"] = "full",
        balance: Literal["none", "sampler"] = "none",
        val_fraction: float = 0.15,
        test_fraction: float = 0.15,
        split_file: str | None = None,
        num_folds: int | None = None,
        fold: int = 0,
        seed: int = 42,
        cache_dir: str | None = None,
        batch_size: int = 32,
        num_workers: int = 2,
    ) -> None:
        super().__init__(root, batch_size, num_workers)
        self.save_hyperparameters(logger=False)  # the resolved config is logged whole
        self.records: ISICRecords | None = None
        self.split_ids: dict[str, list[str]] = {}

    @property
    def num_channels(self) -> int:
        return 3

    @property
    def classes(self) -> tuple[str, ...]:
        return self._load().classes

    @property
    def class_counts(self) -> list[int]:
        """Training images per class (for class-weighted losses)."""
        records = self._load()
        labels = [records.labels[i] for i in self.split_ids["train"]]
        return np.bincount(labels, minlength=len(records.classes)).tolist()

    def _load(self) -> ISICRecords:
        if self.records is not None:
            return self.records
        h = self.hparams
        self.write_demo_if_empty(
            lambda root: write_isic(root, h["demo_year"], h["demo_lesions"], seed=h["seed"]),
            f"a synthetic ISIC {h['demo_year']} release",
        )
        records = read_records(self.root, h["year"])
        if h["target"] == "mask" and not records.masks:
            raise ConfigError(
                f"target: mask needs segmentation masks; {self.root} holds the "
                f"{records.year} release (labels only)"
            )
        if h["target"] == "label" and not records.labels:
            raise ConfigError(
                f"target: label needs diagnoses; {self.root} holds the "
                f"{records.year} release (masks only)"
            )
        groups = records.groups or {i: i for i in records.images}
        if records.group_kind == "image":
            log.info("ISIC %s has no lesion/patient ids: splitting by image", records.year)
        parts = split_groups(
            sorted(set(groups.values())),
            h["split_file"],
            h["val_fraction"],
            h["test_fraction"],
            h["seed"],
            h["num_folds"],
            h["fold"],
        )
        self.split_ids = {
            s: sorted(i for i in records.images if groups[i] in set(g)) for s, g in parts.items()
        }
        self.records = records
        return records

    def prepare_data(self) -> None:
        """Write demo data if asked; check every CSV row, image and mask before training."""
        start = time.perf_counter()
        records = self._load()
        checked = check_records(records, cache_root(self.hparams["cache_dir"], "isic", self.root))
        log.info(
            "ISIC %s %s: %d images ready in %.2f s (%d decoded and checked, the rest "
            "verified before)",
            records.year,
            self.root,
            len(records.images),
            time.perf_counter() - start,
            checked,
        )

    def _transform(self, train: bool) -> A.Compose:
        h = self.hparams
        size = h["image_size"]
        steps: list = [A.Resize(size, size)]
        if train and h["augment"] == "full":
            # Dermoscopy has no canonical orientation; lighting and scale vary.
            steps = [
                A.RandomResizedCrop((size, size), scale=(0.6, 1.0), ratio=(0.8, 1.25)),
                A.HorizontalFlip(),
                A.VerticalFlip(),
                A.RandomRotate90(),
                A.Affine(rotate=(-30, 30), border_mode=0, p=0.5),
                A.ColorJitter(brightness=0.2, contrast=0.2, saturation=0.2, hue=0.03, p=0.8),
            ]
        elif train and h["augment"] == "flips":
            steps += [A.HorizontalFlip(), A.VerticalFlip(), A.RandomRotate90()]
        if h["normalize"] == "symmetric":
            norm = A.Normalize((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))  # [0, 1] -> [-1, 1]
        else:
            norm = A.Normalize(IMAGENET_MEAN, IMAGENET_STD)
        return A.Compose([*steps, norm])

    def setup(self, stage: str) -> None:
        records = self._load()
        masks = records.masks if self.hparams["target"] == "mask" else None
        labels = records.labels if masks is None else None
        for split in ("train", "val", "test"):
            self.datasets[split] = ImageDataset(
                self.split_ids[split],
                records.images,
                self._transform(split == "train"),
                labels=labels,
                masks=masks,
                evaluation=masks is not None and split != "train",
            )
        self.datasets["predict"] = ImageDataset(
            sorted(records.images), records.images, self._transform(False)
        )

    def train_dataloader(self) -> DataLoader:
        if self.hparams["balance"] != "sampler" or self.hparams["target"] != "label":
            return self._loader("train", shuffle=True)
        labels = [self.records.labels[i] for i in self.split_ids["train"]]
        return self._loader("train", sampler=balanced_sampler(labels))

    def write_prediction(self, image_id: str, regions: np.ndarray, folder: Path) -> None:
        """A predicted lesion (regions (1, 1, H, W)) as ``<id>_segmentation.png``, 0/255."""
        write_mask(folder / f"{image_id}_segmentation.png", regions[0, 0])

    def write_submission(self, path: Path, ids: list[str], probs: np.ndarray) -> None:
        """The release's official submission CSV (see ``medlit.datasets.isic.write_submission``)."""
        write_submission(path, ids, probs, self._load().year)

    def _eval_batch(self) -> int:
        return 1 if self.hparams["target"] == "mask" else self.batch_size

    def val_dataloader(self) -> DataLoader:
        return self._loader("val", batch_size=self._eval_batch())

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", batch_size=self._eval_batch())
