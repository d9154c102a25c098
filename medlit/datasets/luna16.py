"""LUNA16: the official layout, CSV and scan checks, world <-> voxel conversion, preprocessing.

Layout (``../shared/DATASETS.md``)::

    subset0/ ... subset9/          <seriesuid>.mhd + <seriesuid>.raw   (the 10 official folds)
    annotations.csv                seriesuid,coordX,coordY,coordZ,diameter_mm   (world mm)
    annotations_excluded.csv       same columns: findings neither hit nor false positive
    candidates.csv / candidates_V2.csv   seriesuid,coordX,coordY,coordZ,class
    seg-lungs-LUNA16/<seriesuid>.mhd     optional lung masks (lungs = 3 and 4)

World coordinates are converted with SimpleITK's physical-point API on an image that
carries the scan's origin, spacing and direction, so flipped scans (direction
``-1 0 0 0 -1 0 0 0 1``) and anisotropic spacing need no special case anywhere.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import SimpleITK as sitk

from medlit.datasets.volume_io import Geometry
from medlit.errors import DatasetNotFoundError, InvalidCaseError

log = logging.getLogger(__name__)

N_SUBSETS = 10
ANNOTATION_COLUMNS = ("seriesuid", "coordX", "coordY", "coordZ", "diameter_mm")
CANDIDATE_COLUMNS = ("seriesuid", "coordX", "coordY", "coordZ", "class")
SUBMISSION_COLUMNS = ("seriesuid", "coordX", "coordY", "coordZ", "probability")
LUNG_WINDOW = (-1000.0, 400.0)
AIR_HU = -1024

LUNA16_HELP = (
    "LUNA16 is distributed by the challenge at https://luna16.grand-challenge.org/Download/ "
    "(also on Zenodo: records 3723295 and 4121926). Unpack the subsets so that subset0/ ... "
    "subset9/ (holding <seriesuid>.mhd/.raw) and annotations.csv lie directly under the root; "
    "any number of subsets will do. To try medlit without it, run the demo: "
    "python -m medlit.fit experiments/demo/luna16_yolo.yaml"
)

# MetaImage ElementType -> bytes per voxel.
_ELEMENT_BYTES = {
    "MET_UCHAR": 1,
    "MET_CHAR": 1,
    "MET_USHORT": 2,
    "MET_SHORT": 2,
    "MET_UINT": 4,
    "MET_INT": 4,
    "MET_ULONG": 8,
    "MET_LONG": 8,
    "MET_FLOAT": 4,
    "MET_DOUBLE": 8,
}


@dataclass(frozen=True)
class LunaScan:
    """One CT scan of the release: its files and the official subset (fold) it belongs to."""

    seriesuid: str
    subset: int
    mhd: Path
    data: Path  # the .raw (or .zraw) file the header points to
    lungs: Path | None = None  # seg-lungs-LUNA16/<seriesuid>.mhd
    lungs_data: Path | None = None

    @property
    def sources(self) -> list[Path]:
        """Every file the cached arrays are made from (their content keys the cache)."""
        extra = [self.lungs, self.lungs_data] if self.lungs and self.lungs_data else []
        return [self.mhd, self.data, *extra]


# ---- MetaImage headers -------------------------------------------------------------------


def read_header(mhd: Path) -> dict[str, str]:
    """The ``key = value`` lines of a MetaImage header (``.mhd``)."""
    try:
        text = mhd.read_text(errors="replace")
    except OSError as e:
        raise InvalidCaseError(mhd.stem, mhd, f"unreadable MetaImage header ({e})") from e
    header = {}
    for line in text.splitlines():
        key, sep, value = line.partition("=")
        if sep:
            header[key.strip()] = value.strip()
    return header


def data_file(mhd: Path, header: dict[str, str]) -> Path:
    name = header.get("ElementDataFile")
    if not name or name == "LOCAL":
        raise InvalidCaseError(
            mhd.stem, mhd, "header has no ElementDataFile (LUNA16 headers name their .raw file)"
        )
    return mhd.parent / name


def check_data_size(uid: str, mhd: Path, header: dict[str, str]) -> None:
    """Refuse a ``.raw`` whose size differs from what the header says (a truncated download).

    SimpleITK would read a short file without complaint and return partly wrong voxels.
    Compressed data (``CompressedData = True``, e.g. the lung masks' ``.zraw``) has no
    size to compare with and is left to the reader.
    """
    data = data_file(mhd, header)
    if not data.is_file():
        raise InvalidCaseError(uid, data, f"data file named by {mhd.name} does not exist")
    if header.get("CompressedData", "False").lower() == "true":
        return
    try:
        dims = [int(v) for v in header["DimSize"].split()]
        nbytes = _ELEMENT_BYTES[header["ElementType"]]
    except (KeyError, ValueError) as e:
        raise InvalidCaseError(uid, mhd, f"header lacks a valid DimSize/ElementType ({e})") from e
    channels = int(header.get("ElementNumberOfChannels", "1"))
    expected = int(np.prod(dims)) * nbytes * channels + int(header.get("HeaderSize", "0"))
    size = data.stat().st_size
    if size != expected:
        what = "shorter" if size < expected else "longer"
        raise InvalidCaseError(
            uid,
            data,
            f"{size} bytes, {what} than the {expected} that {mhd.name} declares "
            f"(DimSize {'x'.join(map(str, dims))} of {header['ElementType']}); "
            "truncated or mismatched download",
        )


def discover_scans(root: Path) -> dict[str, LunaScan]:
    """Every scan under ``subset0..9`` (any subset may be absent), keyed by seriesuid."""
    if not root.is_dir():
        raise DatasetNotFoundError(f"LUNA16 root {root} does not exist. {LUNA16_HELP}")
    lungs_dir = root / "seg-lungs-LUNA16"
    scans: dict[str, LunaScan] = {}
    for k in range(N_SUBSETS):
        for mhd in sorted((root / f"subset{k}").glob("*.mhd")):
            uid = mhd.stem
            if uid in scans:
                raise InvalidCaseError(
                    uid, mhd, f"the same seriesuid is also in subset{scans[uid].subset}"
                )
            lungs = lungs_dir / f"{uid}.mhd"
            lungs_data = data_file(lungs, read_header(lungs)) if lungs.is_file() else None
            scans[uid] = LunaScan(
                uid,
                k,
                mhd,
                data_file(mhd, read_header(mhd)),
                lungs if lungs_data else None,
                lungs_data,
            )
    if not scans:
        raise DatasetNotFoundError(f"no subset0..subset9/*.mhd scans under {root}. {LUNA16_HELP}")
    return scans


# ---- CSV files ---------------------------------------------------------------------------


def read_table(path: Path, columns: Sequence[str], required: bool = True) -> pd.DataFrame:
    """Read an official LUNA16 CSV, checking its schema and every row.

    Errors name the file and the 1-based line: missing or unexpected columns, an empty
    seriesuid, a coordinate or diameter that is not a finite number, a class not 0/1.
    An optional file that does not exist yields an empty table.
    """
    if not path.is_file():
        if required:
            raise DatasetNotFoundError(f"{path} does not exist. {LUNA16_HELP}")
        return pd.DataFrame({c: pd.Series(dtype=float) for c in columns}).astype({"seriesuid": str})
    try:
        raw = pd.read_csv(path, dtype=str, keep_default_na=False, skipinitialspace=True)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as e:
        raise InvalidCaseError(path.name, path, f"unreadable CSV ({e})") from e
    found = [c.strip() for c in raw.columns]
    if found != list(columns):
        missing = [c for c in columns if c not in found]
        extra = [c for c in found if c not in columns]
        raise InvalidCaseError(
            path.name,
            path,
            f"header {found} is not the official {list(columns)}"
            + (f"; missing {missing}" if missing else "")
            + (f"; unexpected {extra}" if extra else ""),
        )
    raw.columns = found
    table = pd.DataFrame({"seriesuid": raw["seriesuid"].str.strip()})
    if (bad := table["seriesuid"] == "").any():
        line = int(np.flatnonzero(bad)[0]) + 2
        raise InvalidCaseError(path.name, path, f"line {line}: empty seriesuid")
    for c in columns[1:]:
        values = pd.to_numeric(raw[c], errors="coerce")
        bad = ~np.isfinite(values.to_numpy(dtype=float))
        if bad.any():
            i = int(np.flatnonzero(bad)[0])
            raise InvalidCaseError(
                table["seriesuid"].iloc[i],
                path,
                f"line {i + 2}: {c} = {raw[c].iloc[i]!r} is not a finite number",
            )
        table[c] = values.astype(float)
    if "class" in table and not table["class"].isin([0, 1]).all():
        i = int(np.flatnonzero(~table["class"].isin([0, 1]))[0])
        raise InvalidCaseError(
            table["seriesuid"].iloc[i],
            path,
            f"line {i + 2}: class {raw['class'].iloc[i]!r} is not 0 or 1",
        )
    if "class" in table:
        table["class"] = table["class"].astype(int)
    table["line"] = np.arange(len(table)) + 2
    return table


def keep_present(table: pd.DataFrame, scans: Sequence[str], path: Path) -> pd.DataFrame:
    """Rows whose scan is present; the rest (subsets not downloaded) in one summary line."""
    present = table["seriesuid"].isin(set(scans))
    if skipped := int((~present).sum()):
        log.info(
            "%s: %d of %d rows name scans that are not under the root (subsets not "
            "downloaded?): skipped",
            path.name,
            skipped,
            len(table),
        )
    return table[present].reset_index(drop=True)


# ---- geometry ----------------------------------------------------------------------------


def reference_image(geometry: Geometry) -> sitk.Image:
    """A 1-voxel image carrying ``geometry``: SimpleITK's index <-> physical point
    transforms depend only on origin, spacing and direction, not on the size."""
    return geometry.apply(sitk.Image([1, 1, 1], sitk.sitkUInt8))


def world_to_index(geometry: Geometry, points_xyz: np.ndarray) -> np.ndarray:
    """World points (N, 3) in mm (x, y, z) -> continuous voxel indices (N, 3) in (z, y, x)."""
    ref = reference_image(geometry)
    out = [ref.TransformPhysicalPointToContinuousIndex(tuple(map(float, p))) for p in points_xyz]
    return np.asarray(out, dtype=float).reshape(-1, 3)[:, ::-1].copy()


def index_to_world(geometry: Geometry, index_zyx: np.ndarray) -> np.ndarray:
    """Continuous voxel indices (N, 3) in (z, y, x) -> world points (N, 3) in mm (x, y, z)."""
    ref = reference_image(geometry)
    out = [
        ref.TransformContinuousIndexToPhysicalPoint(tuple(map(float, p[::-1]))) for p in index_zyx
    ]
    return np.asarray(out, dtype=float).reshape(-1, 3)


def geometry_of(meta: dict) -> Geometry:
    g = meta["geometry"]
    return Geometry(tuple(g["origin"]), tuple(g["spacing"]), tuple(g["direction"]))


def locate(table: pd.DataFrame, meta: dict, path: Path, size_column: str | None) -> np.ndarray:
    """Rows of one scan as voxel positions in its cached grid: (N, 4) = z, y, x, radius mm.

    A point outside the scan is an error naming the CSV file and line: it means the
    coordinates are in another convention (voxels, or another scan's frame).
    """
    if table.empty:
        return np.zeros((0, 4))
    geometry = geometry_of(meta)
    index = world_to_index(geometry, table[["coordX", "coordY", "coordZ"]].to_numpy())
    shape = np.asarray(meta["shape"])
    outside = ((index < -0.5) | (index > shape - 0.5)).any(1)
    if outside.any():
        i = int(np.flatnonzero(outside)[0])
        row = table.iloc[i]
        raise InvalidCaseError(
            row["seriesuid"],
            path,
            f"line {int(row['line'])}: world point ({row['coordX']:.1f}, {row['coordY']:.1f}, "
            f"{row['coordZ']:.1f}) mm lies outside the scan (voxel z,y,x = "
            f"{np.round(index[i], 1).tolist()}, shape {shape.tolist()})",
        )
    radius = (
        np.where(table[size_column] < 0, 10.0, table[size_column]).astype(float) / 2
        if size_column
        else np.zeros(len(table))
    )
    return np.column_stack([index, radius])


# ---- preprocessing -----------------------------------------------------------------------


@dataclass(frozen=True)
class Preprocessing:
    """What the cached arrays depend on (part of the cache key).

    ``spacing`` (x, y, z mm) resamples every scan (linear for CT, nearest for masks);
    None keeps the native grid. Intensities are cached in HU (int16), so changing the
    window needs no rebuild.
    """

    spacing: tuple[float, float, float] | None = None
    version: int = 1


def _resample(image: sitk.Image, spacing: Sequence[float], interpolator: int, fill: float):
    size = [
        max(1, int(round(n * s / t)))
        for n, s, t in zip(image.GetSize(), image.GetSpacing(), spacing, strict=True)
    ]
    return sitk.Resample(
        image,
        size,
        sitk.Transform(),
        interpolator,
        image.GetOrigin(),
        tuple(float(s) for s in spacing),
        image.GetDirection(),
        fill,
        image.GetPixelID(),
    )


def preprocess_scan(scan: LunaScan, prep: Preprocessing) -> tuple[dict[str, np.ndarray], dict]:
    """Check and decode one scan (and its lung mask), optionally resample, for the cache.

    Returns ``image`` (z, y, x) int16 HU and, when a mask exists, ``lungs`` (z, y, x)
    uint8 (1 = lung); ``meta`` holds the cached grid's geometry and the source's.
    """
    uid = scan.seriesuid
    header = read_header(scan.mhd)
    check_data_size(uid, scan.mhd, header)
    try:
        image = sitk.ReadImage(str(scan.mhd))
    except RuntimeError as e:
        raise InvalidCaseError(uid, scan.mhd, f"SimpleITK cannot read it ({e})") from e
    if image.GetDimension() != 3 or image.GetNumberOfComponentsPerPixel() != 1:
        raise InvalidCaseError(uid, scan.mhd, "not a single-channel 3D image")
    source, source_size = Geometry.of(image), image.GetSize()
    array = sitk.GetArrayViewFromImage(image)
    if np.issubdtype(array.dtype, np.floating) and (bad := int((~np.isfinite(array)).sum())):
        raise InvalidCaseError(uid, scan.data, f"{bad} NaN/Inf voxels; CT values must be finite HU")
    image = sitk.Cast(sitk.Clamp(image, lowerBound=AIR_HU, upperBound=3071), sitk.sitkInt16)
    if prep.spacing is not None:
        image = _resample(image, prep.spacing, sitk.sitkLinear, AIR_HU)
    arrays = {"image": sitk.GetArrayFromImage(image)}
    if scan.lungs is not None:
        try:
            lungs = sitk.ReadImage(str(scan.lungs))
        except RuntimeError as e:
            raise InvalidCaseError(uid, scan.lungs, f"SimpleITK cannot read it ({e})") from e
        if lungs.GetSize() != source_size:
            raise InvalidCaseError(
                uid, scan.lungs, f"size {lungs.GetSize()} differs from the scan's {source_size}"
            )
        if problem := source.mismatch(Geometry.of(lungs)):
            raise InvalidCaseError(uid, scan.lungs, f"lung mask {problem}")
        lungs = sitk.Cast(sitk.BinaryThreshold(lungs, 3, 4, 1, 0), sitk.sitkUInt8)
        if prep.spacing is not None:
            lungs = _resample(lungs, prep.spacing, sitk.sitkNearestNeighbor, 0)
        arrays["lungs"] = sitk.GetArrayFromImage(lungs)
    meta = {
        "case_id": uid,
        "seriesuid": uid,
        "subset": scan.subset,
        "shape": list(arrays["image"].shape),
        "geometry": Geometry.of(image).to_dict(),
        "source_geometry": source.to_dict(),
        "source_shape": list(reversed(source_size)),
    }
    return arrays, meta


def window(hu: np.ndarray, lo_hi: Sequence[float] = LUNG_WINDOW) -> np.ndarray:
    """HU -> [0, 1] float32 inside the window ``(lo, hi)``, clipped outside it."""
    lo, hi = float(lo_hi[0]), float(lo_hi[1])
    return np.clip((np.asarray(hu, dtype=np.float32) - lo) / (hi - lo), 0.0, 1.0)


def candidate_cube(
    volume: np.ndarray,
    centre_zyx: Sequence[float],
    size: int,
    mode: str = "planes",
    context: int = 1,
) -> np.ndarray:
    """The block of ``volume`` (z, y, x) around a voxel position, zero-padded outside.

    ``planes`` mode: a size³ cube; ``slices`` mode: ``2·context + 1`` axial slices of
    size². Only the part inside the volume is read (cheap on a memory-mapped array).
    """
    c = np.round(np.asarray(centre_zyx, dtype=float)).astype(int)
    half = size // 2
    depth, zhalf = (size, half) if mode == "planes" else (2 * context + 1, context)
    box_lo = np.array([c[0] - zhalf, c[1] - half, c[2] - half])
    box_hi = box_lo + np.array([depth, size, size])
    shape = np.asarray(volume.shape)
    src_lo, src_hi = np.clip(box_lo, 0, shape), np.clip(box_hi, 0, shape)
    cube = np.full((depth, size, size), AIR_HU, dtype=volume.dtype)
    if (src_hi > src_lo).all():
        dst = src_lo - box_lo
        cube[tuple(slice(d, d + (b - a)) for d, a, b in zip(dst, src_lo, src_hi, strict=True))] = (
            volume[tuple(slice(a, b) for a, b in zip(src_lo, src_hi, strict=True))]
        )
    return cube


def cube_input(cube: np.ndarray, mode: str = "planes") -> np.ndarray:
    """Network input (3, size, size) from ``candidate_cube``'s block: the axial, coronal
    and sagittal planes through the centre (the classic LUNA16 false-positive-reduction
    input), or the axial slices themselves."""
    if mode == "slices":
        return cube
    half = cube.shape[0] // 2
    return np.stack([cube[half], cube[:, half, :], cube[:, :, half]])


def candidate_patch(
    hu: np.ndarray,
    centre_zyx: Sequence[float],
    size: int,
    hu_window: Sequence[float] = LUNG_WINDOW,
    mode: str = "planes",
    context: int = 1,
) -> np.ndarray:
    """The windowed network input (3, size, size) around one candidate of an HU volume."""
    return cube_input(window(candidate_cube(hu, centre_zyx, size, mode, context), hu_window), mode)
