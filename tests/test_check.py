"""``medlit.check`` and the checks behind it: a matrix of broken inputs across BraTS, ISIC
and LUNA16. Each entry breaks one thing in a valid generated dataset and asserts

* ``python -m medlit.check``'s exit status and its line naming the file and the problem;
* that a run (the data module's ``prepare_data``, which checks while it caches) refuses
  the same input with medlit's own error type and the same message, before training.

Warnings (exit 0) must not stop a run."""

from __future__ import annotations

import gzip
import os
import re
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import SimpleITK as sitk
from PIL import Image

from medlit.check import main as check_main
from medlit.datamodules import BraTSDataModule, ISICDataModule, LUNA16DataModule
from medlit.datasets.io.volume import read_volume, write_volume
from medlit.errors import ConfigError, InvalidCaseError, MedlitError
from tests.data.isic.data import make_isic
from tests.data.luna16.data import make_luna16
from tests.test_fit import REPO, cli_args, tiny

CLASSIFIER = str(REPO / "experiments/demo/isic_classifier.yaml")
SEGMENTER = str(REPO / "experiments/demo/isic_unet.yaml")
DETECTOR = str(REPO / "experiments/demo/luna16_yolo.yaml")


# ---- the datasets ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def _isic_pristine(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    base = tmp_path_factory.mktemp("isic")
    make_isic(base / "task3", "2018_task3", lesions=12, seed=1)
    make_isic(base / "task1", "2018_task1", lesions=8, seed=1)
    return {"task3": base / "task3", "task1": base / "task1"}


