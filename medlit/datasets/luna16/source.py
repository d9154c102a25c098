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

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import numpy as np
import pandas as pd
import SimpleITK as sitk

from medlit.datasets.io.files import atomic_write, file_problem
from medlit.datasets.io.volume import Geometry, resample, write_image
from medlit.errors import DatasetNotFoundError, InvalidCaseError, Report

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
    if problem := file_problem(mhd):
        raise InvalidCaseError(mhd.stem, mhd, f"MetaImage header {problem}")
    try:
        text = mhd.read_text(errors="replace")
    except OSError as e:
        raise InvalidCaseError(mhd.stem, mhd, f"unreadable MetaImage header ({e})") from e
    header = {}
    for line in text.split("\n"):
        key, sep, value = line.partition("=")
        if sep:
            header[key.strip()] = value.strip()
    return header


_BOOLEAN_KEYS = (
    "BinaryData",
    "BinaryDataByteOrderMSB",
    "ElementByteOrderMSB",
    "CompressedData",
)
_VECTOR_KEYS = ("ElementSpacing", "Offset", "Position", "Origin", "CenterOfRotation")
_MATRIX_KEYS = ("TransformMatrix", "Rotation", "Orientation")


def header_problem(header: dict[str, str]) -> str | None:
    """What makes a MetaImage header unsafe to read, or None.

    SimpleITK's reader is lenient: a boolean it cannot parse counts as False and a key it
    does not know is ignored, so a damaged byte in a header can swap the byte order or
    the number of dimensions and still load, with wrong voxels. Here every value the
    reader uses must be well formed, and consistent with ``NDims``.
    """
    try:
        ndims = int(header["NDims"])
        dims = [int(v) for v in header["DimSize"].split()]
    except (KeyError, ValueError) as e:
        return f"NDims/DimSize missing or not integers ({e})"
    if not 1 <= ndims <= 4 or len(dims) != ndims or min(dims) < 1:
        return f"DimSize {header['DimSize']!r} does not hold NDims = {ndims} positive sizes"
    if header.get("ElementType") not in _ELEMENT_BYTES:
        return f"ElementType {header.get('ElementType')!r} is not one of {sorted(_ELEMENT_BYTES)}"
    for key in _BOOLEAN_KEYS:
        if key in header and header[key].lower() not in ("true", "false"):
            return f"{key} = {header[key]!r} is neither True nor False"
    for key, n in [*((k, ndims) for k in _VECTOR_KEYS), *((k, ndims**2) for k in _MATRIX_KEYS)]:
        if key in header:
            try:
                values = [float(v) for v in header[key].split()]
            except ValueError:
                values = []
            if len(values) != n or not np.isfinite(values).all():
                return f"{key} = {header[key]!r} is not {n} finite numbers"
    for key in ("ElementNumberOfChannels", "HeaderSize", "CompressedDataSize"):
        if key in header and not header[key].lstrip("-").isdigit():
            return f"{key} = {header[key]!r} is not an integer"
    return None


def data_file(mhd: Path, header: dict[str, str]) -> Path:
    """The data file a header names, beside it. The name must be relative and stay in the
    header's folder (no ``..``, checked on the name itself, not on the resolved path, so
    symlinked roots and folders keep working): a header naming ``/etc/passwd`` or
    ``../../x`` would read a file outside the dataset as a scan."""
    name = header.get("ElementDataFile")
    if not name or name == "LOCAL":
        raise InvalidCaseError(
            mhd.stem, mhd, "header has no ElementDataFile (LUNA16 headers name their .raw file)"
        )
    parts = PurePosixPath(name.replace("\\", "/")).parts
    if name.startswith(("/", "\\")) or ":" in name or ".." in parts or "LIST" in name.split():
        raise InvalidCaseError(
            mhd.stem,
            mhd,
            f"ElementDataFile = {name!r} is not a file name beside the header (an absolute "
            "path, a drive, '..' or a LIST of files); a LUNA16 header names its .raw file",
        )
    return mhd.parent / name


