"""BraTS layouts, case checks and preprocessing, on generated files in the official formats."""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from medlit.datamodules import BraTSDataModule, Split
from medlit.datasets.brats.source import (
    LAYOUTS,
    Preprocessing,
    detect_layout,
    discover_cases,
    label_targets,
    preprocess_case,
)
from medlit.datasets.io.volume import read_volume, write_volume
from medlit.errors import DatasetNotFoundError, InvalidCaseError
from tests.data.brats.data import make_brats


@pytest.mark.parametrize(
    ("year", "ext", "names"),
    [
        ("2020", ".nii", ("t1", "t1ce", "t2", "flair")),
        ("2021", ".nii.gz", ("t1", "t1ce", "t2", "flair")),
        ("2023", ".nii.gz", ("t1n", "t1c", "t2w", "t2f")),
    ],
)
def test_layouts_are_detected_from_file_names(
    tmp_path: Path, year: str, ext: str, names: tuple
) -> None:
    ids = make_brats(tmp_path, year, cases=2)
    layout = detect_layout(tmp_path)
    assert layout.year == year
    folder = tmp_path / ids[0]
    files = sorted(p.name for p in folder.iterdir())
    sep = "-" if year == "2023" else "_"
    assert files == sorted(f"{ids[0]}{sep}{n}{ext}" for n in (*names, "seg"))
    cases = discover_cases(tmp_path, layout, ("t1", "t1ce", "t2", "flair"))
    assert [c.case_id for c in cases] == ids
    # Each release's label convention: ET is 4 up to 2021, 3 in 2023.
    seg, _ = read_volume(cases[0].seg)
    assert set(np.unique(seg)) <= set(layout.labels)


def test_et_label_follows_the_year(tmp_path: Path) -> None:
    make_brats(tmp_path / "a", "2021", cases=3, seed=5)
    make_brats(tmp_path / "b", "2023", cases=3, seed=5)
    seg21, _ = read_volume(sorted((tmp_path / "a").glob("*/*_seg.nii.gz"))[0])
    seg23, _ = read_volume(sorted((tmp_path / "b").glob("*/*-seg.nii.gz"))[0])
    assert 4 in seg21 and 3 not in seg21
    assert 3 in seg23 and 4 not in seg23
    assert np.array_equal(seg21 == 4, seg23 == 3)  # same phantom, relabelled


def test_missing_root_says_where_brats_comes_from(tmp_path: Path) -> None:
    with pytest.raises(DatasetNotFoundError, match="synapse.*demo"):
        detect_layout(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetNotFoundError, match="no BraTS case folders"):
        detect_layout(tmp_path / "empty")


def test_preprocessing_crops_and_normalises_over_the_brain(brats_root: Path) -> None:
    case = discover_cases(brats_root, LAYOUTS["2021"], ("t1", "t1ce", "t2", "flair"))[0]
    arrays, meta = preprocess_case(case, Preprocessing())
    image, seg = arrays["image"], arrays["seg"]
    assert image.dtype == np.float16 and seg.dtype == np.uint8
    z0, z1 = meta["bbox"][0]
    assert image.shape[1:] == seg.shape == tuple(b - a for a, b in meta["bbox"])
    assert meta["shape"] == [16, 32, 32] and meta["geometry"]["spacing"] == [7.5] * 3
    brain = np.any(image != 0, axis=0)
    for c in range(4):  # z-score over the brain (non-zero) mask
        values = image[c][brain].astype(np.float64)
        assert abs(values.mean()) < 0.02 and abs(values.std() - 1) < 0.02
    raw, _ = read_volume(case.seg)
    assert (raw > 0).sum() == (seg > 0).sum()  # the crop keeps all of the tumour


def test_region_and_label_targets() -> None:
    seg = np.array([0, 1, 2, 4, 2, 1], np.uint8)
    regions = label_targets(seg, 4, "regions")
    assert regions.tolist() == [[0, 1, 1, 1, 1, 1], [0, 1, 0, 1, 0, 1], [0, 0, 0, 1, 0, 0]]
    classes = label_targets(seg, 4, "labels")
    assert classes.tolist() == [0, 1, 2, 3, 2, 1]
    # 2023: ET = 3, and a later label (4 = resection cavity) is in no region.
    seg23 = np.array([0, 1, 2, 3, 4], np.uint8)
    assert label_targets(seg23, 3, "regions")[0].tolist() == [0, 1, 1, 1, 0]


