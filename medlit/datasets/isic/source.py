"""ISIC dermoscopy: the official 2018 Task 1 / Task 3 (HAM10000), 2019 and 2020 layouts,
with every record checked before training.

Files are found by name anywhere under the root, so both the challenge's folder names
(``ISIC2018_Task3_Training_Input/``...) and flattened copies work::

    2018 Task 1  ISIC_<7 digits>.jpg + ISIC_<id>_segmentation.png (0/255)
    2018 Task 3  ISIC2018_Task3_Training_GroundTruth.csv  image,MEL,NV,BCC,AKIEC,BKL,DF,VASC
                 + ISIC2018_Task3_Training_LesionGroupings.csv (image,lesion_id) or
                 HAM10000_metadata.csv (lesion_id,image_id,dx,...)
    2019         ISIC_2019_Training_GroundTruth.csv  image,MEL,NV,BCC,AK,BKL,DF,VASC,SCC,UNK
                 + ISIC_2019_Training_Metadata.csv (image,...,lesion_id,...)
    2020         train.csv  image_name,patient_id,...,target  (+ jpeg/train/*.jpg)
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import pandas as pd
from PIL import Image

from medlit.datasets.io.files import atomic_write, file_problem
from medlit.datasets.io.images import png_problem
from medlit.errors import DatasetNotFoundError, InvalidCaseError, Report

Year = Literal["2018_task1", "2018_task3", "2019", "2020"]

CLASSES: dict[str, tuple[str, ...]] = {
    "2018_task3": ("MEL", "NV", "BCC", "AKIEC", "BKL", "DF", "VASC"),
    # UNK appears only at test time: the model is 8-way (see unknown_probability()).
    "2019": ("MEL", "NV", "BCC", "AK", "BKL", "DF", "VASC", "SCC"),
    "2020": ("benign", "melanoma"),
}
TRUTH_CSV = {
    "2018_task3": "ISIC2018_Task3_Training_GroundTruth.csv",
    "2019": "ISIC_2019_Training_GroundTruth.csv",
    "2020": "train.csv",
}
# Where each classification release keeps its images.
IMAGE_DIRS = {
    "2018_task3": "ISIC2018_Task3_Training_Input",
    "2019": "ISIC_2019_Training_Input",
    "2020": "jpeg/train",
}
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")
# Mean and standard deviation of [0, 1] pixels per channel, by ``data.normalize``.
NORMALISATION = {
    "imagenet": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
    "symmetric": ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5)),  # [0, 1] -> [-1, 1]
}
ISIC_HELP = (
    "ISIC data come from https://challenge.isic-archive.com/data/ (2018 Task 1 and 3, 2019, "
    "2020) and HAM10000 from https://doi.org/10.7910/DVN/DBW86T; unpack the archives under "
    "the root. To try medlit without them, run a demo: python -m medlit.fit "
    "experiments/demo/isic_classifier.yaml"
)


@dataclass
class ISICRecords:
    """What one ISIC release provides: images, and labels or masks, and how they group."""

    year: str
    images: dict[str, Path]  # image id -> file
    labels: dict[str, int] = field(default_factory=dict)  # image id -> class index
    masks: dict[str, Path] = field(default_factory=dict)  # image id -> segmentation PNG
    groups: dict[str, str] = field(default_factory=dict)  # image id -> lesion/patient id
    group_kind: str = "image"  # "lesion_id", "patient_id" or "image" (no grouping known)
    classes: tuple[str, ...] = ()


def detect_year(root: Path) -> str:
    if not root.is_dir():
        raise DatasetNotFoundError(f"ISIC root {root} does not exist. {ISIC_HELP}")
    for year in ("2019", "2018_task3", "2020"):
        if next(root.rglob(TRUTH_CSV[year]), None) is not None:
            return year
    if next(root.rglob("ISIC_*_segmentation.png"), None) is not None:
        return "2018_task1"
    raise DatasetNotFoundError(
        f"no ISIC ground truth under {root} (looked for {', '.join(TRUTH_CSV.values())} and "
        f"ISIC_XXXXXXX_segmentation.png). {ISIC_HELP}"
    )


def _find(root: Path, name: str) -> Path | None:
    return next(iter(sorted(root.rglob(name))), None)


def _read_csv(path: Path, required: tuple[str, ...], report: Report) -> pd.DataFrame | None:
    """Read a CSV, report a missing column or a duplicated id (first column of ``required``);
    None when it cannot be read or lacks a column."""
    try:
        table = pd.read_csv(path)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as e:
        report.error(path.name, path, f"unreadable CSV ({e})")
        return None
    if missing := [c for c in required if c not in table.columns]:
        report.error(
            path.name, path, f"columns {missing} are missing (found {list(table.columns)})"
        )
        return None
    key = required[0]
    dup = table[key].duplicated(keep="first")
    for i in np.flatnonzero(dup):
        first = int(np.flatnonzero(table[key] == table[key].iloc[i])[0])
        report.error(
            str(table[key].iloc[i]),
            path,
            f"line {i + 2}: duplicate {key} (first on line {first + 2}); ids must be unique",
        )
    return table[~dup].reset_index(drop=True)


def read_records(root: Path, year: str | None = None, report: Report | None = None) -> ISICRecords:
    """Index the release under ``root``: ids, files, labels/masks and groups.

    Checks (each problem goes to ``report``; strict by default, so the first error
    raises): CSV schema, duplicate ids, one-hot rows that are not exactly one 1, 2019's
    test-time UNK in training rows, 2020 targets other than 0/1, rows (or masks) without
    an image; images without a row (or mask) are warnings.
    """
    report = report or Report()
    year = year or detect_year(root)
    if not root.is_dir():
        raise DatasetNotFoundError(f"ISIC root {root} does not exist. {ISIC_HELP}")
    jpgs: dict[str, Path] = {}
    for p in sorted(root.rglob("*.jpg")):
        if p.stem in jpgs:
            report.error(p.stem, p, f"duplicate image id: also {jpgs[p.stem]}")
            continue
        jpgs[p.stem] = p
    official = {i: p for i, p in jpgs.items() if re.fullmatch(r"ISIC_\d{7}", i)}
    if year == "2018_task1":
        masks = {
            p.stem.removesuffix("_segmentation"): p for p in root.rglob("ISIC_*_segmentation.png")
        }
        for image_id, mask in sorted(masks.items()):
            if image_id not in jpgs:
                report.error(image_id, mask, f"mask has no image {image_id}.jpg under {root}")
        for image_id in sorted(set(official) - set(masks)):
            report.warning(
                image_id, official[image_id], "image has no ISIC_<id>_segmentation.png: unused"
            )
        ok = sorted(i for i in masks if i in jpgs)
        return ISICRecords(year, {i: jpgs[i] for i in ok}, masks={i: masks[i] for i in ok})

    truth_path = _find(root, TRUTH_CSV[year])
    if truth_path is None:
        raise DatasetNotFoundError(f"no {TRUTH_CSV[year]} under {root} (ISIC {year}). {ISIC_HELP}")
    classes = CLASSES[year]
    records = ISICRecords(year, {}, classes=classes)
    if year == "2020":
        table = _read_csv(truth_path, ("image_name", "patient_id", "target"), report)
        if table is None:
            return records
        target = pd.to_numeric(table["target"], errors="coerce")
        for i in np.flatnonzero(~target.isin([0, 1])):
            report.error(
                str(table["image_name"].iloc[i]),
                truth_path,
                f"line {i + 2}: target {table['target'].iloc[i]!r} is not 0 or 1",
            )
        table = table[target.isin([0, 1])]
        ids = table["image_name"].astype(str)
        records.labels = dict(zip(ids, table["target"].astype(int), strict=True))
        records.groups = dict(zip(ids, table["patient_id"].astype(str), strict=True))
        records.group_kind = "patient_id"
    else:
        columns = ("image", *classes, *(["UNK"] if year == "2019" else []))
        table = _read_csv(truth_path, columns, report)
        if table is None:
            return records
        if extra := [c for c in table.columns if c not in columns]:
            report.warning(
                truth_path.name, truth_path, f"columns {extra} are not in the official header"
            )
        onehot = table[list(columns[1:])].apply(pd.to_numeric, errors="coerce").to_numpy(float)
        sums = onehot.sum(1)
        bad = ~np.isclose(sums, 1.0) | ~np.isin(onehot, (0.0, 1.0)).all(1)
        for i in np.flatnonzero(bad):
            report.error(
                str(table["image"].iloc[i]),
                truth_path,
                f"line {i + 2}: one-hot row {onehot[i].tolist()} sums to {sums[i]:g} "
                "(expected exactly one 1 and 0 elsewhere)",
            )
        if year == "2019":
            unk = ~bad & (onehot[:, -1] == 1)
            for i in np.flatnonzero(unk):
                report.error(
                    str(table["image"].iloc[i]),
                    truth_path,
                    f"line {i + 2}: UNK is a test-time class; training rows must not use it",
                )
            bad |= unk
        table, onehot = table[~bad], onehot[~bad]
        ids = table["image"].astype(str)
        records.labels = dict(zip(ids, onehot[:, : len(classes)].argmax(1).tolist(), strict=True))
        records.groups, records.group_kind = _lesion_groups(root, year, list(ids), report)
    for image_id in list(records.labels):
        if image_id not in jpgs:
            report.error(image_id, truth_path, f"row has no image {image_id}.jpg under {root}")
            del records.labels[image_id]
            continue
        records.images[image_id] = jpgs[image_id]
    for image_id in sorted(set(official) - set(records.labels)):
        report.warning(
            image_id, official[image_id], f"image has no row in {truth_path.name}: unused"
        )
    return records


def _lesion_groups(
    root: Path, year: str, ids: list[str], report: Report
) -> tuple[dict[str, str], str]:
    """image -> lesion_id from the release's metadata; images without one form their own group."""
    sources = {
        "2018_task3": [
            ("ISIC2018_Task3_Training_LesionGroupings.csv", "image"),
            ("HAM10000_metadata.csv", "image_id"),
        ],
        "2019": [("ISIC_2019_Training_Metadata.csv", "image")],
    }[year]
    for name, key in sources:
        if (path := _find(root, name)) is not None:
            meta = _read_csv(path, (key, "lesion_id"), report)
            if meta is None:
                break
            lesion = dict(zip(meta[key].astype(str), meta["lesion_id"], strict=True))
            return {
                i: str(lesion[i]) if pd.notna(lesion.get(i)) else f"image:{i}" for i in ids
            }, "lesion_id"
    return {i: f"image:{i}" for i in ids}, "image"