def check_data_size(uid: str, mhd: Path, header: dict[str, str], report: Report) -> bool:
    """Refuse a ``.raw`` whose size differs from what the header says (a truncated download).

    SimpleITK would read a short file without complaint and return partly wrong voxels.
    Compressed data (``CompressedData = True``, e.g. the lung masks' ``.zraw``) has no
    size to compare with and is left to the reader. Returns whether the sizes agree.
    """
    data = data_file(mhd, header)
    if problem := file_problem(data):
        if problem == "file is missing":
            problem = f"data file named by {mhd.name} does not exist"
        report.error(uid, data, problem)
        return False
    if problem := header_problem(header):
        report.error(uid, mhd, f"damaged MetaImage header: {problem}")
        return False
    if header.get("CompressedData", "False").lower() == "true":
        return True
    try:
        dims = [int(v) for v in header["DimSize"].split()]
        nbytes = _ELEMENT_BYTES[header["ElementType"]]
        channels = int(header.get("ElementNumberOfChannels", "1"))
        offset = int(header.get("HeaderSize", "0"))
        if not dims or min(dims) < 1 or channels < 1 or offset < 0:
            raise ValueError(f"DimSize {header['DimSize']!r}")
    except (KeyError, ValueError) as e:
        report.error(uid, mhd, f"header lacks a valid DimSize/ElementType ({e})")
        return False
    expected = math.prod(dims) * nbytes * channels + offset  # Python ints: no overflow
    size = data.stat().st_size
    if size != expected:
        what = "shorter" if size < expected else "longer"
        report.error(
            uid,
            data,
            f"{size} bytes, {what} than the {expected} that {mhd.name} declares "
            f"(DimSize {'x'.join(map(str, dims))} of {header['ElementType']}); "
            "truncated or mismatched download",
        )
        return False
    return True


def discover_scans(root: Path, report: Report | None = None) -> dict[str, LunaScan]:
    """Every scan under ``subset0..9`` (any subset may be absent), keyed by seriesuid.

    A seriesuid in two subsets, or a header that names no data file, is an error."""
    report = report or Report()
    if not root.is_dir():
        raise DatasetNotFoundError(f"LUNA16 root {root} does not exist. {LUNA16_HELP}")
    lungs_dir = root / "seg-lungs-LUNA16"
    scans: dict[str, LunaScan] = {}
    for k in range(N_SUBSETS):
        for mhd in sorted((root / f"subset{k}").glob("*.mhd")):
            uid = mhd.stem
            if uid in scans:
                report.error(uid, mhd, f"the same seriesuid is also in subset{scans[uid].subset}")
                continue
            try:
                data = data_file(mhd, read_header(mhd))
                lungs = lungs_dir / f"{uid}.mhd"
                lungs_data = data_file(lungs, read_header(lungs)) if lungs.exists() else None
            except InvalidCaseError as e:
                report.error(uid, e.path, e.problem)
                continue
            scans[uid] = LunaScan(uid, k, mhd, data, lungs if lungs_data else None, lungs_data)
    if not scans:
        raise DatasetNotFoundError(f"no subset0..subset9/*.mhd scans under {root}. {LUNA16_HELP}")
    return scans


# ---- CSV files ---------------------------------------------------------------------------


def prediction_scans(path: Path) -> list[LunaScan]:
    """The scans to predict in ``path`` (a ``.mhd`` scan, or a folder searched recursively
    for them; ``seg-lungs-LUNA16`` masks are skipped), each header checked (3D, one
    channel, a data file of the declared size) before anything runs, naming the file."""
    path = Path(path).expanduser()
    if path.is_file():
        files = [path]
    elif path.is_dir():
        files = sorted(p for p in path.rglob("*.mhd") if "seg-lungs-LUNA16" not in p.parts)
    else:
        raise DatasetNotFoundError(f"--input {path} does not exist")
    if not files:
        raise DatasetNotFoundError(f"--input {path}: no .mhd scans in it")
    scans: dict[str, LunaScan] = {}
    for mhd in files:
        if mhd.suffix != ".mhd":
            raise InvalidCaseError(mhd.stem, mhd, "not a MetaImage header (.mhd)")
        header = read_header(mhd)
        dims = header.get("NDims", "?")
        channels = header.get("ElementNumberOfChannels", "1")
        if dims != "3" or channels != "1":
            raise InvalidCaseError(
                mhd.stem,
                mhd,
                f"NDims {dims} with {channels} channel(s); the model takes single-channel 3D CT",
            )
        check_data_size(mhd.stem, mhd, header, Report())
        if mhd.stem in scans:
            raise InvalidCaseError(mhd.stem, mhd, f"the same seriesuid as {scans[mhd.stem].mhd}")
        scans[mhd.stem] = LunaScan(mhd.stem, -1, mhd, data_file(mhd, header))
    return list(scans.values())


