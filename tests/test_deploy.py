"""``medlit.deploy``: an exported network run with onnxruntime and NumPy alone (torch and
Lightning made unimportable) writes the labels ``medlit.predict --model`` writes, from
NIfTI and from DICOM input."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from medlit.datasets.brats.phantom import write_brats
from medlit.export import main as export
from medlit.predict import main as predict
from tests.helpers.shared import Trained
from tests.test_fit import tiny
from tests.test_fit_3d import tiny3d

MISSING = "--data.root=/nonexistent/training-data"
WITHOUT_TORCH = (
    "import sys\n"
    "for name in ('torch', 'pytorch_lightning', 'lightning', 'monai', 'timm'):\n"
    "    sys.modules[name] = None  # importing them now raises ImportError\n"
    "from medlit.deploy import main\n"
    "main(sys.argv[1:])\n"
)


def deploy(*args: str) -> subprocess.CompletedProcess:
    """``python -m medlit.deploy ARGS`` in a process where torch cannot be imported."""
    run = subprocess.run(
        [sys.executable, "-c", WITHOUT_TORCH, *args],
        capture_output=True,
        text=True,
        env={"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"},
    )
    assert run.returncode == 0, run.stderr[-3000:]
    return run


def labels(path: Path) -> np.ndarray:
    return sitk.GetArrayFromImage(sitk.ReadImage(str(path)))


def test_a_deployed_2d_network_writes_what_predict_writes_without_torch(
    brats_unet: Trained, tracking_uri: str, tmp_path: Path
) -> None:
    from medlit.datasets.io.dicom import write_series

    args = [*tiny(brats_unet.root, tracking_uri), MISSING]
    model = export([*args, f"--ckpt_path={brats_unet.ckpt}", f"--output={tmp_path / 'm.onnx'}"])
    # 64-voxel slices, one case on an oblique grid (the exported 2D network's smallest)
    write_brats(tmp_path / "new", 2, year="2021", shape=(16, 64, 64), spacing=3.75, seed=5)
    new = tmp_path / "new"
    expected = predict(
        [*args, f"--model={model}", f"--input={new}", f"--output={tmp_path / 'predict'}"]
    )
    run = deploy(str(model), f"--input={new}", f"--output={tmp_path / 'deploy'}")
    assert "wrote 2 files" in run.stdout
    for want in expected:
        got = tmp_path / "deploy" / want.name
        a, b = sitk.ReadImage(str(want)), sitk.ReadImage(str(got))
        assert a.GetSize() == b.GetSize() and a.GetOrigin() == b.GetOrigin()
        assert a.GetDirection() == b.GetDirection()
        assert np.array_equal(labels(want), labels(got)), want.name
        assert (labels(got) > 0).sum() > 100
    table = (tmp_path / "deploy" / "volumes.csv").read_text()
    assert table == (tmp_path / "predict" / "volumes.csv").read_text()
    assert (tmp_path / "deploy" / "labels.ctbl").exists()
    # DICOM input: the same case as four MR series, a DICOM SEG beside the labels
    case = next(p for p in sorted(new.iterdir()) if p.name.startswith("BraTS"))
    study = "1.2.826.0.1.3680043.8.498.1"
    for n, (modality, name) in enumerate(
        {"t1": "T1", "t1ce": "T1 POST GD", "t2": "T2", "flair": "FLAIR"}.items(), start=1
    ):
        image = sitk.ReadImage(str(case / f"{case.name}_{modality}.nii.gz"))
        write_series(
            image, tmp_path / "dicom" / name, description=name, study_uid=study, series_number=n
        )
    deploy(str(model), f"--input={tmp_path / 'dicom'}", f"--output={tmp_path / 'dicom-out'}")
    from_dicom = labels(tmp_path / "dicom-out" / f"{study}.nii.gz")
    assert np.mean(from_dicom == labels(tmp_path / "predict" / f"{case.name}.nii.gz")) >= 0.999
    assert (tmp_path / "dicom-out" / f"{study}_seg.dcm").stat().st_size > 1000


def test_a_deployed_3d_network_with_mirroring_writes_what_predict_writes(
    brats_unet3d: Trained, tmp_path: Path
) -> None:
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    args = [*tiny3d(brats_unet3d.root, uri), MISSING]
    model = export([*args, f"--ckpt_path={brats_unet3d.ckpt}", f"--output={tmp_path / 'm.onnx'}"])
    new = tmp_path / "new"
    write_brats(new, 1, year="2021", shape=(20, 40, 36), spacing=3.75, seed=6)
    [want] = predict(
        [*args, f"--model={model}", f"--input={new}", f"--output={tmp_path / 'predict'}"]
    )
    deploy(str(model), f"--input={new}", f"--output={tmp_path / 'deploy'}")
    got = labels(tmp_path / "deploy" / want.name)
    assert np.array_equal(labels(want), got) and (got > 0).sum() > 100


def test_an_isic_image_is_made_the_evaluation_transform_s_input_without_it(
    tmp_path: Path,
) -> None:
    """``model_input`` (deployment's resize and normalisation, no albumentations) equals
    the data module's evaluation transform, for both normalisations, on an image that is
    resized (not square) and one that is not."""
    from medlit.datamodules import ISICDataModule
    from medlit.datasets.isic.source import model_input

    rng = np.random.default_rng(0)
    for shape in ((45, 61, 3), (32, 32, 3)):
        image = rng.integers(0, 256, shape, dtype=np.uint8)
        for normalize in ("imagenet", "symmetric"):
            dm = ISICDataModule(root=str(tmp_path), image_size=32, normalize=normalize)
            want = dm._transform(False)(image=image)["image"].transpose(2, 0, 1)
            got = model_input(image, 32, normalize)
            assert got.dtype == np.float32 and got.shape == (3, 32, 32)
            np.testing.assert_allclose(got, want, atol=1e-6)