def check_image(
    image_id: str, path: Path, mask: Path | None = None, report: Report | None = None
) -> None:
    """Decode the image (and mask) to the last byte; the mask must be single-channel 0/255
    of the same size. Problems go to ``report`` (strict by default: the first raises)."""
    report = report or Report()
    size = None
    if (
        (problem := file_problem(path))
        or path.suffix.lower() == ".png"
        and (problem := png_problem(path))
    ):
        report.error(image_id, path, problem)
    else:
        try:
            with Image.open(path) as im:
                if im.width * im.height > Image.MAX_IMAGE_PIXELS:  # header only, so far
                    raise ValueError(
                        f"{im.width}x{im.height} pixels, more than Pillow's decompression-"
                        f"bomb limit of {Image.MAX_IMAGE_PIXELS}"
                    )
                im.load()
                size = im.size
        except Exception as e:  # noqa: BLE001 - Pillow raises many types for damaged files
            report.error(image_id, path, f"image does not decode ({type(e).__name__}: {e})")
    if mask is None:
        return
    if problem := file_problem(mask) or png_problem(mask):
        report.error(image_id, mask, problem)
        return
    try:
        with Image.open(mask) as m:
            m.load()
            mode, msize = m.mode, m.size
            values = np.unique(np.asarray(m.convert("L")))
    except Exception as e:  # noqa: BLE001 - as above
        report.error(image_id, mask, f"mask does not decode ({type(e).__name__}: {e})")
        return
    if mode.startswith("I") or mode == "F":
        bits = "16-bit" if mode.startswith("I;16") else f"{mode} (32-bit)"
        report.error(
            image_id,
            mask,
            f"mask is a {bits} single-channel image (mode {mode}); ISIC masks are 8-bit "
            "single-channel PNGs (mode L) with values 0 and 255",
        )
        return
    if mode not in ("L", "1", "P"):
        report.error(image_id, mask, f"mask mode {mode} is not single-channel")
    if size is not None and msize != size:
        report.error(image_id, mask, f"mask size {msize} differs from image size {size}")
    if not set(values.tolist()) <= {0, 255}:
        report.error(
            image_id,
            mask,
            f"mask values {values.tolist()[:6]}{'...' if len(values) > 6 else ''} are not "
            "binary 0/255",
        )
    elif mode in ("L", "1", "P") and not (values == 255).any():
        report.warning(image_id, mask, "mask is empty (no lesion pixel)")


