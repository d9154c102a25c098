"""BraTS: the official 2020, 2021 and 2023 GLI layouts, case checks, preprocessing, samples.

Layouts (``../shared/DATASETS.md``)::

    2020  BraTS20_Training_001/BraTS20_Training_001_{t1,t1ce,t2,flair,seg}.nii
    2021  BraTS2021_00000/BraTS2021_00000_{t1,t1ce,t2,flair,seg}.nii.gz
    2023  BraTS-GLI-00000-000/BraTS-GLI-00000-000-{t1n,t1c,t2w,t2f,seg}.nii.gz

medlit names the four contrasts by their 2021 names (t1, t1ce, t2, flair) whatever the
year; 2023's t1n/t1c/t2w/t2f map onto them.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np

from medlit.datasets.io.cases import cached_case
from medlit.datasets.io.files import file_problem
from medlit.datasets.io.volume import (
    Geometry,
    count_nonfinite,
    nifti_problem,
    read_volume,
)
from medlit.errors import DatasetNotFoundError, InvalidCaseError, Report

Modality = Literal["t1", "t1ce", "t2", "flair"]
MODALITIES: tuple[str, ...] = ("t1", "t1ce", "t2", "flair")


@dataclass(frozen=True)
class Layout:
    """How one BraTS release names its folders and files, and which labels it uses."""

    year: str
    case_pattern: str  # regex of a case folder name
    sep: str  # between case id and modality
    ext: str
    modality_names: dict[str, str]  # medlit name -> name in the file
    labels: tuple[int, ...]  # label values present in the segmentation (0 = background)
    et_label: int  # enhancing tumour

    def file(self, case_dir: Path, key: str) -> Path:
        name = self.modality_names.get(key, key)
        return case_dir / f"{case_dir.name}{self.sep}{name}{self.ext}"


LAYOUTS: dict[str, Layout] = {
    "2020": Layout(
        "2020",
        r"BraTS20_(Training|Validation)_\d{3}",
        "_",
        ".nii",
        {m: m for m in MODALITIES},
        (0, 1, 2, 4),
        4,
    ),
    "2021": Layout(
        "2021", r"BraTS2021_\d{5}", "_", ".nii.gz", {m: m for m in MODALITIES}, (0, 1, 2, 4), 4
    ),
    "2023": Layout(
        "2023",
        r"BraTS-GLI-\d{5}-\d{3}",
        "-",
        ".nii.gz",
        {"t1": "t1n", "t1ce": "t1c", "t2": "t2w", "flair": "t2f"},
        (0, 1, 2, 3),
        3,
    ),
}

# DICOM input: each modality's series by its SeriesDescription (medlit.datasets.io.dicom).
_CONTRAST = r"((?<![a-z])(post|gad|gd|ce|contrast)(?![a-z])|\+ ?c(?![a-z])|(?<![a-z])c\+)"
DICOM_SERIES: dict[str, str] = {
    "flair": r"flair",
    "t2": r"t2(?![*a-z])(?!.*flair)",
    "t1ce": rf"t1(?!.*flair).*{_CONTRAST}|t1ce?(?![a-z0-9])",
    "t1": rf"t1(?![c0-9])(?!.*{_CONTRAST})(?!.*flair)",
}


BRATS_HELP = (
    "BraTS is distributed by the challenge organisers after registration: 2021 through "
    "https://www.synapse.org/brats2021 (or the Kaggle mirror 'BraTS 2021 Task 1'), 2023 "
    "through https://www.synapse.org/brats2023. Unpack it so that the case folders "
    "(e.g. BraTS2021_00000/) lie directly under the root. To try medlit without it, run "
    "the demo: python -m medlit.fit experiments/demo/brats_unet.yaml"
)


@dataclass
class BraTSCase:
    """The files of one case; ``seg`` is None for unlabelled (prediction-only) cases."""

    case_id: str
    folder: Path
    images: dict[str, Path]
    seg: Path | None

    @property
    def sources(self) -> list[Path]:
        return [*self.images.values(), *([self.seg] if self.seg else [])]


def detect_layout(root: Path) -> Layout:
    """Pick the layout whose case-folder pattern matches most folders under ``root``."""
    if not root.is_dir():
        raise DatasetNotFoundError(f"BraTS root {root} does not exist. {BRATS_HELP}")
    names = [p.name for p in root.iterdir() if p.is_dir()]
    counts = {
        year: sum(bool(re.fullmatch(lay.case_pattern, n)) for n in names)
        for year, lay in LAYOUTS.items()
    }
    year = max(counts, key=counts.__getitem__)
    if counts[year] == 0:
        raise DatasetNotFoundError(
            f"no BraTS case folders under {root} (looked for BraTS20_Training_XXX, "
            f"BraTS2021_XXXXX and BraTS-GLI-XXXXX-YYY). {BRATS_HELP}"
        )
    return LAYOUTS[year]


def discover_cases(root: Path, layout: Layout, modalities: tuple[str, ...]) -> list[BraTSCase]:
    """List the cases of ``root``; a missing image is reported when the case is checked."""
    cases = []
    for folder in sorted(p for p in root.iterdir() if p.is_dir()):
        if not re.fullmatch(layout.case_pattern, folder.name):
            continue
        seg = layout.file(folder, "seg")
        cases.append(
            BraTSCase(
                folder.name,
                folder,
                {m: layout.file(folder, m) for m in modalities},
                seg if seg.exists() else None,
            )
        )
    return cases


def _check_and_read(
    case: BraTSCase, path: Path, report: Report
) -> tuple[np.ndarray, Geometry] | None:
    """Read one file of a case, or report why it cannot be read (and return None)."""
    if problem := file_problem(path):
        report.error(case.case_id, path, problem)
        return None
    if problem := nifti_problem(path):
        report.error(case.case_id, path, problem)
        return None
    try:
        return read_volume(path)
    except RuntimeError as e:  # SimpleITK reports unreadable files as RuntimeError
        report.error(case.case_id, path, f"unreadable image ({e})")
        return None


@dataclass
class Preprocessing:
    """Parameters that change the cached arrays (and so are part of the cache key)."""

    modalities: tuple[str, ...] = MODALITIES
    labels: tuple[int, ...] = (0, 1, 2, 4)
    require_seg: bool = True
    # (z, y, x) mm of the cached grid; None keeps the release's own (1 mm for BraTS).
    spacing: tuple[float, float, float] | None = None
    version: int = 3  # bump when the code below changes what it stores


Read = list[tuple[Path, np.ndarray, Geometry]]


def check_case(case: BraTSCase, p: Preprocessing, report: Report) -> Read | None:
    """Every check of one case; each problem goes to ``report``.

    Errors: a missing modality (or segmentation, when ``p.require_seg``), a truncated or
    corrupt file (gzip stream, header vs data size), an unreadable image, shapes or
    geometry (spacing, origin, direction) that differ between the files, NaN/Inf
    intensities, label values outside ``p.labels``, all modalities zero. Warnings: an
    empty tumour mask, a modality that is zero everywhere. Returns the files read, as
    ``(path, array, geometry)`` with the segmentation last, or None after an error.
    """
    start = report.count()
    if p.require_seg and case.seg is None:
        report.error(
            case.case_id, case.folder, "segmentation is missing (needed for training/evaluation)"
        )
    paths = [*case.images.values(), *([case.seg] if case.seg else [])]
    read = [(path, *r) for path in paths if (r := _check_and_read(case, path, report))]
    if read:
        # The reference is the file most others agree with, so the odd file out is the
        # one named, whichever modality it is.
        ref_path, ref_array, ref_geom = max(
            read,
            key=lambda r: sum(
                o[1].shape == r[1].shape and r[2].mismatch(o[2]) is None for o in read
            ),
        )
        for path, array, geom in read:
            if array.shape != ref_array.shape:
                report.error(
                    case.case_id,
                    path,
                    f"shape (z,y,x) {array.shape} differs from {ref_array.shape} of "
                    f"{ref_path.name}",
                )
            elif problem := ref_geom.mismatch(geom):
                report.error(case.case_id, path, f"{problem} of {ref_path.name}")
            if path == case.seg:
                found = set(np.unique(array).tolist())
                if bad := sorted(found - set(p.labels)):
                    report.error(
                        case.case_id,
                        path,
                        f"label values {bad} are not in the configured set {sorted(p.labels)} "
                        "(BraTS 2018-2021 use 1, 2, 4; 2023 uses 1, 2, 3)",
                    )
                elif found <= {0}:
                    report.warning(case.case_id, path, "segmentation is empty (no tumour voxels)")
            else:
                if n := count_nonfinite(path, array):
                    report.error(case.case_id, path, f"{n} voxels are NaN or infinite")
                elif not array.any():
                    report.warning(case.case_id, path, "image is zero everywhere")
        images = [a for path, a, _ in read if path != case.seg]
        if images and len(images) == len(case.images) and not any(a.any() for a in images):
            report.error(case.case_id, ref_path, "all modalities are zero everywhere")
    if any(q.severity == "error" for q in report.problems[start:]):
        return None
    return read


def preprocess_case(
    case: BraTSCase, p: Preprocessing, report: Report | None = None
) -> tuple[dict[str, np.ndarray], dict]:
    """Check one case (``check_case``), crop it to the brain, z-score each modality over
    the brain, and resample to ``p.spacing`` when it is set (nnU-Net's order: crop,
    normalise, resample; images linearly, labels nearest-neighbour).

    Returns ``image`` (C, z, y, x) float16 and, when labelled, ``seg`` (z, y, x) uint8 in
    the release's own label values and ``fg_locations`` (N, 4) int32: label, z, y, x of a
    sample of each label's voxels (:func:`~medlit.datasets.patches.foreground_index`,
    what 3D patch sampling centres on). A resampled case also keeps ``seg_native``, the
    labels on the cropped source grid that evaluation scores against. A problem raises
    ``InvalidCaseError`` (a strict report).
    """
    read = check_case(case, p, report or Report())
    if read is None:  # only a collecting report gets here
        raise InvalidCaseError(case.case_id, case.folder, "the case has errors (listed)")
    ref_path, _, ref_geom = read[0]
    ref_shape = read[0][1].shape
    volumes = [array for _, array, _ in read]
    seg = volumes.pop().astype(np.uint8) if case.seg is not None else None

    image = np.stack(volumes).astype(np.float32)
    brain = np.any(image != 0, axis=0)
    if seg is not None:
        brain |= seg > 0
    bbox = [(int(i.min()), int(i.max()) + 1) for i in np.nonzero(brain)]
    crop = tuple(slice(a, b) for a, b in bbox)
    image, brain = image[(slice(None), *crop)], brain[crop]
    for c in range(image.shape[0]):
        values = image[c][brain]
        std = float(values.std())
        image[c] = np.where(brain, (image[c] - values.mean()) / max(std, 1e-8), 0.0)
    meta = {
        "case_id": case.case_id,
        "geometry": ref_geom.to_dict(),
        "shape": list(ref_shape),
        "bbox": bbox,
        "sources": [str(s) for s in case.sources],
    }
    return cached_case(
        image, seg[crop] if seg is not None else None, ref_geom.spacing_zyx, p.spacing, meta
    )


def label_targets(seg: np.ndarray, et_label: int, target: str) -> np.ndarray:
    """Turn a BraTS label map into training targets.

    ``regions``: (3, ...) uint8 masks WT = {1, 2, ET}, TC = {1, ET}, ET = {ET}
    (labels outside these, e.g. 2023's resection cavity 4, are background).
    ``labels``: class indices 0 background, 1 NCR, 2 edema, 3 ET.
    """
    if target == "regions":
        et = seg == et_label
        tc = (seg == 1) | et
        return np.stack([tc | (seg == 2), tc, et]).astype(np.uint8)
    out = np.zeros(seg.shape, np.int64)
    out[seg == 1], out[seg == 2], out[seg == et_label] = 1, 2, 3
    return out


def labels_from_regions(regions: np.ndarray, et_label: int) -> np.ndarray:
    """Nested WT/TC/ET masks (3, ...) -> a label map in the release's values (2 edema,
    1 necrosis/non-enhancing core, ``et_label`` enhancing tumour)."""
    wt, tc, et = (regions[i].astype(bool) for i in range(3))
    out = np.zeros(wt.shape, np.uint8)
    out[wt], out[tc], out[et] = 2, 1, et_label
    return out


def nested_regions(regions: np.ndarray) -> np.ndarray:
    """WT/TC/ET regions as a label map holds them: a voxel of ET is also TC and WT, one of
    TC also WT (independent sigmoid regions need not nest until they are written)."""
    if len(regions) != 3:
        return regions
    wt, tc, et = (np.asarray(r, bool) for r in regions)
    return np.stack([wt | tc | et, tc | et, et])


def prediction_cases(
    path: Path, year: str | None, modalities: tuple[str, ...]
) -> tuple[Layout, list[BraTSCase]]:
    """The cases of a prediction input: ``path`` is a case folder or a folder of case
    folders, in ``year``'s layout or the one its names follow; refused when there are none."""
    own = next((y for y, lay in LAYOUTS.items() if re.fullmatch(lay.case_pattern, path.name)), None)
    layout = LAYOUTS[year or own or detect_layout(path).year]
    found = discover_cases(path.parent if own else path, layout, modalities)
    cases = [c for c in found if c.case_id == path.name] if own else found
    if not cases:
        raise DatasetNotFoundError(f"--input {path}: no {layout.year} BraTS case folders in it")
    return layout, cases
