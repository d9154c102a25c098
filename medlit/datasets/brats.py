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

from medlit.datasets.volume_io import Geometry, count_nonfinite, gzip_stream_problem, read_volume
from medlit.errors import DatasetNotFoundError, InvalidCaseError

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


def _check_and_read(case: BraTSCase, path: Path) -> tuple[np.ndarray, Geometry]:
    if not path.exists():
        raise InvalidCaseError(case.case_id, path, "file is missing")
    if path.suffix == ".gz" and (problem := gzip_stream_problem(path)):
        raise InvalidCaseError(case.case_id, path, problem)
    try:
        return read_volume(path)
    except RuntimeError as e:  # SimpleITK reports unreadable files as RuntimeError
        raise InvalidCaseError(case.case_id, path, f"unreadable image ({e})") from e


@dataclass
class Preprocessing:
    """Parameters that change the cached arrays (and so are part of the cache key)."""

    modalities: tuple[str, ...] = MODALITIES
    labels: tuple[int, ...] = (0, 1, 2, 4)
    require_seg: bool = True
    version: int = 1  # bump when the code below changes what it stores


def preprocess_case(case: BraTSCase, p: Preprocessing) -> tuple[dict[str, np.ndarray], dict]:
    """Check one case, crop it to the brain, z-score each modality over the brain.

    Checks: every modality (and the segmentation, when ``require_seg``) present, intact
    gzip streams, equal shapes and geometry, finite intensities, label values within
    ``p.labels``. Returns ``image`` (C, z, y, x) float16 and, when labelled, ``seg``
    (z, y, x) uint8 in the release's own label values.
    """
    if p.require_seg and case.seg is None:
        raise InvalidCaseError(
            case.case_id, case.folder, "segmentation is missing (needed for training/evaluation)"
        )
    paths = [*case.images.values(), *([case.seg] if case.seg else [])]
    read = [(path, *_check_and_read(case, path)) for path in paths]
    # The reference is the file most others agree with, so the odd file out is the one
    # named, whichever modality it is.
    ref_path, ref_array, ref_geom = max(
        read,
        key=lambda r: sum(o[1].shape == r[1].shape and r[2].mismatch(o[2]) is None for o in read),
    )
    volumes = []
    for path, array, geom in read:
        if array.shape != ref_array.shape:
            raise InvalidCaseError(
                case.case_id,
                path,
                f"shape (z,y,x) {array.shape} differs from {ref_array.shape} of {ref_path.name}",
            )
        if problem := ref_geom.mismatch(geom):
            raise InvalidCaseError(case.case_id, path, f"{problem} of {ref_path.name}")
        if path != case.seg and (n := count_nonfinite(path, array)):
            raise InvalidCaseError(case.case_id, path, f"{n} voxels are NaN or infinite")
        volumes.append(array)
    ref_shape = ref_array.shape

    seg = None
    if case.seg is not None:
        seg_values = volumes.pop()
        found = set(np.unique(seg_values).tolist())
        if bad := sorted(found - set(p.labels)):
            raise InvalidCaseError(
                case.case_id,
                case.seg,
                f"label values {bad} are not in the configured set {sorted(p.labels)} "
                "(BraTS 2018-2021 use 1, 2, 4; 2023 uses 1, 2, 3)",
            )
        seg = seg_values.astype(np.uint8)

    image = np.stack(volumes).astype(np.float32)
    brain = np.any(image != 0, axis=0)
    if seg is not None:
        brain |= seg > 0
    if not brain.any():
        raise InvalidCaseError(case.case_id, ref_path, "all modalities are zero everywhere")
    bbox = [(int(i.min()), int(i.max()) + 1) for i in np.nonzero(brain)]
    crop = tuple(slice(a, b) for a, b in bbox)
    image, brain = image[(slice(None), *crop)], brain[crop]
    for c in range(image.shape[0]):
        values = image[c][brain]
        std = float(values.std())
        image[c] = np.where(brain, (image[c] - values.mean()) / max(std, 1e-8), 0.0)
    arrays = {"image": image.astype(np.float16)}
    if seg is not None:
        arrays["seg"] = seg[crop]
    meta = {
        "case_id": case.case_id,
        "geometry": ref_geom.to_dict(),
        "shape": list(ref_shape),
        "bbox": bbox,
        "has_seg": seg is not None,
        "sources": [str(s) for s in case.sources],
    }
    return arrays, meta


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