class VerifiedImages:
    """The record of images (and masks) decoded whole and found good, by name, size and
    mtime (not path: a moved release is not decoded again), under
    ``cache_dir/verified.json``: a run decodes only what changed since."""

    def __init__(self, cache_dir: Path) -> None:
        self.path = cache_dir / "verified.json"
        try:
            self.known: dict[str, list] = json.loads(self.path.read_text())
        except (OSError, ValueError):
            self.known = {}
        self.changed = False

    @staticmethod
    def _key(files: list[Path]) -> tuple[str, list[list[int]]]:
        stamp = [[p.stat().st_size, p.stat().st_mtime_ns] for p in files]
        return hashlib.sha1("|".join(p.name for p in files).encode()).hexdigest(), stamp

    def check(self, image_id: str, path: Path, mask: Path | None, report: Report) -> bool:
        """``check_image`` unless these files were verified before; True when they were
        decoded now."""
        files = [path, *([mask] if mask else [])]
        key, stamp = self._key(files)
        if self.known.get(key) == stamp:
            return False
        start = report.count()
        check_image(image_id, path, mask, report)
        if not any(q.severity == "error" for q in report.problems[start:]):
            self.known[key] = stamp
            self.changed = True
        return True

    def save(self) -> None:
        if not self.changed:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(self.path, lambda p: p.write_text(json.dumps(self.known)))
        self.changed = False