def _empty_table(columns: Sequence[str]) -> pd.DataFrame:
    table = pd.DataFrame({c: pd.Series(dtype=float) for c in columns}).astype({"seriesuid": str})
    table["line"] = pd.Series(dtype=int)
    return table


def _refused(uids: pd.Series, numbers: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The rows each of :func:`read_table`'s row checks refuses, a mask per check: the
    same checks for the typed reading (any refusal sends the file to the checked
    reading) and for the checked one (which names each refused row)."""
    refused = {"empty seriesuid": (uids == "").to_numpy()}
    for c, values in numbers.items():
        refused[f"{c} not finite"] = ~np.isfinite(values)
    if "class" in numbers:
        refused["class not binary"] = ~np.isin(numbers["class"], (0, 1))
    if "diameter_mm" in numbers:
        diameter = numbers["diameter_mm"]
        # -1 marks "size unknown" in annotations_excluded.csv; other negatives are errors.
        refused["diameter negative"] = (diameter < 0) & (diameter != -1)
    return refused


def _frame(
    uids: pd.Series, numbers: dict[str, np.ndarray], keep: np.ndarray | None = None
) -> pd.DataFrame:
    """The table of the rows ``keep`` (all by default), with each row's 1-based CSV line.
    Columns gathered first and the frame built once from fresh arrays (no copy): adding
    750k-row columns one by one makes pandas consolidate (copy) the whole table each
    time."""
    data = {"seriesuid": uids, **numbers, "line": np.arange(len(uids)) + 2}
    table = pd.DataFrame(data, copy=False)
    if keep is not None and not keep.all():
        table = table[keep].reset_index(drop=True)
    if "class" in table:
        table["class"] = table["class"].astype(int)
    return table


def _typed_table(path: Path, columns: Sequence[str]) -> pd.DataFrame | None:
    """:func:`read_table`'s table when every row is valid, parsed straight to its types by
    pandas' C parser: reading strings and converting them afterwards took 1.1 s of a
    full start on candidates_V2's 755k rows. None when anything would need reporting (a
    header, a value or a row the checked reading names), so that the checked reading
    then reads the file and names it."""
    try:
        raw = pd.read_csv(
            path,
            dtype={c: str if c == "seriesuid" else np.float64 for c in columns},
            keep_default_na=False,
            skipinitialspace=True,
        )
    except (ValueError, pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError):
        return None
    if list(raw.columns) != list(columns):
        return None
    uids = raw["seriesuid"].str.strip()
    numbers = {c: raw[c].to_numpy(dtype=float) for c in columns[1:]}
    if any(mask.any() for mask in _refused(uids, numbers).values()):
        return None
    return _frame(uids, numbers)


def read_table(
    path: Path, columns: Sequence[str], required: bool = True, report: Report | None = None
) -> pd.DataFrame:
    """Read an official LUNA16 CSV, checking its schema and every row.

    Errors name the file and the 1-based line: missing or unexpected columns, an empty
    seriesuid, a coordinate or diameter that is not a finite number, a negative
    diameter, a class not 0/1. An optional file that does not exist yields an empty
    table; so does a file with a wrong header, and bad rows are left out, once reported
    to a collecting ``report`` (a strict one raises at the first). Submissions to score
    are read by the scorer's own reader, as the official script reads them
    (:func:`medlit.metrics.froc.read_csv`).
    """
    report = report or Report()
    if not path.is_file():
        if required:
            raise DatasetNotFoundError(f"{path} does not exist. {LUNA16_HELP}")
        return _empty_table(columns)
    if (table := _typed_table(path, columns)) is not None:
        return table
    try:
        raw = pd.read_csv(path, dtype=str, keep_default_na=False, skipinitialspace=True)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as e:
        report.error(path.name, path, f"unreadable CSV ({e})")
        return _empty_table(columns)
    found = [c.strip() for c in raw.columns]
    if found != list(columns):
        missing = [c for c in columns if c not in found]
        extra = [c for c in found if c not in columns]
        report.error(
            path.name,
            path,
            f"header {found} is not the official {list(columns)}"
            + (f"; missing {missing}" if missing else "")
            + (f"; unexpected {extra}" if extra else ""),
        )
        return _empty_table(columns)
    raw.columns = found
    uids = raw["seriesuid"].str.strip()
    numbers = {c: pd.to_numeric(raw[c], errors="coerce").to_numpy(dtype=float) for c in columns[1:]}
    refused = _refused(uids, numbers)
    good = np.ones(len(raw), bool)
    for i in np.flatnonzero(refused["empty seriesuid"]):
        report.error(path.name, path, f"line {i + 2}: empty seriesuid")
        good[i] = False
    for c in columns[1:]:
        for i in np.flatnonzero(refused[f"{c} not finite"]):
            report.error(
                uids.iloc[i], path, f"line {i + 2}: {c} = {raw[c].iloc[i]!r} is not a finite number"
            )
            good[i] = False
    if "class" in numbers:
        for i in np.flatnonzero(good & refused["class not binary"]):
            report.error(
                uids.iloc[i], path, f"line {i + 2}: class {raw['class'].iloc[i]!r} is not 0 or 1"
            )
            good[i] = False
    if "diameter_mm" in numbers:
        for i in np.flatnonzero(good & refused["diameter negative"]):
            report.error(
                uids.iloc[i],
                path,
                f"line {i + 2}: diameter_mm = {raw['diameter_mm'].iloc[i]!r} is negative",
            )
            good[i] = False
    return _frame(uids, numbers, good)


# ---- geometry ----------------------------------------------------------------------------


@dataclass(frozen=True)
class TablePoints:
    """A LUNA16 table's world points and radii as arrays, and its rows by scan (positions
    into the table), built once: pandas' per-scan sub-frames (a groupby's groups, a
    column selection on each) cost a take over the whole table's blocks per scan, which
    grew with scans × rows over a full release."""

    table: pd.DataFrame
    world: np.ndarray  # (N, 3) x, y, z mm
    radius: np.ndarray  # (N,) mm
    rows: dict[str, np.ndarray]  # seriesuid -> row positions

    @classmethod
    def of(cls, table: pd.DataFrame, size_column: str | None) -> TablePoints:
        world = table[["coordX", "coordY", "coordZ"]].to_numpy(dtype=float)
        if size_column:
            size = table[size_column].to_numpy(dtype=float)
            radius = np.where(size < 0, 10.0, size) / 2
        else:
            radius = np.zeros(len(table))
        rows = table.groupby("seriesuid", sort=False).indices if len(table) else {}
        return cls(table, world, radius, {k: np.asarray(v) for k, v in rows.items()})

    def of_scan(self, uid: str) -> np.ndarray:
        return self.rows.get(uid, np.zeros(0, dtype=np.intp))


def locate(
    points: TablePoints, rows: np.ndarray, meta: dict, path: Path, report: Report | None = None
) -> np.ndarray:
    """Rows ``rows`` (positions in ``points``' table) of one scan as voxel positions in its
    cached grid: (N, 4) = z, y, x, radius mm.

    A point outside the scan is an error naming the CSV file and line: it means the
    coordinates are in another convention (voxels, or another scan's frame).
    """
    report = report or Report()
    if not len(rows):
        return np.zeros((0, 4))
    geometry = Geometry.from_dict(meta["geometry"])
    world = points.world[rows]
    index = geometry.world_to_index(world)
    shape = np.asarray(meta["shape"])
    outside = ((index < -0.5) | (index > shape - 0.5)).any(1)
    for i in np.flatnonzero(outside):
        row = points.table.iloc[rows[i]]
        report.error(
            row["seriesuid"],
            path,
            f"line {int(row['line'])}: world point ({world[i, 0]:.1f}, {world[i, 1]:.1f}, "
            f"{world[i, 2]:.1f}) mm lies outside the scan (voxel z,y,x = "
            f"{np.round(index[i], 1).tolist()}, shape {shape.tolist()})",
        )
    return np.column_stack([index, points.radius[rows]])


# ---- preprocessing -----------------------------------------------------------------------


@dataclass(frozen=True)
class Preprocessing:
    """What the cached arrays depend on (part of the cache key).

    ``spacing`` (x, y, z mm) resamples every scan (linear for CT, nearest for masks);
    None keeps the native grid. Intensities are cached in HU (int16), so changing the
    window needs no rebuild.
    """

    spacing: tuple[float, float, float] | None = None
    version: int = 2  # bump when preprocessing changes what it stores


def _read_mhd(uid: str, mhd: Path, report: Report) -> sitk.Image | None:
    """Read a MetaImage after checking its data file's size against the header."""
    if not check_data_size(uid, mhd, read_header(mhd), report):
        return None
    try:
        return sitk.ReadImage(str(mhd))
    except RuntimeError as e:
        report.error(uid, mhd, f"SimpleITK cannot read it ({e})")
        return None


def check_scan(scan: LunaScan, report: Report) -> tuple[sitk.Image, sitk.Image | None] | None:
    """Every check of one scan; each problem goes to ``report``.

    Errors: a data file whose size differs from its header's (truncated download, or a
    header that lies), an unreadable file, not a single-channel 3D image, NaN/Inf
    voxels; a lung mask that is unreadable, of another size or geometry, or holds no
    lung label (3 or 4). Returns the scan and its lung mask (or None), or None after
    an error.
    """
    uid = scan.seriesuid
    start = report.count()
    image = _read_mhd(uid, scan.mhd, report)
    if image is not None:
        if image.GetDimension() != 3 or image.GetNumberOfComponentsPerPixel() != 1:
            report.error(
                uid,
                scan.mhd,
                f"not a single-channel 3D image ({image.GetDimension()}D, "
                f"{image.GetNumberOfComponentsPerPixel()} channels)",
            )
        else:
            array = sitk.GetArrayViewFromImage(image)
            if np.issubdtype(array.dtype, np.floating) and (
                bad := int((~np.isfinite(array)).sum())
            ):
                report.error(uid, scan.data, f"{bad} NaN/Inf voxels; CT values must be finite HU")
    lungs = None
    if scan.lungs is not None and (lungs := _read_mhd(uid, scan.lungs, report)) is not None:
        if image is not None and lungs.GetSize() != image.GetSize():
            report.error(
                uid, scan.lungs, f"size {lungs.GetSize()} differs from the scan's {image.GetSize()}"
            )
        elif image is not None and (problem := Geometry.of(image).mismatch(Geometry.of(lungs))):
            report.error(uid, scan.lungs, f"lung mask {problem}")
        else:
            values = np.unique(sitk.GetArrayViewFromImage(lungs))
            if not np.isin(values, (3, 4)).any():
                report.warning(
                    uid,
                    scan.lungs,
                    f"lung mask holds no lung label 3 or 4 (values {values.tolist()[:6]})",
                )
    if image is None or any(q.severity == "error" for q in report.problems[start:]):
        return None
    return image, lungs


def preprocess_scan(
    scan: LunaScan, prep: Preprocessing, report: Report | None = None
) -> tuple[dict[str, np.ndarray], dict]:
    """Check (``check_scan``) and decode one scan (and its lung mask), optionally
    resample, for the cache.

    Returns ``image`` (z, y, x) int16 HU and, when a mask exists, ``lungs`` (z, y, x)
    uint8 (1 = lung); ``meta`` holds the cached grid's geometry and the source's.
    """
    uid = scan.seriesuid
    checked = check_scan(scan, report or Report())
    if checked is None:  # only a collecting report gets here
        raise InvalidCaseError(uid, scan.mhd, "the scan has errors (listed)")
    image, lungs = checked
    source, source_size = Geometry.of(image), image.GetSize()
    image = sitk.Cast(sitk.Clamp(image, lowerBound=AIR_HU, upperBound=3071), sitk.sitkInt16)
    if prep.spacing is not None:
        image = resample(image, prep.spacing, sitk.sitkLinear, AIR_HU)
    arrays = {"image": sitk.GetArrayFromImage(image)}
    if lungs is not None:
        lungs = sitk.Cast(sitk.BinaryThreshold(lungs, 3, 4, 1, 0), sitk.sitkUInt8)
        if prep.spacing is not None:
            lungs = resample(lungs, prep.spacing, sitk.sitkNearestNeighbor, 0)
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


# ---- lung segmentation (target: lungs) ----------------------------------------------------

LUNG_LABELS = {"left_lung": 3, "right_lung": 4}  # seg-lungs-LUNA16 values; others: not lung
CANONICAL = "LPS"  # ITK's code of the identity direction (LUNA16's world frame)


@dataclass(frozen=True)
class LungPreprocessing:
    """What a lung-segmentation cache entry depends on (its cache key): the target
    ``spacing`` (x, y, z mm; None: each scan's own grid) and the HU window mapped to
    [0, 1]."""

    spacing: tuple[float, float, float] | None
    hu_window: tuple[float, float]
    version: int = 1  # bump when preprocess_lungs changes what it stores


def check_lung_scan(scan: LunaScan, report: Report) -> tuple[sitk.Image, sitk.Image | None] | None:
    """:func:`check_scan`, and a lung mask that exists and holds a lung: lung segmentation
    trains and scores on it."""
    start = report.count()
    checked = check_scan(scan, report)
    if scan.lungs is None:
        report.error(
            scan.seriesuid,
            scan.mhd,
            f"no lung mask seg-lungs-LUNA16/{scan.seriesuid}.mhd (data.target: lungs "
            "trains and scores on the masks)",
        )
    if checked is None or any(q.severity == "error" for q in report.problems[start:]):
        return None
    return checked


def lung_labels(mask: np.ndarray) -> np.ndarray:
    """seg-lungs-LUNA16 values as class indices: 1 the left lung (3), 2 the right (4), 0
    everything else (5, reported to be the airway, too)."""
    out = np.zeros(mask.shape, np.uint8)
    for k, value in enumerate(LUNG_LABELS.values(), 1):
        out[mask == value] = k
    return out


def preprocess_lungs(
    scan: LunaScan,
    prep: LungPreprocessing,
    report: Report | None = None,
    need_mask: bool = True,
) -> tuple[dict[str, np.ndarray], dict]:
    """One scan as a volume segmentation case (:func:`medlit.datasets.patches.cached_case`):
    ``image`` (1, z, y, x), the HU window mapped to [0, 1], resampled to ``prep.spacing``;
    ``seg`` the lungs as class indices (:func:`lung_labels`) on that grid, and on the
    scan's own grid as ``seg_native`` when resampled (scores are taken there). Both are
    turned to the identity direction first; ``meta``: that grid's geometry and shape and
    the scan's ``orientation``, where predictions are written back to."""
    from medlit.datasets.io.cases import cached_case

    uid = scan.seriesuid
    check = check_lung_scan if need_mask else check_scan
    checked = check(scan, report or Report())
    if checked is None:  # only a collecting report gets here
        raise InvalidCaseError(uid, scan.mhd, "the scan has errors (listed)")
    image, lungs = checked
    # Left and right are classes: the arrays are turned to the identity direction (LPS)
    # first, as MONAI's Orientation does, or a scan stored mirrored (some LUNA16 scans'
    # direction is -1 -1 1) shows each lung on the other's side. ``orientation`` turns a
    # prediction back to the scan's own axes (write_prediction).
    orientation = sitk.DICOMOrientImageFilter.GetOrientationFromDirectionCosines(
        image.GetDirection()
    )
    image = sitk.DICOMOrient(image, CANONICAL)
    geometry = Geometry.of(image)
    hu = sitk.GetArrayFromImage(image)
    meta = {
        "case_id": uid,
        "seriesuid": uid,
        "subset": scan.subset,
        "geometry": geometry.to_dict(),
        "orientation": orientation,
        "shape": list(hu.shape),
        "bbox": [[0, n] for n in hu.shape],
        "sources": [str(s) for s in scan.sources],
    }
    seg = None
    if lungs is not None:
        seg = lung_labels(sitk.GetArrayFromImage(sitk.DICOMOrient(lungs, CANONICAL)))
    target = list(reversed(prep.spacing)) if prep.spacing is not None else None
    return cached_case(window(hu, prep.hu_window)[None], seg, geometry.spacing_zyx, target, meta)


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


# ---- outputs -----------------------------------------------------------------------------


def write_submission(path: str | Path, marks: pd.DataFrame) -> None:
    """The official submission CSV ``seriesuid,coordX,coordY,coordZ,probability``,
    written to a temporary name and renamed."""
    table = marks[list(SUBMISSION_COLUMNS)]
    atomic_write(Path(path), lambda p: table.to_csv(p, index=False, float_format="%.6f"))


def write_scan_grid(array: np.ndarray, meta: dict, path: Path) -> Path:
    """A (z, y, x) array on the identity-direction grid the network saw, turned back to
    the scan's own axes and written as a compressed MetaImage."""
    image = Geometry.from_dict(meta["geometry"]).apply(sitk.GetImageFromArray(array))
    image = sitk.DICOMOrient(image, meta["orientation"])  # the scan's own axes
    write_image(image, path, compress=True)
    return path


def write_lungs(regions: np.ndarray, meta: dict, path: Path) -> Path:
    """Predicted lungs (regions (2, z, y, x): left, right) as a mask in the
    ``seg-lungs-LUNA16`` format (values 3 and 4) on the scan's own grid."""
    mask = np.zeros(regions.shape[1:], np.uint8)
    for region, value in zip(regions.astype(bool), LUNG_LABELS.values(), strict=True):
        mask[region] = value
    return write_scan_grid(mask, meta, path)
