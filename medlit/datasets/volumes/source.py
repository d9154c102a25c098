"""Any volumetric segmentation dataset in the nnU-Net v2 raw or the Medical Segmentation
Decathlon (MSD) format: ``dataset.json``, case discovery, checks, nnU-Net's fingerprint
(target spacing, intensity statistics) and preprocessing (``../shared/DATASETS.md``).

nnU-Net v2 raw::

    DatasetXXX_Name/dataset.json     channel_names, labels, numTraining, file_ending
    DatasetXXX_Name/imagesTr/<case>_<XXXX><file_ending>   one file per channel
    DatasetXXX_Name/labelsTr/<case><file_ending>
    DatasetXXX_Name/imagesTs/<case>_<XXXX><file_ending>   optional, unlabelled

MSD::

    TaskXX_Name/dataset.json         modality, labels, training [{image, label}], test
    TaskXX_Name/imagesTr/<case>.nii.gz   one 4D (x, y, z, channel) NIfTI when multi-channel

The preprocessing is nnU-Net's, in its order: crop to the non-zero box of the channels,
normalise (CT: clip to the training foreground's 0.5 / 99.5 percentiles, then z-score with
the foreground's mean and sd; other channels: z-score per case), resample to the target
spacing (images linearly, labels nearest-neighbour). The functions here read files; the
data module (``medlit.datamodules.volumes``) calls them.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import SimpleITK as sitk
from scipy import ndimage

from medlit.datasets.io.cases import cached_case
from medlit.datasets.io.files import file_problem
from medlit.datasets.io.volume import (
    Geometry,
    count_nonfinite,
    nifti_problem,
)
from medlit.errors import ConfigError, DatasetNotFoundError, InvalidCaseError, Report

# Every ending SimpleITK reads that nnU-Net's SimpleITKIO takes; anything else is refused.
ENDINGS = (".nii.gz", ".nii", ".nrrd", ".mha")
# nnU-Net's normalisation schemes by channel name (anything else: per-case z-score).
NORMALISATIONS = {"ct": "ct", "nonorm": "none", "zscore": "zscore", "rescale_to_0_1": "rescale"}
ANISOTROPY = 3  # nnU-Net's ANISO_THRESHOLD
# Foreground voxels drawn over the dataset for the intensity statistics, shared evenly
# between the cases (nnU-Net's num_foreground_voxels_for_intensitystats, 10e7).
STATS_VOXELS = 100_000_000

VOLUMES_HELP = (
    "The root is the dataset folder that holds dataset.json: an nnU-Net v2 raw dataset "
    "(DatasetXXX_Name/ with imagesTr/, labelsTr/) or a Medical Segmentation Decathlon task "
    "(TaskXX_Name/, from http://medicaldecathlon.com). To try medlit without one, run the "
    "demo: python -m medlit.fit experiments/demo/volumes_unet.yaml"
)


@dataclass(frozen=True)
class Labels:
    """The label map's classes (``labels`` of dataset.json), background first.

    ``values[i]`` is the label value of class ``names[i]`` (label-based), or the label
    values that make region ``names[i]`` (region-based: a label given as a list, with
    ``regions_class_order`` the value each region writes back, in order)."""

    names: tuple[str, ...]
    values: tuple[tuple[int, ...], ...]
    region_based: bool = False
    regions_class_order: tuple[int, ...] = ()

    @property
    def foreground(self) -> list[tuple[str, tuple[int, ...]]]:
        return [(n, v) for n, v in zip(self.names, self.values, strict=True) if v != (0,)]

    @property
    def allowed(self) -> set[int]:
        """Every value a label file may hold."""
        if self.region_based:
            return {0, *self.regions_class_order, *(x for v in self.values for x in v)}
        return {v[0] for v in self.values}

    def regions(self, seg: np.ndarray) -> np.ndarray:
        """(R, ...) uint8 masks of the foreground classes or regions of a label map."""
        return np.stack([np.isin(seg, v) for _, v in self.foreground]).astype(np.uint8)

    def training_target(self, seg: np.ndarray) -> np.ndarray:
        """Region masks (sigmoid training) or class indices (softmax: the values are
        nnU-Net's consecutive 0..K-1, so a value is its class index)."""
        return self.regions(seg) if self.region_based else seg.astype(np.int64)

    def label_map(self, regions: np.ndarray) -> np.ndarray:
        """Predicted (R, ...) regions -> a label map in the dataset's values: each region
        writes its value in order (region-based: ``regions_class_order``), so a later,
        nested region overwrites the one containing it, as nnU-Net writes them."""
        out = np.zeros(regions.shape[1:], np.uint8)
        order = (
            self.regions_class_order if self.region_based else [v[0] for _, v in self.foreground]
        )
        for mask, value in zip(regions.astype(bool), order, strict=True):
            out[mask] = value
        return out


@dataclass
class VolumeCase:
    """One case: its channel files (nnU-Net: one per channel; MSD: one file, 4D when
    multi-channel) and its label file (None: unlabelled, for prediction)."""

    case_id: str
    images: list[Path]
    label: Path | None
    four_d: bool = False

    @property
    def sources(self) -> list[Path]:
        return [*self.images, *([self.label] if self.label else [])]


@dataclass
class DatasetSpec:
    """What dataset.json says, and the cases it names."""

    format: str  # "nnunet" or "msd"
    path: Path  # dataset.json
    name: str
    channels: tuple[str, ...]
    labels: Labels
    file_ending: str
    num_training: int | None
    cases: dict[str, VolumeCase] = field(default_factory=dict)
    raw: dict[str, Any] = field(default_factory=dict)  # dataset.json's content

    def normalisation(self, channel: int) -> str:
        return NORMALISATIONS.get(self.channels[channel].lower(), "zscore")


def _ending(name: str) -> str | None:
    return next((e for e in ENDINGS if name.endswith(e)), None)


def _labels(path: Path, raw: Any, fmt: str, order: Any, report: Report) -> Labels | None:
    """dataset.json's ``labels`` (and ``regions_class_order``); None after an error."""
    if not isinstance(raw, dict) or not raw:
        report.error("dataset", path, "'labels' must be a non-empty mapping")
        return None
    pairs: list[tuple[str, tuple[int, ...]]] = []
    if fmt == "msd":  # {"0": "background", "1": "edema", ...}
        for k, name in raw.items():
            if not str(k).isdigit():
                report.error("dataset", path, f"labels key {k!r} is not a label value")
                return None
            pairs.append((str(name), (int(k),)))
    else:  # {"background": 0, "organ": 1, "region": [1, 2]}, in dataset.json's order
        for name, v in raw.items():
            vals = v if isinstance(v, list) else [v]
            if not vals or not all(isinstance(x, int) and x >= 0 for x in vals):
                report.error(
                    "dataset", path, f"label {name!r}: {v!r} is not a label value or list of them"
                )
                return None
            pairs.append((str(name), tuple(int(x) for x in vals)))
    if any(n == "ignore" for n, _ in pairs):
        report.error(
            "dataset",
            path,
            "label 'ignore' (nnU-Net's sparse annotation: voxels left out of the loss and "
            "the metrics) is not supported yet; relabel those voxels or drop the label",
        )
        return None
    background = [n for n, v in pairs if v == (0,)]
    if not background:
        report.error("dataset", path, "labels must declare the background as 0")
        return None
    fg = [(n, v) for n, v in pairs if v != (0,)]
    if any(len(v) > 1 for _, v in fg):  # region-based (nnU-Net): regions in their order
        if not isinstance(order, list) or len(order) != len(fg):
            report.error(
                "dataset",
                path,
                f"region-based labels (a label given as a list) need 'regions_class_order' "
                f"with one value per region ({len(fg)}); found {order!r}",
            )
            return None
        return Labels(
            (background[0], *(n for n, _ in fg)),
            ((0,), *(v for _, v in fg)),
            True,
            tuple(int(x) for x in order),
        )
    pairs = sorted(pairs, key=lambda p: p[1])
    values = [v[0] for _, v in pairs]
    if values != list(range(len(values))):
        report.error(
            "dataset",
            path,
            f"label values {values} must be consecutive from 0 (0, 1, 2, ...), as nnU-Net requires",
        )
        return None
    return Labels(tuple(n for n, _ in pairs), tuple(v for _, v in pairs))


def read_spec(root: Path, report: Report) -> DatasetSpec | None:
    """Parse ``root/dataset.json`` (the format is detected from its keys) and list the
    cases it names; every problem goes to ``report`` (a missing root or dataset.json
    raises ``DatasetNotFoundError``). None after an error in dataset.json itself."""
    if not root.is_dir():
        raise DatasetNotFoundError(f"dataset root {root} does not exist. {VOLUMES_HELP}")
    path = root / "dataset.json"
    if not path.is_file():
        raise DatasetNotFoundError(f"{path} is missing. {VOLUMES_HELP}")
    try:
        raw = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        report.error("dataset", path, f"not valid JSON ({e})")
        return None
    spec = parse_spec(raw, path, report)
    if spec is not None:
        spec.cases = (
            _nnunet_cases(root, spec, report)
            if spec.format == "nnunet"
            else _msd_cases(root, raw, report)
        )
        labelled = sum(c.label is not None for c in spec.cases.values())
        if spec.num_training is not None and labelled != spec.num_training:
            report.error(
                "dataset",
                path,
                f"numTraining is {spec.num_training} but {labelled} labelled training cases "
                "were found",
            )
    return spec


def parse_spec(raw: Any, path: Path, report: Report) -> DatasetSpec | None:
    """The channels, labels and file ending of a dataset.json's content (``raw``), without
    its cases (what a checkpoint keeps to read new cases); None after an error."""
    if not isinstance(raw, dict):
        report.error("dataset", path, "must hold a JSON object")
        return None
    if "channel_names" in raw:
        fmt, needed = "nnunet", ("channel_names", "labels", "numTraining", "file_ending")
    elif "modality" in raw:
        fmt, needed = "msd", ("modality", "labels", "training")
    else:
        report.error(
            "dataset",
            path,
            "neither nnU-Net v2 raw (channel_names, labels, numTraining, file_ending) nor "
            f"MSD (modality, labels, training); it has {sorted(raw)}",
        )
        return None
    if missing := [k for k in needed if k not in raw]:
        report.error("dataset", path, f"{fmt} dataset.json lacks {', '.join(missing)}")
        return None
    channel_map = raw["channel_names" if fmt == "nnunet" else "modality"]
    if not isinstance(channel_map, dict) or set(map(str, channel_map)) != {
        str(i) for i in range(len(channel_map))
    }:
        report.error(
            "dataset",
            path,
            f"channels must be a mapping with keys '0', '1', ... ; found {channel_map!r}",
        )
        return None
    channels = tuple(str(channel_map[str(i)]) for i in range(len(channel_map)))
    labels = _labels(path, raw["labels"], fmt, raw.get("regions_class_order"), report)
    if labels is None:
        return None
    ending = str(raw.get("file_ending", ".nii.gz"))
    if ending not in ENDINGS:
        report.error(
            "dataset",
            path,
            f"file_ending {ending!r} is not one medlit reads ({', '.join(ENDINGS)})",
        )
        return None
    num = raw.get("numTraining")
    return DatasetSpec(
        fmt,
        path,
        str(raw.get("name", path.parent.name)),
        channels,
        labels,
        ending,
        int(num) if isinstance(num, int) else None,
        raw=raw,
    )


def _nnunet_cases(root: Path, spec: DatasetSpec, report: Report) -> dict[str, VolumeCase]:
    """imagesTr/ + labelsTr/ (labelled) and imagesTs/ (unlabelled) by file name."""
    pattern = re.compile(r"(.+)_(\d{4})" + re.escape(spec.file_ending))
    cases: dict[str, VolumeCase] = {}
    n = len(spec.channels)
    for folder, labelled in (("imagesTr", True), ("imagesTs", False)):
        d = root / folder
        if not d.is_dir():
            if labelled:
                report.refuse(DatasetNotFoundError(f"{d} is missing. {VOLUMES_HELP}"), "dataset", d)
            continue
        found: dict[str, set[int]] = {}
        for f in sorted(d.iterdir()):
            if f.name.startswith("."):
                continue
            if not f.name.endswith(spec.file_ending):
                what = (
                    f"{_ending(f.name)} file" if _ending(f.name) else "not an image SimpleITK reads"
                )
                report.error(
                    f.name,
                    f,
                    f"{what}; dataset.json's file_ending is {spec.file_ending} "
                    f"(one ending per dataset; medlit reads {', '.join(ENDINGS)})",
                )
                continue
            m = pattern.fullmatch(f.name)
            if not m:
                report.error(
                    f.name, f, f"not <case>_<XXXX>{spec.file_ending} (a 4-digit channel index)"
                )
                continue
            found.setdefault(m[1], set()).add(int(m[2]))
        for case_id, indices in found.items():
            if extra := sorted(i for i in indices if i >= n):
                report.error(
                    case_id,
                    d / f"{case_id}_{extra[0]:04d}{spec.file_ending}",
                    f"channel {extra[0]:04d} is not declared (channel_names has {n})",
                )
            label = root / "labelsTr" / f"{case_id}{spec.file_ending}" if labelled else None
            if case_id in cases:
                report.error(case_id, d, "the case is in both imagesTr and imagesTs")
                continue
            images = [d / f"{case_id}_{i:04d}{spec.file_ending}" for i in range(n)]
            cases[case_id] = VolumeCase(case_id, images, label)
    labels_dir = root / "labelsTr"
    if labels_dir.is_dir():
        for f in sorted(labels_dir.iterdir()):
            if f.name.startswith(".") or not f.name.endswith(spec.file_ending):
                continue
            case_id = f.name.removesuffix(spec.file_ending)
            if case_id not in cases:
                report.error(case_id, f, "a label file without images in imagesTr")
    return cases


def _msd_cases(root: Path, raw: dict, report: Report) -> dict[str, VolumeCase]:
    """The ``training`` and ``test`` lists of an MSD dataset.json."""
    path = root / "dataset.json"
    cases: dict[str, VolumeCase] = {}
    entries = [(e, True) for e in raw.get("training") or []]
    entries += [(e, False) for e in raw.get("test") or []]
    for entry, labelled in entries:
        if labelled and not (isinstance(entry, dict) and {"image", "label"} <= set(entry)):
            report.error("dataset", path, f"training entry {entry!r} needs 'image' and 'label'")
            continue
        image = entry["image"] if isinstance(entry, dict) else entry
        if not isinstance(image, str) or not (ending := _ending(image)):
            report.error("dataset", path, f"entry {entry!r}: not an image medlit reads")
            continue
        case_id = Path(image).name.removesuffix(ending)
        label = (root / entry["label"]).resolve() if labelled else None
        cases[case_id] = VolumeCase(case_id, [(root / image).resolve()], label, four_d=True)
    return cases


# ---- reading and checking one case ---------------------------------------------------------


def _read(case: VolumeCase, path: Path, report: Report) -> list[tuple[np.ndarray, Geometry]]:
    """The 3D volumes of one file (a 4D file: one per channel), or [] after an error."""
    if problem := file_problem(path):
        report.error(case.case_id, path, problem)
        return []
    if path.name.endswith((".nii", ".nii.gz")) and (problem := nifti_problem(path)):
        report.error(case.case_id, path, problem)
        return []
    try:
        image = sitk.ReadImage(str(path))
    except RuntimeError as e:  # SimpleITK reports unreadable files as RuntimeError
        report.error(case.case_id, path, f"unreadable image ({e})")
        return []
    if image.GetNumberOfComponentsPerPixel() != 1:
        report.error(case.case_id, path, "vector pixels (RGB?): one channel per file expected")
        return []
    if image.GetDimension() == 4:
        size = list(image.GetSize())
        out = []
        for c in range(size[3]):
            vol = sitk.Extract(image, [*size[:3], 0], [0, 0, 0, c])
            out.append((sitk.GetArrayFromImage(vol), Geometry.of(vol)))
        return out
    if image.GetDimension() != 3:
        report.error(case.case_id, path, f"{image.GetDimension()}D image; 3D expected")
        return []
    return [(sitk.GetArrayFromImage(image), Geometry.of(image))]


Read = tuple[list[np.ndarray], np.ndarray | None, Geometry]


def check_case(
    case: VolumeCase, spec: DatasetSpec, report: Report, need_label: bool
) -> Read | None:
    """Every check of one case, each problem to ``report``: missing or damaged files, a
    channel count other than dataset.json's, shapes or geometry that differ between the
    channels and the label, NaN/Inf intensities, label values dataset.json does not
    declare; warnings for an empty label map. Returns (channels, label or None,
    geometry) or None after an error."""
    start = report.count()
    n = len(spec.channels)
    channels: list[tuple[Path, np.ndarray, Geometry]] = []
    for path in case.images:
        if not path.exists():
            report.error(
                case.case_id,
                path,
                f"channel file is missing (dataset.json declares {n}: {', '.join(spec.channels)})",
            )
            continue
        read_channels = _read(case, path, report)
        if not case.four_d and len(read_channels) > 1:
            report.error(
                case.case_id,
                path,
                f"a 4D image of {len(read_channels)} volumes; nnU-Net's raw format takes one "
                "3D file per channel (<case>_<XXXX>)",
            )
            continue
        channels += [(path, a, g) for a, g in read_channels]
    if case.four_d and channels and len(channels) != n:
        report.error(
            case.case_id,
            case.images[0],
            f"{len(channels)} channels in the image, dataset.json's modality declares {n}",
        )
    label = None
    if case.label is not None:
        if not case.label.exists():
            report.error(case.case_id, case.label, "label file is missing")
        elif read := _read(case, case.label, report):
            label = (case.label, *read[0])
    elif need_label:
        report.error(case.case_id, case.images[0], "no label file (needed for training)")
    everything = channels + ([label] if label else [])
    if everything:
        ref_path, ref, ref_geom = everything[0]
        for path, array, geom in everything[1:]:
            if array.shape != ref.shape:
                report.error(
                    case.case_id,
                    path,
                    f"shape (z,y,x) {array.shape} differs from {ref.shape} of {ref_path.name}",
                )
            elif problem := ref_geom.mismatch(geom):
                report.error(case.case_id, path, f"{problem} of {ref_path.name}")
    for path, array, _ in channels:
        if n_bad := count_nonfinite(path, array):
            report.error(case.case_id, path, f"{n_bad} voxels are NaN or infinite")
    if label is not None:
        path, seg, _ = label
        if not np.issubdtype(seg.dtype, np.integer) and not np.array_equal(seg, np.round(seg)):
            report.error(case.case_id, path, "label values are not whole numbers")
        else:
            found = set(np.unique(seg).astype(np.int64).tolist())
            if bad := sorted(found - spec.labels.allowed):
                report.error(
                    case.case_id,
                    path,
                    f"label values {bad} are not declared in dataset.json's labels "
                    f"{sorted(spec.labels.allowed)}",
                )
            elif found <= {0}:
                report.warning(case.case_id, path, "label map is empty (background only)")
    if any(p.severity == "error" for p in report.problems[start:]):
        return None
    return (
        [a for _, a, _ in channels],
        label[1].astype(np.uint8) if label else None,
        (channels or everything)[0][2],
    )


# ---- nnU-Net's fingerprint and preprocessing -------------------------------------------------


def nonzero_mask(channels: list[np.ndarray]) -> np.ndarray:
    """nnU-Net's ``create_nonzero_mask``: voxels non-zero in any channel, holes filled."""
    return ndimage.binary_fill_holes(np.any(np.stack(channels) != 0, axis=0))


def nonzero_box(mask: np.ndarray) -> list[tuple[int, int]]:
    """nnU-Net's crop: the bounding box of the non-zero mask (the label does not widen it);
    the whole volume when nothing is non-zero."""
    if not mask.any():
        return [(0, n) for n in mask.shape]
    return [(int(i.min()), int(i.max()) + 1) for i in np.nonzero(mask)]


def target_spacing(spacings: np.ndarray, shapes: np.ndarray) -> tuple[float, float, float]:
    """nnU-Net v2's full-resolution target spacing (``ExperimentPlanner.
    determine_fullres_target_spacing``), (z, y, x) rows in array order: the median
    spacing; when one axis is both much coarser (> 3× the others) and much shorter in
    voxels (3× fewer than the others), that axis takes the 10th percentile of its
    spacings instead (not finer than the other axes), so thick-slice cases are not
    interpolated from too few slices."""
    target = np.percentile(np.vstack(spacings), 50, 0)
    size = np.percentile(np.vstack(shapes), 50, 0)
    worst = int(np.argmax(target))
    others = [i for i in range(3) if i != worst]
    aniso_spacing = target[worst] > ANISOTROPY * max(target[i] for i in others)
    aniso_voxels = size[worst] * ANISOTROPY < min(size[i] for i in others)
    if aniso_spacing and aniso_voxels:
        thick = float(np.percentile(np.vstack(spacings)[:, worst], 10))
        if thick < max(target[i] for i in others):
            thick = max(max(target[i] for i in others), thick) + 1e-5
        target[worst] = thick
    return tuple(float(s) for s in target)  # type: ignore[return-value]


def foreground_statistics(values: np.ndarray) -> dict[str, float]:
    """nnU-Net's per-channel intensity statistics of foreground voxels (what its CT
    normalisation uses)."""
    p005, p995 = np.percentile(values, [0.5, 99.5])
    return {
        "mean": float(values.mean()),
        "std": float(values.std()),
        "percentile_00_5": float(p005),
        "percentile_99_5": float(p995),
    }


def sample_foreground(channels: list[np.ndarray], seg: np.ndarray, n: int) -> list[np.ndarray]:
    """``n`` foreground voxels (label > 0) of each channel drawn with replacement, the
    generator seeded 1234 for every case, so that every case weighs the same however
    small its foreground: nnU-Net's ``collect_foreground_intensities`` (a test compares
    the draws)."""
    rs = np.random.RandomState(1234)
    fg = np.asarray(seg) > 0
    out = []
    for c in channels:
        values = np.asarray(c)[fg]
        out.append(rs.choice(values, n, replace=True) if len(values) else values)
    return out


@dataclass(frozen=True)
class Preprocessing:
    """What changes the cached arrays (part of the cache key): the dataset's channels and
    labels, the target spacing and, per channel, the normalisation and its statistics."""

    channels: tuple[str, ...]
    allowed: tuple[int, ...]
    spacing: tuple[float, float, float] | None
    stats: tuple[dict[str, float] | None, ...]  # per channel, CT only
    norm_mask: bool = False  # z-score within the non-zero region (nnU-Net use_mask_for_norm)
    version: int = 2


def normalise(
    image: np.ndarray, scheme: str, stats: dict[str, float] | None, mask: np.ndarray | None
) -> np.ndarray:
    """One channel, by nnU-Net's scheme: ``ct`` (clip to the dataset's foreground 0.5 /
    99.5 percentiles, z-score with its foreground mean and sd), ``zscore`` (per case;
    within ``mask`` when given, 0 outside), ``rescale`` (to [0, 1]) or ``none``."""
    image = image.astype(np.float32)
    if scheme == "ct":
        assert stats is not None
        image = np.clip(image, stats["percentile_00_5"], stats["percentile_99_5"])
        return (image - stats["mean"]) / max(stats["std"], 1e-8)
    if scheme == "zscore":
        values = image[mask] if mask is not None else image
        out = (image - values.mean()) / max(float(values.std()), 1e-8)
        return np.where(mask, out, 0.0).astype(np.float32) if mask is not None else out
    if scheme == "rescale":
        lo, hi = float(image.min()), float(image.max())
        return (image - lo) / max(hi - lo, 1e-8)
    return image


def preprocess_case(
    case: VolumeCase, spec: DatasetSpec, p: Preprocessing, report: Report | None = None
) -> tuple[dict[str, np.ndarray], dict]:
    """Check one case, crop to its non-zero box, normalise each channel, resample to
    ``p.spacing`` (nnU-Net's order). Returns ``image`` (C, z, y, x) float16 and, when
    labelled, ``seg`` (the label values), ``fg_locations`` and, when resampled,
    ``seg_native`` (the labels on the cropped source grid, which evaluation scores)."""
    read = check_case(case, spec, report or Report(), need_label=case.label is not None)
    if read is None:  # only a collecting report gets here
        raise InvalidCaseError(case.case_id, case.images[0], "the case has errors (listed)")
    channels, seg, geometry = read
    shape = channels[0].shape
    nonzero = nonzero_mask(channels)
    bbox = nonzero_box(nonzero)
    crop = tuple(slice(a, b) for a, b in bbox)
    channels = [c[crop] for c in channels]
    mask = nonzero[crop] if p.norm_mask else None
    image = np.stack(
        [normalise(c, spec.normalisation(i), p.stats[i], mask) for i, c in enumerate(channels)]
    )
    meta = {
        "case_id": case.case_id,
        "geometry": geometry.to_dict(),
        "shape": list(shape),
        "bbox": bbox,
        "sources": [str(s) for s in case.sources],
    }
    return cached_case(
        image, seg[crop] if seg is not None else None, geometry.spacing_zyx, p.spacing, meta
    )


def folder_cases(folder: Path, spec: DatasetSpec) -> list[VolumeCase]:
    """The cases of a folder of nnU-Net channel files (``<case>_<XXXX><ending>``) or of
    MSD images (one file per case)."""
    if spec.format == "msd":
        files = sorted(
            f for f in folder.iterdir() if not f.name.startswith(".") and f.name.endswith(ENDINGS)
        )
        if not files:
            raise DatasetNotFoundError(f"--input {folder}: no image files in it")
        return [
            VolumeCase(
                f.name.removesuffix(next(e for e in ENDINGS if f.name.endswith(e))), [f], None, True
            )
            for f in files
        ]
    suffix = spec.file_ending
    ids = sorted(
        {
            f.name.removesuffix(suffix)[:-5]
            for f in folder.iterdir()
            if f.name.endswith(suffix) and f.name.removesuffix(suffix)[-5:-4] == "_"
        }
    )
    if not ids:
        raise DatasetNotFoundError(
            f"--input {folder}: no <case>_<XXXX>{suffix} channel files in it"
        )
    n = len(spec.channels)
    return [VolumeCase(i, [folder / f"{i}_{c:04d}{suffix}" for c in range(n)], None) for i in ids]


def prediction_cases(path: Path, spec: DatasetSpec) -> list[VolumeCase]:
    """The cases of a prediction input: one image file (one channel, or an MSD 4D file) or
    a folder of ``<case>_<XXXX><ending>`` channel files (nnU-Net's imagesTs)."""
    if path.is_file():
        ending = next((e for e in ENDINGS if path.name.endswith(e)), None)
        if ending is None:
            raise ConfigError(f"--input {path}: not an image medlit reads ({', '.join(ENDINGS)})")
        case_id = path.name.removesuffix(ending)
        if spec.format == "nnunet" and re.fullmatch(r".+_\d{4}", case_id):
            case_id = case_id[:-5]  # <case>_0000: the case, as nnU-Net names its output
        n = len(spec.channels)
        if n > 1 and spec.format == "nnunet":
            raise ConfigError(
                f"--input {path}: the model takes {n} channels; give the folder of "
                f"<case>_<XXXX>{spec.file_ending} files"
            )
        cases = [VolumeCase(case_id, [path], None, four_d=spec.format == "msd")]
    elif path.is_dir():
        cases = folder_cases(path, spec)
    else:
        raise DatasetNotFoundError(f"--input {path} does not exist")
    return cases
