"""DICOM in and out: CT and MR series read as volumes for prediction, segmentations
written as DICOM SEG that reference their source series.

Reading (``medlit.predict --input DIR``): every file under ``DIR`` with DICOM's preamble is
read (headers only, pydicom), grouped by SeriesInstanceUID, and each CT or MR image series
(localizers skipped) is checked before anything runs: every slice has
ImagePositionPatient, ImageOrientationPatient and PixelSpacing; one orientation, one
matrix size and pixel spacing; one slice per position along the slice normal (no
duplicates); slices stacked along the normal (no gantry tilt); even slice spacing (a gap
of more than 1.5 × the median is named as missing slices). The voxels are then read by
SimpleITK's GDCM series reader in that order (RescaleSlope/Intercept applied), so the
geometry is the header's: origin = the first slice's ImagePositionPatient, directions =
ImageOrientationPatient's rows and columns and the slice normal, spacing = PixelSpacing
and the slices' distance.

Series become cases by a stated rule (:func:`cases_from_series`). A model of one channel
whose rule matches any series predicts every series as its own case (named by its
SeriesInstanceUID, as LUNA16 names scans). Otherwise each study (StudyInstanceUID) is a
case and each channel takes the one series of the study whose SeriesDescription matches
the channel's regular expression (searched, case-insensitive); a channel matched by no
series or by several, or a series matched by several channels, is refused naming them.
The channels of a case must lie on one grid (BraTS: co-registered).

Writing (:func:`write_seg`): a label map on a series' grid becomes a DICOM SEG (highdicom;
binary segments, one per label value, empty frames omitted) that references the series,
with each segment's label and coded category and type. :func:`write_series` writes a volume
as a CT or MR series (pydicom), for tests and demos.

Written here rather than through a converter (dcm2niix, dicom2nifti): those write NIfTI
files and drop the per-slice headers that the checks and the DICOM SEG need.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
import SimpleITK as sitk

from medlit.errors import ConfigError, DatasetNotFoundError, InvalidCaseError

IMAGE_MODALITIES = ("CT", "MR")
# Endings of the other inputs medlit reads, never DICOM files.
NOT_DICOM = frozenset(
    {".gz", ".nii", ".mhd", ".raw", ".zraw", ".nrrd", ".mha", ".jpg", ".jpeg", ".png", ".csv"}
)
# Coded concepts of a segment whose label has none in the table: SNOMED CT "Tissue".
GENERIC_CODES = {"category": "Tissue", "type": "Tissue"}


@dataclass(frozen=True)
class DicomSettings:
    """How DICOM input maps to a model's channels, and how its segments are coded.

    Args:
        series: channel name -> regular expression searched (case-insensitive) in each
            series' SeriesDescription; overrides the data module's default rule for that
            channel (``medlit.predict --series CHANNEL=REGEX`` overrides both).
        codes: label value or name -> ``{"category": CODE, "type": CODE}`` for the DICOM
            SEG's segments, where CODE is a SNOMED CT keyword of pydicom's code
            dictionary (``Neoplasm``, ``Lung``) or ``[value, scheme, meaning]``; labels not
            listed take the data module's codes, else SNOMED CT Tissue.
    """

    series: dict[str, str] = field(default_factory=dict)
    codes: dict[str, dict[str, Any]] = field(default_factory=dict)


@dataclass
class Series:
    """One DICOM image series, its files sorted along the slice normal."""

    uid: str
    study: str
    description: str
    modality: str
    files: list[Path]
    headers: list[Any]  # pydicom Datasets without pixel data, in ``files`` order
    folder: Path

    @property
    def label(self) -> str:
        return f"series {self.description or '(no description)'!r} ({self.uid}, {self.folder})"


def is_dicom(path: Path) -> bool:
    """Whether ``path`` is a DICOM file or a folder holding one (searched recursively)."""
    if path.is_file():
        return _has_preamble(path)
    if not path.is_dir():
        return False
    # Files of the other input formats are not opened (a folder of 25,000 ISIC images).
    return any(
        _has_preamble(f)
        for f in path.rglob("*")
        if f.suffix.lower() not in NOT_DICOM and f.is_file()
    )


def _has_preamble(path: Path) -> bool:
    try:
        with path.open("rb") as f:
            return f.read(132)[128:] == b"DICM"
    except OSError:
        return False


def _pydicom() -> Any:
    try:
        import pydicom
    except ImportError:
        raise ConfigError("DICOM input needs pydicom: pip install 'medlit[dicom]'") from None
    return pydicom


def find_series(path: Path) -> list[Series]:
    """Every CT or MR image series under ``path``, checked (see the module's docstring);
    the first problem found in a series is raised, naming its files."""
    pydicom = _pydicom()

    files = [path] if path.is_file() else sorted(f for f in path.rglob("*") if f.is_file())
    groups: dict[str, list[tuple[Path, Any]]] = {}
    for f in files:
        if not _has_preamble(f):
            continue
        try:
            ds = pydicom.dcmread(f, stop_before_pixels=True)
        except Exception as e:  # pydicom raises many kinds on a damaged file
            raise InvalidCaseError(f.parent.name, f, f"not a readable DICOM file ({e})") from None
        if ds.get("Modality") not in IMAGE_MODALITIES or "LOCALIZER" in ds.get("ImageType", []):
            continue  # SEG, SR, presentation states, scouts: not volumes to predict on
        if "SeriesInstanceUID" not in ds:
            raise InvalidCaseError(f.parent.name, f, "no SeriesInstanceUID")
        groups.setdefault(str(ds.SeriesInstanceUID), []).append((f, ds))
    if not groups:
        raise DatasetNotFoundError(f"--input {path}: no CT or MR DICOM image series in it")
    return [_checked(uid, members) for uid, members in sorted(groups.items())]


def _checked(uid: str, members: list[tuple[Path, Any]]) -> Series:
    first_file, first = members[0]
    folder = first_file.parent
    name = str(first.get("SeriesDescription", ""))

    def fail(f: Path, problem: str) -> InvalidCaseError:
        return InvalidCaseError(uid, f, f"DICOM series {name!r}: {problem}")

    for f, ds in members:
        for tag in ("ImagePositionPatient", "ImageOrientationPatient", "PixelSpacing"):
            if tag not in ds:
                raise fail(f, f"no {tag}; its slices cannot be placed in patient space")
        if int(ds.get("NumberOfFrames", 1) or 1) > 1:
            raise fail(f, "a multi-frame (enhanced) image; give the series as single frames")
    orientation = np.array(first.ImageOrientationPatient, float)
    size = (int(first.Rows), int(first.Columns))
    spacing = np.array(first.PixelSpacing, float)
    for f, ds in members[1:]:
        if not np.allclose(np.array(ds.ImageOrientationPatient, float), orientation, atol=1e-4):
            raise fail(f, f"mixed orientations in one series ({first_file.name} and {f.name})")
        if (int(ds.Rows), int(ds.Columns)) != size or not np.allclose(
            np.array(ds.PixelSpacing, float), spacing, rtol=1e-4
        ):
            raise fail(f, f"mixed slice sizes or pixel spacings ({first_file.name}: {size})")
    if len(members) < 2:
        raise fail(first_file, "a single slice; the model takes a 3D series")
    row, col = orientation[:3], orientation[3:]
    normal = np.cross(row, col)
    positions = np.array([np.array(ds.ImagePositionPatient, float) for _, ds in members])
    order = np.argsort(positions @ normal, kind="stable")
    members = [members[i] for i in order]
    positions = positions[order]
    along = positions @ normal
    steps = np.diff(along)
    step = float(np.median(steps))
    for i, d in enumerate(steps):
        a, b = members[i][0].name, members[i + 1][0].name
        if d < max(1e-3, 1e-3 * step):
            raise fail(members[i + 1][0], f"duplicated slice: {a} and {b} at {along[i]:.3f} mm")
    offsets = positions - positions[0] - np.outer(along - along[0], normal)
    if np.abs(offsets).max() > max(1e-2, 0.01 * spacing.min()):
        raise fail(first_file, "slices are not stacked along the slice normal (gantry tilt?)")
    for i, d in enumerate(steps):
        a, b = members[i][0].name, members[i + 1][0].name
        if d > 1.5 * step:
            raise fail(
                members[i + 1][0],
                f"missing slice(s) between {a} and {b}: {d:.3f} mm apart, the series' "
                f"spacing is {step:.3f} mm",
            )
        if abs(d - step) > max(1e-3, 0.01 * step):
            raise fail(
                members[i + 1][0],
                f"uneven slice spacing: {a} to {b} is {d:.3f} mm, the series' median {step:.3f} mm",
            )
    return Series(
        uid,
        str(first.get("StudyInstanceUID", "")),
        name,
        str(first.Modality),
        [f for f, _ in members],
        [ds for _, ds in members],
        folder,
    )


def read_series(series: Series) -> sitk.Image:
    """The series' voxels (rescaled) on its header's geometry, slices along the normal."""
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames([str(f) for f in series.files])
    try:
        image = reader.Execute()
    except RuntimeError as e:
        raise InvalidCaseError(
            series.uid, series.folder, f"SimpleITK cannot read it ({e})"
        ) from None
    if image.GetPixelID() == sitk.sitkFloat64:  # rescaled values: float32 holds them
        image = sitk.Cast(image, sitk.sitkFloat32)
    return image


def override_rules(rules: dict[str, str | None], items: list[str]) -> dict[str, str | None]:
    """``rules`` with the command line's ``CHANNEL=REGEX`` items (``--series``) applied."""
    rules = dict(rules)
    for item in items:
        channel, sep, regex = item.partition("=")
        if not sep or channel not in rules:
            raise ConfigError(
                f"--series {item}: give CHANNEL=REGEX, CHANNEL one of {', '.join(rules)}"
            )
        rules[channel] = regex
    return rules


def case_id(uid: str) -> str:
    """A file name for a case named by a DICOM UID (digits and dots are kept)."""
    return re.sub(r"[^0-9A-Za-z._-]", "_", uid)


def cases_from_series(
    series: list[Series], rules: dict[str, str | None]
) -> dict[str, dict[str, Series]]:
    """Case id -> channel -> series, by the rule of the module's docstring. ``rules``:
    each channel, in the model's order, and its SeriesDescription regex (None: any
    series, which only a one-channel model may leave)."""
    channels = list(rules)
    if len(channels) == 1 and not rules[channels[0]]:
        return {case_id(s.uid): {channels[0]: s} for s in series}
    if missing := [c for c, r in rules.items() if not r]:
        raise ConfigError(
            f"DICOM input for {len(channels)} channels needs a SeriesDescription pattern for "
            f"each; none for {missing}: set data.dicom.series or --series CHANNEL=REGEX"
        )
    patterns = {c: re.compile(str(r), re.IGNORECASE) for c, r in rules.items()}
    studies: dict[str, list[Series]] = {}
    for s in series:
        studies.setdefault(s.study, []).append(s)
    cases: dict[str, dict[str, Series]] = {}
    for study, members in sorted(studies.items()):
        chosen: dict[str, Series] = {}
        for c, pattern in patterns.items():
            hits = [s for s in members if pattern.search(s.description)]
            if not hits:
                found = "; ".join(repr(s.description) for s in members)
                raise InvalidCaseError(
                    case_id(study),
                    members[0].folder,
                    f"channel {c} is missing: no series' description matches "
                    f"{pattern.pattern!r} (the study's series: {found})",
                )
            if len(hits) > 1:
                raise InvalidCaseError(
                    case_id(study),
                    hits[0].folder,
                    f"channel {c}: several series match {pattern.pattern!r}: "
                    f"{'; '.join(h.label for h in hits)}; give a narrower --series {c}=REGEX",
                )
            chosen[c] = hits[0]
        twice = {s.uid for s in chosen.values() if list(chosen.values()).count(s) > 1}
        if twice:
            names = [c for c, s in chosen.items() if s.uid in twice]
            raise InvalidCaseError(
                case_id(study),
                chosen[names[0]].folder,
                f"channels {names} all match {chosen[names[0]].label}; make their patterns "
                "exclusive",
            )
        cases[case_id(study)] = chosen
    return cases


def same_grid(a: sitk.Image, b: sitk.Image) -> bool:
    return (
        a.GetSize() == b.GetSize()
        and np.allclose(a.GetSpacing(), b.GetSpacing(), rtol=1e-4)
        and np.allclose(a.GetOrigin(), b.GetOrigin(), atol=1e-3)
        and np.allclose(a.GetDirection(), b.GetDirection(), atol=1e-4)
    )


def stage_cases(
    cases: dict[str, dict[str, Series]], folder: Path, suffix: str = ".nii.gz"
) -> dict[str, list[Path]]:
    """Read each case's series and write them as image files (``suffix``) in ``folder``:
    case id -> one file per channel, in the rules' order. A case whose channels are not
    on one grid is refused, naming the series."""
    staged: dict[str, list[Path]] = {}
    for cid, channels in cases.items():
        images = {c: read_series(s) for c, s in channels.items()}
        (c0, i0), *rest = images.items()
        for c, image in rest:
            if not same_grid(i0, image):
                raise InvalidCaseError(
                    cid,
                    channels[c].folder,
                    f"{channels[c].label} ({c}) is not on the grid of {channels[c0].label} "
                    f"({c0}): size {image.GetSize()} vs {i0.GetSize()}, spacing "
                    f"{np.round(image.GetSpacing(), 3)} vs {np.round(i0.GetSpacing(), 3)}; the "
                    "model's channels must be co-registered (resample them onto one grid first)",
                )
        paths = []
        for k, image in enumerate(images.values()):
            name = f"{cid}{suffix}" if len(images) == 1 else f"{cid}_{k:04d}{suffix}"
            sitk.WriteImage(image, str(path := folder / name))
            paths.append(path)
        staged[cid] = paths
    return staged


# ---- DICOM SEG ---------------------------------------------------------------------------


def code(value: Any) -> Any:
    """A coded concept from a SNOMED CT keyword of pydicom's dictionary or a
    ``[value, scheme, meaning]`` triple."""
    from pydicom.sr.codedict import codes
    from pydicom.sr.coding import Code

    if isinstance(value, str):
        try:
            return getattr(codes.SCT, value)
        except AttributeError:
            raise ConfigError(
                f"data.dicom.codes: {value!r} is not a SNOMED CT keyword of pydicom's code "
                "dictionary; give [value, scheme, meaning]"
            ) from None
    if isinstance(value, list | tuple) and len(value) == 3:
        return Code(*(str(v) for v in value))
    raise ConfigError(f"data.dicom.codes: {value!r}: give a keyword or [value, scheme, meaning]")


def segment_entries(
    names: dict[int, str], table: dict[str, dict[str, Any]], defaults: dict[int, dict[str, Any]]
) -> dict[int, dict[str, Any]]:
    """Label value -> its ``{"category", "type"}`` entry: the config's table (by value or
    name), then the data module's defaults, then SNOMED CT Tissue."""
    out = {}
    for value, name in names.items():
        entry = table.get(str(value)) or table.get(name) or defaults.get(value) or GENERIC_CODES
        if not {"category", "type"} <= set(entry):
            raise ConfigError(f"data.dicom.codes[{name!r}]: give both 'category' and 'type'")
        out[value] = dict(entry)
    return out


def segment_codes(
    names: dict[int, str], table: dict[str, dict[str, Any]], defaults: dict[int, dict[str, Any]]
) -> dict[int, tuple[Any, Any]]:
    """Label value -> (category, type) coded concepts (:func:`segment_entries`)."""
    return {
        value: (code(entry["category"]), code(entry["type"]))
        for value, entry in segment_entries(names, table, defaults).items()
    }


def write_seg(
    labels: sitk.Image,
    series: Series,
    names: dict[int, str],
    codes: dict[int, tuple[Any, Any]],
    path: Path,
    further: list[Series] | None = None,
    software: str = "medlit",
) -> Path:
    """Write the label map ``labels`` (on ``series``' grid, as :func:`read_series` gives it)
    as a DICOM SEG referencing ``series`` (and ``further`` series as further sources): one
    binary segment per value of ``names`` that is present, empty frames omitted."""
    try:
        import highdicom as hd
    except ImportError:
        raise ConfigError("DICOM SEG output needs highdicom: pip install 'medlit[dicom]'") from None
    from pydicom.sr.codedict import codes as dcm

    from medlit.datasets.io.files import atomic_write

    image = read_series_grid(series)
    if not same_grid(labels, image):
        raise ConfigError(
            f"{path.name}: the segmentation is not on the grid of {series.label}; it "
            "cannot reference it"
        )
    array = sitk.GetArrayFromImage(labels)  # (slices, rows, columns), slices in file order
    present = [v for v in sorted(names) if (array == v).any()]
    if not present:  # a SEG needs a segment: an empty prediction writes the first label empty
        present = sorted(names)[:1]
    algorithm = hd.AlgorithmIdentificationSequence(
        name="medlit", version=software, family=dcm.cid7162.ArtificialIntelligence
    )
    segments = [
        hd.seg.SegmentDescription(
            segment_number=i,
            segment_label=names[v][:64],
            segmented_property_category=codes[v][0],
            segmented_property_type=codes[v][1],
            algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
            algorithm_identification=algorithm,
        )
        for i, v in enumerate(present, start=1)
    ]
    stacked = np.stack([array == v for v in present], axis=-1).astype(np.uint8)
    seg = hd.seg.Segmentation(
        source_images=series.headers,
        pixel_array=stacked,
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=segments,
        series_instance_uid=hd.UID(),
        series_number=int(series.headers[0].get("SeriesNumber", 0) or 0) + 1000,
        sop_instance_uid=hd.UID(),
        instance_number=1,
        manufacturer="medlit",
        manufacturer_model_name="medlit",
        software_versions=software,
        device_serial_number="none",
        series_description=f"medlit segmentation of {series.description}"[:64],
        further_source_images=[h for s in further or () for h in s.headers] or None,
        omit_empty_frames=True,
    )
    atomic_write(path, lambda p: seg.save_as(p))
    return path


def read_series_grid(series: Series) -> sitk.Image:
    """An empty image on the series' grid, from its headers alone (no pixel data read)."""
    first, last = series.headers[0], series.headers[-1]
    orientation = np.array(first.ImageOrientationPatient, float)
    row, col = orientation[:3], orientation[3:]
    normal = np.cross(row, col)
    p0 = np.array(first.ImagePositionPatient, float)
    n = len(series.headers)
    dz = float((np.array(last.ImagePositionPatient, float) - p0) @ normal) / (n - 1)
    dy, dx = (float(v) for v in first.PixelSpacing)  # DICOM: row spacing, then column
    image = sitk.Image(int(first.Columns), int(first.Rows), n, sitk.sitkUInt8)
    image.SetOrigin(tuple(p0))
    image.SetSpacing((dx, dy, dz))
    image.SetDirection(tuple(np.stack([row, col, normal], axis=1).ravel()))
    return image


# ---- writing a series (tests, demos) -------------------------------------------------------


def write_series(
    image: sitk.Image,
    folder: Path,
    *,
    modality: str = "MR",
    description: str = "",
    study_uid: str | None = None,
    patient_id: str = "medlit-demo",
    series_number: int = 1,
    frame_of_reference: str | None = None,
) -> list[Path]:
    """Write a 3D image as a DICOM CT or MR series (one file per slice, int16 with a
    rescale slope and intercept that keep the values to 1/1000 of their range), on the
    image's geometry. Returns the files, in slice order."""
    import pydicom
    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.uid import (
        PYDICOM_IMPLEMENTATION_UID,
        CTImageStorage,
        ExplicitVRLittleEndian,
        MRImageStorage,
        generate_uid,
    )

    if modality not in IMAGE_MODALITIES:
        raise ConfigError(f"write_series: modality {modality!r} is not one of {IMAGE_MODALITIES}")
    folder.mkdir(parents=True, exist_ok=True)
    array = sitk.GetArrayFromImage(image).astype(np.float64)  # (z, y, x)
    lo, hi = float(array.min()), float(array.max())
    slope = max(hi - lo, 1e-6) / 30000.0
    stored = np.round((array - lo) / slope).astype(np.int16)
    direction = np.array(image.GetDirection(), float).reshape(3, 3)
    row, col = direction[:, 0], direction[:, 1]
    sx, sy, _ = image.GetSpacing()
    study_uid = study_uid or generate_uid()
    series_uid = generate_uid()
    frame_of_reference = frame_of_reference or generate_uid()
    sop_class = CTImageStorage if modality == "CT" else MRImageStorage
    now = datetime(2026, 1, 1)
    files = []
    for k in range(array.shape[0]):
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = sop_class
        meta.MediaStorageSOPInstanceUID = generate_uid()
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
        path = folder / f"{series_number:03d}_{k:04d}.dcm"
        ds = FileDataset(str(path), {}, file_meta=meta, preamble=b"\0" * 128)
        ds.SOPClassUID, ds.SOPInstanceUID = sop_class, meta.MediaStorageSOPInstanceUID
        ds.StudyInstanceUID, ds.SeriesInstanceUID = study_uid, series_uid
        ds.FrameOfReferenceUID = frame_of_reference
        ds.Modality, ds.SeriesDescription, ds.SeriesNumber = modality, description, series_number
        ds.PatientID, ds.PatientName = patient_id, f"{patient_id}^"
        ds.PatientBirthDate, ds.PatientSex = "", "O"
        ds.StudyDate = ds.SeriesDate = ds.ContentDate = now.strftime("%Y%m%d")
        ds.StudyTime = ds.SeriesTime = ds.ContentTime = now.strftime("%H%M%S")
        ds.StudyID, ds.AccessionNumber, ds.ReferringPhysicianName = "1", "", ""
        ds.Manufacturer = "medlit"
        ds.InstanceNumber = k + 1
        ds.ImageType = ["DERIVED", "SECONDARY", "AXIAL"]
        ds.ImagePositionPatient = [
            f"{v:.6f}" for v in image.TransformIndexToPhysicalPoint((0, 0, k))
        ]
        ds.ImageOrientationPatient = [f"{v:.6f}" for v in (*row, *col)]
        ds.PixelSpacing = [f"{sy:.6f}", f"{sx:.6f}"]
        ds.SliceThickness = f"{image.GetSpacing()[2]:.6f}"
        ds.Rows, ds.Columns = stored.shape[1], stored.shape[2]
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
        ds.RescaleIntercept, ds.RescaleSlope = f"{lo:.6f}", f"{slope:.9f}"
        if modality == "CT":
            ds.RescaleType = "HU"
            ds.KVP = ""
        else:
            ds.ScanningSequence, ds.SequenceVariant, ds.ScanOptions = "SE", "NONE", ""
            ds.MRAcquisitionType = "3D"
        ds.PixelData = stored[k].tobytes()
        pydicom.dcmwrite(path, ds, enforce_file_format=True)
        files.append(path)
    return files
