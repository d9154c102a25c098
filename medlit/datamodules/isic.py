"""ISIC DataModule: checked records, splits by lesion/patient, dermoscopy augmentation,
class balancing."""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, ClassVar, Literal

import albumentations as A
import numpy as np
from PIL import Image
from torch.utils.data import DataLoader

from medlit.constraints import PositiveInt
from medlit.datamodules.base import BaseDataModule, Loader, balanced_sampler, cache_root
from medlit.datamodules.splits import SPLIT_KEYS, Split, check_split_file, split_groups
from medlit.datasets.io.files import MARKER, atomic_write
from medlit.datasets.isic.phantom import write_isic
from medlit.datasets.isic.source import (
    CLASSES,
    IMAGE_DIRS,
    NORMALISATION,
    ISICRecords,
    VerifiedImages,
    check_image,
    prediction_images,
    read_records,
    write_images,
    write_mask,
    write_submission,
)
from medlit.datasets.isic.torch import ImageDataset
from medlit.errors import ConfigError, Report

log = logging.getLogger(__name__)


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
        split: which images train, validate and test, by group (lesion_id/patient_id, or
            image where the release has no groups): ``val_fraction``, ``test_fraction``,
            ``split_file`` (of group ids), ``num_folds``, ``fold``.
        seed: seed of the split and of the demo data.
        cache_dir: where the record of verified images is kept.
        loader: ``batch_size`` (images per training batch; segmentation evaluation: one
            per batch) and ``num_workers``.
    """

    moved_arguments: ClassVar[dict[str, str]] = {
        **BaseDataModule.moved_arguments,
        **{k: f"split.{k}" for k in SPLIT_KEYS},
    }

    def __init__(
        self,
        root: str = "data/ISIC2018",
        demo: bool = False,
        demo_year: Literal["2018_task1", "2018_task3", "2019", "2020"] = "2018_task3",
        demo_lesions: PositiveInt = 300,
        year: Literal["2018_task1", "2018_task3", "2019", "2020"] | None = None,
        target: Literal["label", "mask"] = "label",
        image_size: PositiveInt = 224,
        normalize: Literal["imagenet", "symmetric"] = "imagenet",
        augment: Literal["full", "flips", "none"] = "full",
        balance: Literal["none", "sampler"] = "none",
        split: Split = Split(),
        seed: int = 42,
        cache_dir: str | None = None,
        loader: Loader = Loader(batch_size=32),
        **legacy: Any,
    ) -> None:
        super().__init__(root)
        self.save_hyperparameters(logger=False)  # the resolved config is logged whole
        self.split_settings: Split = self.settings(legacy, split=split, loader=loader)["split"]
        self.records: ISICRecords | None = None
        # The release a predicted folder's submission is written as (set by predict_from).
        self._predict_year: str | None = None

    @property
    def num_channels(self) -> int:
        return 3

    @property
    def classes(self) -> tuple[str, ...]:
        if self.predict_input is not None:  # predicting on other data: root unused
            return CLASSES.get(self._predict_year or "", ())
        return self._load().classes

    @property
    def class_counts(self) -> list[int]:
        """Training images per class (for class-weighted losses)."""
        records = self._load()
        labels = [records.labels[i] for i in self.split_ids["train"]]
        return np.bincount(labels, minlength=len(records.classes)).tolist()

    def _load(self) -> ISICRecords:
        """The release's records (read, with the split, once)."""
        self.index()
        assert self.records is not None
        return self.records

    # ---- the pipeline (run by BaseDataModule.run_pipeline) -------------------------------

    def demo_data(self) -> tuple[Callable[[Path], object], str]:
        h = self.hparams
        return (
            lambda root: write_isic(root, h["demo_year"], h["demo_lesions"], seed=h["seed"]),
            f"a synthetic ISIC {h['demo_year']} release",
        )

    def discover(self, report: Report) -> dict[str, tuple[Path, Path | None]]:
        """The release's CSVs row by row and its images and masks found by name (image id
        -> (image, mask or None)); a target the release lacks is an error."""
        h = self.hparams
        records = read_records(self.root, h["year"], report)
        if h["target"] == "mask" and not records.masks:
            report.refuse(
                ConfigError(
                    f"target: mask needs segmentation masks; {self.root} holds the "
                    f"{records.year} release (labels only)"
                ),
                "config",
                self.root,
            )
        if h["target"] == "label" and not records.labels:
            report.refuse(
                ConfigError(
                    f"target: label needs diagnoses; {self.root} holds the "
                    f"{records.year} release (masks only)"
                ),
                "config",
                self.root,
            )
        self.records = records
        self._verified = VerifiedImages(
            cache_root(h["cache_dir"], "isic", self.root, records.images)
        )
        return {i: (path, records.masks.get(i)) for i, path in records.images.items()}

    def split(self, cases: dict[str, tuple], report: Report) -> dict[str, list[str]]:
        """By lesion (2018/2019) or patient (2020), so that no lesion is in two splits; by
        image where the release has no groups."""
        h = self.hparams
        records = self.records
        assert records is not None
        groups = records.groups or {i: i for i in records.images}
        if records.group_kind == "image":
            log.info("ISIC %s has no lesion/patient ids: splitting by image", records.year)
        names = sorted(set(groups.values()))
        if not check_split_file(self.split_settings.split_file, names, report) or not names:
            # only a collecting report gets here
            return {"train": [], "val": [], "test": []}
        parts = {s: set(g) for s, g in split_groups(names, self.split_settings, h["seed"]).items()}
        return {s: sorted(i for i in records.images if groups[i] in g) for s, g in parts.items()}

    def prepare_case(
        self, image_id: str, case: tuple[Path, Path | None], report: Report, deep: bool
    ) -> bool:
        """The image (and mask) decoded to the last byte. A run skips files verified
        before (same size and mtime: ISIC images are not cached, so there is nothing for
        ``deep`` to re-verify); ``medlit.check`` decodes every one."""
        path, mask = case
        if report.strict:
            return self._verified.check(image_id, path, mask, report)
        check_image(image_id, path, mask, report)
        return True

    def finish(self, report: Report) -> str:
        if report.strict:
            self._verified.save()
        return ""

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
        return A.Compose([*steps, A.Normalize(*NORMALISATION[h["normalize"]])])

    def setup(self, stage: str) -> None:
        if stage == "predict" and self.predict_input is not None:  # predict_from() chose
            return
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

    def predict_from(self, path: Path, num_classes: int | None = None) -> None:
        """Predict on ``path`` (an image, or a folder of ``.jpg``/``.jpeg``/``.png`` images;
        ``*_segmentation.png`` masks are skipped) instead of ``root``; the training data
        need not be present. Images that are not colour (RGB) are refused here, before
        anything runs. ``num_classes`` names the release for the submission CSV when
        neither ``year`` nor the training data do."""
        path = Path(path).expanduser()
        images = prediction_images(path)
        h = self.hparams
        self._predict_year = self._release(num_classes)
        self.predict_input = path
        self.datasets["predict"] = ImageDataset(
            list(images), images, self._transform(False), evaluation=h["target"] == "mask"
        )
        log.info("ISIC %s: %d images to predict", path, len(images))

    def _release(self, num_classes: int | None) -> str | None:
        """The release the classes are of: ``year``, the training data's, or the one
        with ``num_classes`` classes."""
        if self.hparams["year"]:
            return self.hparams["year"]
        if self.root.is_dir() and any(self.root.iterdir()):
            return self._load().year
        return next((y for y, c in CLASSES.items() if len(c) == num_classes), None)

    def deploy_state(self) -> dict[str, Any] | None:
        """Classification (``medlit.deploy``): the evaluation transform's size and
        normalisation, and the release whose submission CSV is written."""
        h = self.hparams
        if h["target"] != "label":
            return None
        year = self._predict_year or self._release(None)  # None: by the number of classes
        return {
            "reader": "isic",
            "image_size": int(h["image_size"]),
            "normalize": h["normalize"],
            "year": year,
        }

    def train_dataloader(self) -> DataLoader:
        if self.hparams["balance"] != "sampler" or self.hparams["target"] != "label":
            return self._loader("train", shuffle=True)
        labels = [self.records.labels[i] for i in self.split_ids["train"]]
        return self._loader("train", sampler=balanced_sampler(labels))

    def write_prediction(
        self, image_id: str, regions: np.ndarray, folder: Path, meta: dict | None = None
    ) -> Path:
        """A predicted lesion (regions (1, 1, H, W)) as ``<id>_segmentation.png``, 0/255."""
        write_mask(path := folder / f"{image_id}_segmentation.png", regions[0, 0])
        return path

    def write_map(
        self,
        image_id: str,
        values: np.ndarray,
        folder: Path,
        meta: dict | None = None,
        name: str = "uncertainty",
    ) -> Path:
        """A per-pixel map ((1, H, W) at the image's size) as ``<id>_<name>.tif``: one
        32-bit float channel (Pillow's mode F), the values as they are."""
        image = Image.fromarray(np.asarray(values, np.float32).reshape(values.shape[-2:]))
        atomic_write(path := folder / f"{image_id}_{name}.tif", lambda p: image.save(p, "TIFF"))
        return path

    def write_submission(
        self, path: Path, ids: list[str], probs: np.ndarray, class_names: Sequence[str] = ()
    ) -> None:
        """The release's official submission CSV (see ``medlit.datasets.isic.write_submission``)."""
        year = self._predict_year or self._load().year
        if year not in CLASSES:
            raise ConfigError(
                f"no submission format for {year!r}: set data.year to the release the "
                f"classifier was trained on ({', '.join(CLASSES)})"
            )
        write_submission(path, ids, probs, year)

    def write_images(
        self,
        folder: Path,
        pixels: np.ndarray,
        labels: np.ndarray | None,
        provenance: dict[str, str] | None = None,
    ) -> list[Path]:
        """Generated images as a copy of the training release (a folder this data module
        reads back), marked as generated data."""
        year = self._load().year
        if year not in IMAGE_DIRS:
            raise ConfigError(f"generated images need a classification release, not {year}")
        written = write_images(folder, pixels, labels, year)
        marker = {"dataset": "isic-generated", "year": year, **(provenance or {})}
        (folder / MARKER).write_text(json.dumps(marker))
        return written

    def _eval_batch(self) -> int:
        return 1 if self.hparams["target"] == "mask" else self.batch_size

    def val_dataloader(self) -> DataLoader:
        return self._loader("val", batch_size=self._eval_batch())

    def predict_dataloader(self) -> DataLoader:
        return self._loader("predict", batch_size=self.batch_size)

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", batch_size=self._eval_batch())
