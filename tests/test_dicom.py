"""DICOM input and DICOM SEG output: series checked and mapped to channels, predicted as
their NIfTI would be, and the DICOM SEG equal to the NIfTI prediction at the same patient
positions (read back through highdicom's volume API)."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pydicom
import pytest
import SimpleITK as sitk
from scipy.spatial.transform import Rotation

from medlit.datamodules.brats import DICOM_SERIES
from medlit.datasets.io.dicom import cases_from_series, find_series, read_series, write_series
from medlit.errors import ConfigError, InvalidCaseError
from medlit.predict import main as predict
from tests.helpers.shared import Trained
from tests.test_fit import tiny

MISSING = "--data.root=/nonexistent/training-data"
# An oblique grid: rotated 20° about z and 10° about x, anisotropic, off-centre.
DIRECTION = tuple(Rotation.from_euler("zx", [20, 10], degrees=True).as_matrix().ravel())
DESCRIPTIONS = {"t1": "AX T1 PRE", "t1ce": "AX T1 POST GD", "t2": "t2_tse_tra", "flair": "T2 FLAIR"}


def oblique(image: sitk.Image) -> sitk.Image:
    image = sitk.Image(image)
    image.SetDirection(DIRECTION)
    image.SetOrigin((12.5, -30.25, 7.0))
    image.SetSpacing((0.9, 1.1, 2.5))
    return image


def world_index(image: sitk.Image) -> np.ndarray:
    """The 4 × 4 matrix from patient (LPS) mm to (x, y, z) voxel index."""
    m = np.eye(4)
    m[:3, :3] = np.array(image.GetDirection()).reshape(3, 3) * np.array(image.GetSpacing())
    m[:3, 3] = image.GetOrigin()
    return np.linalg.inv(m)


def test_the_default_rule_maps_common_series_descriptions_to_brats_modalities() -> None:
    import re

    seen = {
        "T1": "t1",
        "t1_mprage_sag": "t1",
        "AX T1 PRE": "t1",
        "T1 POST GD": "t1ce",
        "t1_mprage_gd": "t1ce",
        "T1C": "t1ce",
        "T1+C": "t1ce",
        "T2": "t2",
        "t2_tse_tra": "t2",
        "FLAIR": "flair",
        "AX T2 FLAIR": "flair",
        "T1 FLAIR": "flair",
    }
    for description, modality in seen.items():
        hits = [m for m, rule in DICOM_SERIES.items() if re.search(rule, description, re.I)]
        assert hits == [modality], (description, hits)
    assert not [m for m, r in DICOM_SERIES.items() if re.search(r, "T2* GRE", re.I)]


@pytest.mark.slow
def test_a_brats_study_in_dicom_predicts_as_its_nifti_and_its_dicom_seg_reads_back(
    brats_unet: Trained, tracking_uri: str, tmp_path: Path
) -> None:
    import highdicom as hd

    base = [*tiny(brats_unet.root, tracking_uri), MISSING]
    case = next(p for p in sorted(brats_unet.root.iterdir()) if p.name.startswith("BraTS"))
    nifti, dicom = tmp_path / "nifti" / case.name, tmp_path / "dicom"
    nifti.mkdir(parents=True)
    study = pydicom.uid.generate_uid()
    frame = pydicom.uid.generate_uid()
    for n, (modality, description) in enumerate(DESCRIPTIONS.items(), start=1):
        image = oblique(sitk.ReadImage(str(case / f"{case.name}_{modality}.nii.gz")))
        sitk.WriteImage(image, str(nifti / f"{case.name}_{modality}.nii.gz"))
        write_series(
            image,
            dicom / description.replace(" ", "_"),
            modality="MR",
            description=description,
            study_uid=study,
            series_number=n,
            frame_of_reference=frame,
        )
    [from_nifti] = predict(
        [*base, f"--ckpt_path={brats_unet.ckpt}", f"--input={nifti}", f"--output={tmp_path / 'a'}"]
    )
    written = predict(
        [*base, f"--ckpt_path={brats_unet.ckpt}", f"--input={dicom}", f"--output={tmp_path / 'b'}"]
    )
    label_file = tmp_path / "b" / f"{study}.nii.gz"
    seg_file = tmp_path / "b" / f"{study}_seg.dcm"
    assert sorted(written) == sorted([label_file, seg_file])
    a, b = sitk.ReadImage(str(from_nifti)), sitk.ReadImage(str(label_file))
    # the DICOM series' geometry is the NIfTI's (the oblique grid), and so is the prediction
    assert b.GetSize() == a.GetSize()
    assert np.allclose(b.GetOrigin(), a.GetOrigin(), atol=1e-3)
    assert np.allclose(b.GetSpacing(), a.GetSpacing(), atol=1e-4)
    assert np.allclose(b.GetDirection(), DIRECTION, atol=1e-5)
    labels = sitk.GetArrayFromImage(b)
    # int16 DICOM pixels round the intensities (to 1/30000 of their range)
    assert np.mean(sitk.GetArrayFromImage(a) == labels) >= 0.999
    assert set(np.unique(labels)) <= {0, 1, 2, 4} and (labels > 0).sum() > 50

    seg = hd.seg.segread(seg_file)
    assert seg.SeriesDescription.startswith("medlit segmentation of")
    [t1] = [s for s in find_series(dicom) if s.description == "AX T1 PRE"]
    assert seg.ReferencedSeriesSequence[0].SeriesInstanceUID == t1.uid
    names = {s.segment_number: s.segment_label for s in seg.SegmentSequence}
    value_of = {"necrotic": 1, "peritumoral": 2, "enhancing": 4}
    values = {n: next(v for k, v in value_of.items() if k in lab) for n, lab in names.items()}
    assert set(values.values()) == set(np.unique(labels)) - {0}
    categories = {
        str(s.SegmentedPropertyTypeCodeSequence[0].CodeMeaning) for s in seg.SegmentSequence
    }
    assert categories <= {"Necrosis", "Edema", "Neoplasm"}
    # Voxel for voxel at the same patient positions: every SEG voxel's position is a voxel
    # of the NIfTI prediction, with the same label; and the NIfTI has no label elsewhere.
    volume = seg.get_volume(combine_segments=True, relabel=False)
    arr = volume.array  # (slices, rows, columns) on the SEG's own affine (LPS)
    k, r, c = np.meshgrid(*(np.arange(s) for s in arr.shape), indexing="ij")
    world = volume.affine @ np.stack([k.ravel(), r.ravel(), c.ravel(), np.ones(k.size)])
    index = world_index(b) @ world
    assert np.abs(index - np.round(index)).max() < 1e-3
    x, y, z = np.round(index[:3]).astype(int)
    seg_values = np.vectorize(lambda n: values.get(int(n), 0))(arr.ravel())
    assert np.array_equal(labels[z, y, x], seg_values)
    assert (labels > 0).sum() == (seg_values > 0).sum()


def test_dicom_series_are_checked_and_their_problems_named(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    image = oblique(sitk.GetImageFromArray(rng.normal(size=(6, 8, 10)).astype(np.float32)))
    good = write_series(image, tmp_path / "good", modality="CT", description="chest")
    [series] = find_series(tmp_path / "good")
    back = read_series(series)
    assert np.allclose(back.GetDirection(), DIRECTION, atol=1e-5)
    assert np.abs(sitk.GetArrayFromImage(back) - sitk.GetArrayFromImage(image)).max() < 1e-3

    def broken(name: str, change) -> Path:
        folder = tmp_path / name
        shutil.copytree(tmp_path / "good", folder)
        change([folder / f.name for f in good])
        return folder

    def edit(path: Path, **tags) -> None:
        ds = pydicom.dcmread(path)
        for tag, value in tags.items():
            if value is None:
                delattr(ds, tag)
            else:
                setattr(ds, tag, value)
        ds.save_as(path)

    def shifted(path: Path, mm: float) -> list[str]:
        ds = pydicom.dcmread(path)
        normal = np.array(DIRECTION).reshape(3, 3)[:, 2]
        return [f"{v:.6f}" for v in np.array(ds.ImagePositionPatient, float) + mm * normal]

    cases = {
        "missing slice": broken("missing", lambda fs: fs[3].unlink()),
        "duplicated slice": broken(
            "dup", lambda fs: shutil.copy(fs[2], fs[2].with_name("copy.dcm"))
        ),
        "no ImageOrientationPatient": broken(
            "orient", lambda fs: edit(fs[1], ImageOrientationPatient=None)
        ),
        "uneven slice spacing": broken(
            "uneven", lambda fs: edit(fs[3], ImagePositionPatient=shifted(fs[3], 0.6))
        ),
        "mixed slice sizes": broken("sizes", lambda fs: edit(fs[4], PixelSpacing=["0.5", "0.5"])),
    }
    for problem, folder in cases.items():
        with pytest.raises(InvalidCaseError, match=problem) as e:
            find_series(folder)
        assert folder.name in str(e.value)
    # one CT channel: every series is its own case, named by its SeriesInstanceUID
    write_series(image, tmp_path / "other", modality="CT", description="chest 2")
    both = find_series(tmp_path / "good") + find_series(tmp_path / "other")
    assert sorted(cases_from_series(both, {"CT": None})) == sorted(s.uid for s in both)
    # several channels: by SeriesDescription within a study
    study = pydicom.uid.generate_uid()
    two = tmp_path / "study"
    for d in ("T2 TSE", "T2 FLAIR", "T2 FLAIR repeat"):
        write_series(image, two / d.replace(" ", "_"), description=d, study_uid=study)
    series = find_series(two)
    with pytest.raises(InvalidCaseError, match="channel flair: several series match"):
        cases_from_series(series, {"t2": DICOM_SERIES["t2"], "flair": DICOM_SERIES["flair"]})
    with pytest.raises(InvalidCaseError, match="channel t1 is missing.*'T2 TSE'"):
        cases_from_series(series, {"t1": DICOM_SERIES["t1"], "t2": DICOM_SERIES["t2"]})
    [(case, chosen)] = cases_from_series(
        series, {"t2": DICOM_SERIES["t2"], "flair": r"flair$"}
    ).items()
    assert case == study and chosen["flair"].description == "T2 FLAIR"
    with pytest.raises(ConfigError, match="needs a SeriesDescription pattern"):
        cases_from_series(series, {"t2": None, "flair": "flair"})