def check_records(records: ISICRecords, cache_dir: Path) -> int:
    """Decode every image/mask not verified before (size+mtime index); returns the count
    checked. The first problem raises."""
    verified = VerifiedImages(cache_dir)
    report = Report()
    checked = sum(
        verified.check(i, path, records.masks.get(i), report) for i, path in records.images.items()
    )
    verified.save()
    return checked


def prediction_images(path: Path) -> dict[str, Path]:
    """The images to predict in ``path`` (an image, or a folder of ``.jpg``/``.jpeg``/
    ``.png`` images; ``*_segmentation.png`` masks are skipped): id -> file. Images that
    cannot be read or are not colour (RGB) are refused here, naming the file."""
    path = Path(path).expanduser()
    if path.is_file():
        files = [path]
    elif path.is_dir():
        files = sorted(
            p
            for p in path.iterdir()
            if p.suffix.lower() in IMAGE_SUFFIXES and not p.stem.endswith("_segmentation")
        )
    else:
        raise DatasetNotFoundError(f"--input {path} does not exist")
    if not files:
        raise DatasetNotFoundError(f"--input {path}: no .jpg/.jpeg/.png images in it")
    images: dict[str, Path] = {}
    for file in files:
        if file.suffix.lower() not in IMAGE_SUFFIXES:
            raise InvalidCaseError(file.stem, file, "not a .jpg/.jpeg/.png image")
        if file.stem in images:
            raise InvalidCaseError(file.stem, file, f"the same id as {images[file.stem]}")
        try:
            with Image.open(file) as im:
                mode = im.mode
        except (OSError, ValueError) as e:
            raise InvalidCaseError(file.stem, file, f"unreadable image ({e})") from e
        if mode not in ("RGB", "RGBA", "P", "CMYK", "YCbCr"):
            raise InvalidCaseError(
                file.stem,
                file,
                f"a {mode} image with {Image.getmodebands(mode)} channel(s); the model "
                "takes colour (RGB, 3 channels) dermoscopy images",
            )
        images[file.stem] = file
    return images