@pytest.fixture(scope="module")
def _luna_pristine(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("luna16") / "LUNA16"
    make_luna16(root, scans=10, seed=0)
    return root


class Dataset:
    """A fresh copy of one pristine dataset, the config that checks it, and its data
    module built directly (for the run's strict path)."""

    def __init__(self, kind: str, root: Path, tracking_uri: str) -> None:
        self.kind, self.root, self.extra = kind, root, []
        self.tracking_uri = tracking_uri

    def argv(self) -> list[str]:
        if self.kind == "brats":
            return tiny(self.root, self.tracking_uri, *self.extra)
        common = cli_args(self.root, self.tracking_uri, *self.extra)
        if self.kind == "isic-labels":
            return [CLASSIFIER, *common, "--data.image_size=32"]
        if self.kind == "isic-masks":
            return [SEGMENTER, *common, "--data.image_size=32", "--model.encoder=tu-test_resnet"]
        return [DETECTOR, *common, "--data.spacing=null"]

    def datamodule(self):
        args = dict(a.removeprefix("--data.").split("=", 1) for a in self.extra)
        split = {"val_fraction": 0.25, "test_fraction": 0.25}
        if file := args.pop("split.split_file", None):
            split["split_file"] = file
        if self.kind == "brats":
            return BraTSDataModule(root=str(self.root), split=split, **args)
        if self.kind.startswith("isic"):
            target = "label" if self.kind == "isic-labels" else "mask"
            return ISICDataModule(root=str(self.root), target=target, split=split, **args)
        return LUNA16DataModule(root=str(self.root), spacing=None, **args)


@pytest.fixture
def datasets(
    brats_root: Path,
    _isic_pristine: dict[str, Path],
    _luna_pristine: Path,
    tmp_path: Path,
    tracking_uri: str,
) -> Callable[[str], Dataset]:
    def make(kind: str) -> Dataset:
        if kind == "brats":
            return Dataset(kind, brats_root, tracking_uri)
        source = {
            "isic-labels": _isic_pristine["task3"],
            "isic-masks": _isic_pristine["task1"],
            "luna16": _luna_pristine,
        }[kind]
        root = tmp_path / kind
        shutil.copytree(source, root)
        return Dataset(kind, root, tracking_uri)

    return make


# ---- the breakers: each breaks one thing and returns the file the message must name ----


def _brats_case(ds: Dataset) -> dict[str, Path]:
    case = sorted(p for p in ds.root.iterdir() if p.is_dir())[2]
    return {f.name.removesuffix(".nii.gz").rsplit("_", 1)[1]: f for f in case.glob("*.nii.gz")}


def _rewrite(path: Path, change: Callable[[np.ndarray, sitk.Image], sitk.Image]) -> Path:
    image = sitk.ReadImage(str(path))
    out = change(sitk.GetArrayFromImage(image), image)
    sitk.WriteImage(out, str(path))
    return path


def _like(array: np.ndarray, ref: sitk.Image) -> sitk.Image:
    """``array`` with ``ref``'s spacing, origin and direction (its size may differ)."""
    image = sitk.GetImageFromArray(array)
    image.SetSpacing(ref.GetSpacing())
    image.SetOrigin(ref.GetOrigin())
    image.SetDirection(ref.GetDirection())
    return image


def brats_missing(ds):
    f = _brats_case(ds)["t2"]
    f.unlink()
    return f


def brats_fifo(ds):
    """A modality that is a named pipe: opening it would block until someone writes."""
    f = _brats_case(ds)["flair"]
    f.unlink()
    os.mkfifo(f)
    return f


def brats_folder(ds):
    f = _brats_case(ds)["t1"]
    f.unlink()
    f.mkdir()
    return f


def brats_truncated(ds):
    f = _brats_case(ds)["flair"]
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    return f


def brats_flipped_byte(ds):
    f = _brats_case(ds)["t1"]
    data = bytearray(f.read_bytes())
    data[len(data) // 2] ^= 0x5A
    f.write_bytes(bytes(data))
    return f


def brats_header_lies(ds):
    """dim[1] one smaller in a correctly re-compressed file: SimpleITK would read it."""
    f = _brats_case(ds)["t1ce"]
    raw = bytearray(gzip.decompress(f.read_bytes()))
    dim1 = int.from_bytes(raw[42:44], "little")
    raw[42:44] = (dim1 - 1).to_bytes(2, "little")
    f.write_bytes(gzip.compress(bytes(raw)))
    return f


def brats_shape(ds):
    return _rewrite(_brats_case(ds)["t2"], lambda a, ref: _like(a[:, :-2].copy(), ref))


def brats_spacing(ds):
    def change(a, ref):
        image = _like(a, ref)
        image.SetSpacing((1.0, 1.0, 2.5))
        return image

    return _rewrite(_brats_case(ds)["seg"], change)


def brats_origin(ds):
    def change(a, ref):
        image = _like(a, ref)
        image.SetOrigin(tuple(o + 5.0 for o in ref.GetOrigin()))
        return image

    return _rewrite(_brats_case(ds)["flair"], change)


def brats_direction(ds):
    def change(a, ref):
        image = _like(a, ref)
        image.SetDirection((0, 1, 0, 1, 0, 0, 0, 0, 1))
        return image

    return _rewrite(_brats_case(ds)["t1"], change)


def brats_nan(ds):
    def change(a, ref):
        a = a.astype(np.float32)
        a[a.shape[0] // 2, 5, 5] = np.nan
        return _like(a, ref)

    return _rewrite(_brats_case(ds)["t1"], change)


def brats_labels(ds):
    def change(a, ref):
        a = a.copy()
        a[a == 4] = 3  # the 2023 ET label in a 2021 release
        a[0, 0, 0] = 3
        return _like(a, ref)

    return _rewrite(_brats_case(ds)["seg"], change)


def brats_garbage(ds):
    f = _brats_case(ds)["t2"]
    f.write_bytes(gzip.compress(b"not a nifti file" * 40))
    return f


def brats_split_file(ds):
    cases = sorted(p.name for p in ds.root.iterdir() if p.is_dir())
    f = ds.root.parent / "split.yaml"
    f.write_text(
        f"train: [{', '.join(cases[:5])}, BraTS2021_99999]\nval: [{cases[5]}, {cases[0]}]\n"
    )
    ds.extra.append(f"--data.split.split_file={f}")
    return f


def brats_split_bomb(ds):
    """A split file that is a YAML alias bomb (its ids would expand to 9^9 strings)."""
    f = ds.root.parent / "split.yaml"
    text = 'a: &a ["x","x","x","x","x","x","x","x","x"]\n'
    for prev, name in zip("abcdefgh", "bcdefghi", strict=True):
        text += f"{name}: &{name} [{', '.join([f'*{prev}'] * 9)}]\n"
    f.write_text(text + "train: *i\n")
    ds.extra.append(f"--data.split.split_file={f}")
    return f


def brats_empty_seg(ds):  # a warning: the run goes on
    return _rewrite(_brats_case(ds)["seg"], lambda a, ref: _like(np.zeros_like(a), ref))


def _truth(ds) -> Path:
    return next(ds.root.rglob("ISIC2018_Task3_Training_GroundTruth.csv"))


def _jpgs(ds) -> list[Path]:
    return sorted(ds.root.rglob("ISIC_*.jpg"))


def isic_row_without_image(ds):
    _jpgs(ds)[3].unlink()
    return _truth(ds)


def isic_image_without_row(ds):  # a warning
    extra = _jpgs(ds)[0].with_name("ISIC_9999999.jpg")
    shutil.copy(_jpgs(ds)[0], extra)
    return extra


def isic_truncated_jpg(ds):
    f = _jpgs(ds)[2]
    f.write_bytes(f.read_bytes()[: int(f.stat().st_size * 0.6)])
    return f


def _edit_truth(ds, edit: Callable[[pd.DataFrame], pd.DataFrame]) -> Path:
    f = _truth(ds)
    edit(pd.read_csv(f)).to_csv(f, index=False)
    return f


def isic_onehot(ds):
    def edit(t):
        t.loc[3, ["MEL", "NV"]] = 1.0
        return t

    return _edit_truth(ds, edit)


def isic_duplicate(ds):
    return _edit_truth(ds, lambda t: pd.concat([t, t.iloc[[1]]], ignore_index=True))


def isic_missing_column(ds):
    return _edit_truth(ds, lambda t: t.drop(columns=["VASC"]))


def _masks(ds) -> list[Path]:
    return sorted(ds.root.rglob("ISIC_*_segmentation.png"))


def isic_mask_not_binary(ds):
    f = _masks(ds)[1]
    a = np.asarray(Image.open(f)).copy()
    a[:4, :4] = 128
    Image.fromarray(a).save(f)
    return f


def isic_mask_size(ds):
    f = _masks(ds)[2]
    Image.open(f).resize((17, 13), Image.NEAREST).save(f)
    return f


def isic_mask_16bit(ds):
    f = _masks(ds)[3]
    a = np.asarray(Image.open(f)).astype(np.uint16) * 257
    Image.fromarray(a).save(f)  # mode I;16
    return f


def isic_mask_fifo(ds):
    f = _masks(ds)[4]
    f.unlink()
    os.mkfifo(f)
    return f


def isic_mask_crc(ds):
    """One flipped byte inside the image data (IDAT) of a mask."""
    f = _masks(ds)[0]
    data = bytearray(f.read_bytes())
    data[data.index(b"IDAT") + 10] ^= 0x01
    f.write_bytes(bytes(data))
    return f


def isic_mask_without_image(ds):
    mask = _masks(ds)[4]
    next(ds.root.rglob(mask.name.replace("_segmentation.png", ".jpg"))).unlink()
    return mask


def isic_mask_rgb(ds):
    f = _masks(ds)[3]
    Image.open(f).convert("RGB").save(f)
    return f


def _scans(ds) -> list[Path]:
    return sorted(ds.root.glob("subset*/*.mhd"))


def _edit_header(mhd: Path, key: str, value: str) -> Path:
    text = re.sub(rf"(?m)^{key} = .*$", f"{key} = {value}", mhd.read_text())
    mhd.write_text(text)
    return mhd


def luna_data_file_outside(ds):
    """A header naming a file outside the dataset (it would be read as a scan)."""
    return _edit_header(_scans(ds)[6], "ElementDataFile", "/etc/passwd")


def luna_data_file_parent(ds):
    mhd = _scans(ds)[7]
    shutil.copy(mhd.with_suffix(".raw"), ds.root / "escaped.raw")
    return _edit_header(mhd, "ElementDataFile", f"../{mhd.parent.name}/../escaped.raw")


def luna_dims_overflow(ds):
    """A DimSize whose product overflows 64 bits."""
    mhd = _edit_header(_scans(ds)[8], "DimSize", "4294967296 4294967296 4294967296")
    return mhd.with_suffix(".raw")


def luna_fifo_raw(ds):
    raw = _scans(ds)[9].with_suffix(".raw")
    raw.unlink()
    os.mkfifo(raw)
    return raw


def luna_truncated_raw(ds):
    raw = _scans(ds)[1].with_suffix(".raw")
    raw.write_bytes(raw.read_bytes()[:-1000])
    return raw


def luna_header_lies(ds):
    mhd = _scans(ds)[2]
    dims = re.search(r"(?m)^DimSize = (.*)$", mhd.read_text()).group(1).split()
    _edit_header(mhd, "DimSize", f"{dims[0]} {dims[1]} {int(dims[2]) + 1}")
    return mhd.with_suffix(".raw")


def luna_byte_order(ds):
    return _edit_header(_scans(ds)[3], "BinaryDataByteOrderMSB", "Talse")


def _edit_csv(ds, name: str, edit: Callable[[str], str]) -> Path:
    f = ds.root / name
    f.write_text(edit(f.read_text()))
    return f


def luna_outside(ds):
    uid = _scans(ds)[0].stem
    return _edit_csv(ds, "annotations.csv", lambda t: t + f"{uid},9000.0,0.0,0.0,6.0\n")


def luna_not_a_number(ds):
    uid = _scans(ds)[0].stem
    return _edit_csv(ds, "annotations.csv", lambda t: t + f"{uid},abc,0.0,0.0,6.0\n")


def luna_extra_column(ds):
    def edit(text: str) -> str:
        lines = text.splitlines()
        return "\n".join([lines[0] + ",note", *(ln + ",x" for ln in lines[1:])]) + "\n"

    return _edit_csv(ds, "annotations.csv", edit)


def luna_two_subsets(ds):
    mhd = _scans(ds)[0]
    for f in (mhd, mhd.with_suffix(".raw")):
        shutil.copy(f, ds.root / "subset5" / f.name)
    return ds.root / "subset5" / mhd.name


def luna_missing_raw(ds):
    raw = _scans(ds)[4].with_suffix(".raw")
    raw.unlink()
    return raw


def luna_lung_mask_size(ds):
    mask = next((ds.root / "seg-lungs-LUNA16").glob("*.mhd"))
    image = sitk.ReadImage(str(mask))
    small = sitk.GetImageFromArray(sitk.GetArrayFromImage(image)[:, :-4])
    small.SetSpacing(image.GetSpacing())
    small.SetOrigin(image.GetOrigin())
    sitk.WriteImage(small, str(mask), useCompression=True)
    return mask


def luna_nan(ds):
    mhd = _scans(ds)[5]
    array, geometry = read_volume(mhd)
    array = array.astype(np.float32)
    array[3, 10, 10] = np.nan
    write_volume(array, geometry, mhd)
    return mhd.with_suffix(".raw")


MATRIX = [
    # (dataset, breaker, expected problem (regex), exit status)
    ("brats", brats_missing, r"file is missing", 1),
    ("brats", brats_fifo, r"is a FIFO \(named pipe\), not a regular file", 1),
    ("brats", brats_folder, r"is a folder, not a regular file", 1),
    ("brats", brats_truncated, r"truncated gzip stream", 1),
    ("brats", brats_flipped_byte, r"(corrupt|truncated) gzip stream", 1),
    ("brats", brats_header_lies, r"longer than the \d+ its header declares", 1),
    ("brats", brats_shape, r"shape \(z,y,x\) \(16, 30, 32\) differs from \(16, 32, 32\)", 1),
    ("brats", brats_spacing, r"spacing \(1\.0, 1\.0, 2\.5\) differs", 1),
    ("brats", brats_origin, r"origin .* differs", 1),
    ("brats", brats_direction, r"direction \(0\.0, 1\.0, 0\.0, 1\.0, 0\.0.* differs", 1),
    ("brats", brats_nan, r"1 voxels are NaN or infinite", 1),
    ("brats", brats_labels, r"label values \[3\] are not in the configured set \[0, 1, 2, 4\]", 1),
    ("brats", brats_garbage, r"unreadable NIfTI header", 1),
    ("brats", brats_split_file, r"BraTS2021_\d+ is in both train and val", 1),
    ("brats", brats_split_bomb, r"its YAML aliases expand to more than 1,000,000 values", 1),
    ("brats", brats_empty_seg, r"segmentation is empty \(no tumour voxels\)", 0),
    ("isic-labels", isic_row_without_image, r"row has no image ISIC_\d+\.jpg under", 1),
    ("isic-labels", isic_image_without_row, r"image has no row in .*GroundTruth.csv", 0),
    ("isic-labels", isic_truncated_jpg, r"image does not decode \(OSError: image file is trunc", 1),
    ("isic-labels", isic_onehot, r"line 5: one-hot row .* sums to 2", 1),
    ("isic-labels", isic_duplicate, r"line \d+: duplicate image \(first on line 3\)", 1),
    ("isic-labels", isic_missing_column, r"columns \['VASC'\] are missing", 1),
    ("isic-masks", isic_mask_not_binary, r"mask values \[0, 128, 255\] are not binary 0/255", 1),
    ("isic-masks", isic_mask_size, r"mask size \(17, 13\) differs from image size", 1),
    (
        "isic-masks",
        isic_mask_16bit,
        r"mask is a 16-bit single-channel image \(mode I;16\); ISIC masks are 8-bit",
        1,
    ),
    ("isic-masks", isic_mask_fifo, r"is a FIFO \(named pipe\), not a regular file", 1),
    ("isic-masks", isic_mask_crc, r"damaged PNG \(chunk b'IDAT' at byte \d+ fails its CRC\)", 1),
    ("isic-masks", isic_mask_without_image, r"mask has no image ISIC_\d+\.jpg", 1),
    ("isic-masks", isic_mask_rgb, r"mask mode RGB is not single-channel", 1),
    (
        "luna16",
        luna_data_file_outside,
        r"ElementDataFile = '/etc/passwd' is not a file name beside",
        1,
    ),
    (
        "luna16",
        luna_data_file_parent,
        r"ElementDataFile = '\.\./.*escaped.raw' is not a file name",
        1,
    ),
    (
        "luna16",
        luna_dims_overflow,
        r"bytes, shorter than the \d{25,} that .*DimSize 4294967296x",
        1,
    ),
    ("luna16", luna_fifo_raw, r"is a FIFO \(named pipe\), not a regular file", 1),
    ("luna16", luna_truncated_raw, r"bytes, shorter than the \d+ that .*\.mhd declares", 1),
    ("luna16", luna_header_lies, r"bytes, shorter than the \d+ that .*\.mhd declares", 1),
    ("luna16", luna_byte_order, r"BinaryDataByteOrderMSB = 'Talse' is neither True nor", 1),
    ("luna16", luna_outside, r"line \d+: world point \(9000\.0, .* lies outside the scan", 1),
    ("luna16", luna_not_a_number, r"line \d+: coordX = 'abc' is not a finite number", 1),
    ("luna16", luna_extra_column, r"is not the official .*; unexpected \['note'\]", 1),
    ("luna16", luna_two_subsets, r"the same seriesuid is also in subset0", 1),
    ("luna16", luna_missing_raw, r"data file named by .*\.mhd does not exist", 1),
    ("luna16", luna_lung_mask_size, r"size \(64, 60, \d+\) differs from the scan's", 1),
    ("luna16", luna_nan, r"1 NaN/Inf voxels; CT values must be finite HU", 1),
]


@pytest.mark.parametrize(
    ("kind", "breaker", "problem", "status"),
    MATRIX,
    ids=[b.__name__ for _, b, _, _ in MATRIX],
)
def test_a_broken_input_is_named_by_check_and_refused_by_a_run(
    datasets, kind: str, breaker, problem: str, status: int, capsys: pytest.CaptureFixture
) -> None:
    ds = datasets(kind)
    path = breaker(ds)
    assert check_main(ds.argv()) == status
    out = capsys.readouterr().out
    severity = "ERROR  " if status else "WARNING"
    lines = [ln for ln in out.splitlines() if ln.startswith(severity) and f": {path}: " in ln]
    assert any(re.search(problem, ln) for ln in lines), out
    if status == 0:
        assert not [ln for ln in out.splitlines() if ln.startswith("ERROR")], out
        ds.datamodule().prepare_data()  # a warning never stops a run
        return
    with pytest.raises(MedlitError) as refused:
        ds.datamodule().prepare_data()
    error = refused.value
    assert isinstance(error, InvalidCaseError | ConfigError), error
    # The run stops at the first problem; where this input has one, it is this one.
    if isinstance(error, InvalidCaseError):
        assert error.path == path and re.search(problem, error.problem), error
    else:
        assert str(path) in str(error) and re.search(problem, str(error)), error


def test_every_problem_is_listed_at_once(datasets, capsys: pytest.CaptureFixture) -> None:
    ds = datasets("luna16")
    broken = [luna_truncated_raw(ds), luna_byte_order(ds), luna_outside(ds), luna_missing_raw(ds)]
    assert check_main(ds.argv()) == 1
    out = capsys.readouterr().out
    errors = [ln for ln in out.splitlines() if ln.startswith("ERROR")]
    assert len(errors) == len(broken), out
    for path in broken:
        assert any(f": {path}: " in ln for ln in errors), (path, out)
    assert re.search(r"10 cases checked in [\d.]+ s: 4 errors, \d+ warnings?", out), out


def test_a_clean_dataset_passes(datasets, capsys: pytest.CaptureFixture) -> None:
    ds = datasets("brats")
    assert check_main(ds.argv()) == 0
    out = capsys.readouterr().out
    assert re.search(r"8 cases checked in [\d.]+ s: 0 errors, 0 warnings", out), out


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (
            ["--data.rooot=/x"],
            r"unknown key data.rooot \(from flag --data.rooot=/x\): did you mean data.root\?",
        ),
        (
            ["--model.encoder=tu-test_resnt"],
            r"model.encoder='tu-test_resnt' is not a known "
            r"name; did you mean 'tu-test_resnet'",
        ),
        (["--model.arch=unett"], r"model.arch='unett' is not a known name; did you mean 'unet'"),
        (
            ["--trainer.default_root_dir={file}/runs"],
            r"trainer.default_root_dir=.*/runs: the run "
            r"cannot write there: .* is not a folder",
        ),
        (["--data.cache_dir={file}/cache"], r"data.init_args.cache_dir=.*: the run cannot write"),
    ],
    ids=[
        "unknown-key",
        "unknown-encoder",
        "unknown-arch",
        "unwritable-root-dir",
        "unwritable-cache",
    ],
)
def test_config_errors_fail_at_start_up_naming_the_key(
    datasets,
    tmp_path: Path,
    empty_store: Path,
    extra: list[str],
    message: str,
    capsys: pytest.CaptureFixture,
) -> None:
    ds = datasets("brats")
    file = tmp_path / "a-file"
    file.write_text("")
    args = [*ds.argv(), *(e.format(file=file) for e in extra)]
    assert check_main(args) == 2
    captured = capsys.readouterr()
    assert re.search(message, captured.err), captured.err
    # Nothing was created: the test's store is still the empty one it started as.
    [db] = (tmp_path / "mlruns").iterdir()
    assert db.read_bytes() == empty_store.read_bytes()