# ---- broken cases are refused before training, with the case and file named -------------


def _case_files(root: Path, case: str) -> dict[str, Path]:
    return {m: root / case / f"{case}_{m}.nii.gz" for m in ("t1", "t1ce", "t2", "flair", "seg")}


def _rewrite(path: Path, fn) -> None:
    image = sitk.ReadImage(str(path))
    out = fn(image)
    sitk.WriteImage(out, str(path), useCompression=True)


def _break_missing(f):
    f["t2"].unlink()
    return f["t2"], "missing"


def _break_shape(f):
    array, geom = read_volume(f["flair"])
    write_volume(array[:-1], geom, f["flair"])
    return f["flair"], "shape"


def _break_geometry(f):
    _rewrite(f["t1ce"], lambda im: (im.SetOrigin((5.0, -239.0, 0.0)), im)[1])
    return f["t1ce"], "origin"


def _break_spacing(f):
    _rewrite(f["t1"], lambda im: (im.SetSpacing((1.0, 1.0, 1.0)), im)[1])
    return f["t1"], "spacing"


def _break_label(f):
    array, geom = read_volume(f["seg"])
    array[array == 4] = 3
    write_volume(array, geom, f["seg"])
    return f["seg"], r"label values \[3\]"


def _break_nan(f):
    array, geom = read_volume(f["flair"])
    array = array.astype(np.float32)
    array[3, 10, 10] = np.nan
    write_volume(array, geom, f["flair"])
    return f["flair"], "NaN"


def _break_truncated(f):
    data = f["t1"].read_bytes()
    f["t1"].write_bytes(data[: len(data) - 40])  # the voxels may still decode; the stream is cut
    return f["t1"], "truncated gzip"


def _break_garbage(f):
    f["t2"].write_bytes(gzip.compress(b"not a nifti file" * 10))
    return f["t2"], "unreadable"


@pytest.mark.parametrize(
    "breaker",
    [
        _break_missing,
        _break_shape,
        _break_geometry,
        _break_spacing,
        _break_label,
        _break_nan,
        _break_truncated,
        _break_garbage,
    ],
)
def test_broken_case_is_refused_with_case_and_file(
    brats_root: Path, breaker, _private_cache: Path
) -> None:
    case = sorted(p.name for p in brats_root.iterdir() if p.is_dir())[2]
    path, what = breaker(_case_files(brats_root, case))
    dm = BraTSDataModule(root=str(brats_root), split=Split(val_fraction=0.25, test_fraction=0.25))
    with pytest.raises(InvalidCaseError, match=what) as info:
        dm.prepare_data()
    assert info.value.case == case and info.value.path == path
    assert case in str(info.value) and path.name in str(info.value)
    # Nothing half-written: no cache entry (and no temporary folder) for the broken case.
    assert not list(_private_cache.rglob(f"{case}-*")) and not list(_private_cache.rglob(".tmp*"))


def test_truncated_gzip_would_pass_simpleitk(brats_root: Path) -> None:
    """Why the gzip stream is checked: SimpleITK reads this truncated file without error."""
    path = next(brats_root.glob("*/*_t1.nii.gz"))
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 40])
    assert sitk.GetArrayFromImage(sitk.ReadImage(str(path))).shape == (16, 32, 32)


def test_unlabelled_cases_are_kept_for_prediction_only(tmp_path: Path) -> None:
    make_brats(tmp_path / "d", "2021", cases=6, seed=1)
    unlabelled = sorted((tmp_path / "d").glob("*/*_seg.nii.gz"))[0]
    unlabelled.unlink()
    dm = BraTSDataModule(root=str(tmp_path / "d"), split=Split(val_fraction=0.2, test_fraction=0.2))
    dm.prepare_data()
    case = unlabelled.parent.name
    assert all(case not in [c.case_id for c in dm.cases[s]] for s in ("train", "val", "test"))
    dm.setup("predict")
    ids = [dm.datasets["predict"][i]["case_id"] for i in range(len(dm.datasets["predict"]))]
    assert case in ids and "mask" not in dm.datasets["predict"][ids.index(case)]