def model_input(image: np.ndarray, size: int, normalize: str) -> np.ndarray:
    """An (H, W, 3) uint8 image as the data module's evaluation transform makes it,
    without albumentations (``medlit.deploy``): resized to ``size`` × ``size`` by
    OpenCV's bilinear interpolation (what ``A.Resize`` calls), then ``A.Normalize``'s
    ``(x - 255·mean) / (255·std)``; (3, size, size) float32. A test holds the two equal."""
    if image.shape[:2] != (size, size):
        import cv2  # albumentations' own resize; medlit[deploy] installs it

        image = cv2.resize(image, (size, size), interpolation=cv2.INTER_LINEAR)
    mean, std = (np.asarray(v, np.float32) * 255 for v in NORMALISATION[normalize])
    return ((image.astype(np.float32) - mean) / std).transpose(2, 0, 1)


def unknown_probability(probs: np.ndarray) -> np.ndarray:
    """ISIC 2019's UNK column: 1 - the highest of the 8 known-class probabilities.

    The model is 8-way; an image none of the 8 classes claims confidently is called unknown
    (UNK then wins the argmax exactly when no known class exceeds 0.5).
    """
    return 1.0 - probs.max(axis=1)


def write_submission(path: str | Path, ids: list[str], probs: np.ndarray, year: str) -> None:
    """The official submission CSV: ``image`` + exactly the truth's columns, probabilities.

    2019 adds ``UNK`` (see ``unknown_probability``); 2020 is ``image,target`` with the
    melanoma probability. Written to a temporary name, then renamed.
    """
    if year == "2020":
        table = pd.DataFrame({"image": ids, "target": probs[:, 1]})
    else:
        table = pd.DataFrame(probs, columns=list(CLASSES[year]))
        if year == "2019":
            table["UNK"] = unknown_probability(probs)
        table.insert(0, "image", ids)
    atomic_write(Path(path), lambda p: table.to_csv(p, index=False))


def write_mask(path: str | Path, mask: np.ndarray) -> None:
    """A predicted lesion mask as the ground truth is stored: single-channel PNG, 0/255."""
    image = Image.fromarray(np.where(mask, 255, 0).astype(np.uint8), "L")
    atomic_write(Path(path), lambda p: image.save(p, format="PNG"))


def write_images(
    folder: Path, pixels: np.ndarray, labels: np.ndarray | None, year: str, first: int = 9000000
) -> list[Path]:
    """RGB images (N, H, W, 3) uint8 (generated ones) written as an ISIC classification
    release of ``year``: ``ISIC_<first + i>.jpg`` in the release's image folder and, with
    ``labels`` (class indices), its ground-truth CSV. Returns the image files."""
    ids = [f"ISIC_{first + i:07d}" for i in range(len(pixels))]
    image_dir = folder / IMAGE_DIRS[year]
    image_dir.mkdir(parents=True, exist_ok=True)
    for image_id, image in zip(ids, pixels, strict=True):
        atomic_write(
            image_dir / f"{image_id}.jpg",
            lambda p, im=image: Image.fromarray(im).save(p, format="JPEG", quality=95),
        )
    if labels is not None:
        classes = CLASSES[year]
        if year == "2020":
            table = pd.DataFrame(
                {
                    "image_name": ids,
                    "patient_id": [f"IP_SYNTH{i:05d}" for i in range(len(ids))],
                    "target": labels.astype(int),
                }
            )
        else:
            table = pd.DataFrame(np.eye(len(classes))[labels], columns=list(classes))
            if year == "2019":
                table["UNK"] = 0.0
            table.insert(0, "image", ids)
        atomic_write(folder / TRUTH_CSV[year], lambda p: table.to_csv(p, index=False))
    return [image_dir / f"{i}.jpg" for i in ids]
