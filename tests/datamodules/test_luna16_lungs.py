"""LUNA16 lung segmentation (``data.target: lungs``): the phantoms' ellipsoid lungs and
their exact volumes, the masks' checks, the cached case layout the segmentation tasks
read, and a trained network's predictions written in the masks' own format on each
scan's grid."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pydicom
import pytest
import SimpleITK as sitk

from medlit.check import main as check
from medlit.datamodules import LUNA16DataModule
from medlit.datasets.io.files import MARKER
from medlit.datasets.luna16.phantom import write_luna16
from medlit.errors import ConfigError

REPO = Path(__file__).resolve().parents[2]
DEMO = REPO / "experiments/demo/luna16_lungs_unet.yaml"
SHAPES = ((16, 20), (40, 40), (40, 40))


@pytest.fixture(scope="module")
def lungs_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """10 small scans, one per subset (scan 3 with the flipped direction)."""
    root = tmp_path_factory.mktemp("luna16-lungs") / "LUNA16"
    write_luna16(root, 10, seed=4, shape_range=SHAPES, lungs="ellipsoids")
    return root


def datamodule(root: Path, cache: Path, **kwargs) -> LUNA16DataModule:
    kwargs.setdefault("loader", {"batch_size": 2, "num_workers": 0})
    return LUNA16DataModule(
        root=str(root), target="lungs", spacing=None, cache_dir=str(cache), **kwargs
    )


def mask_of(root: Path, uid: str) -> sitk.Image:
    return sitk.ReadImage(str(root / "seg-lungs-LUNA16" / f"{uid}.mhd"))


def test_ellipsoid_lungs_have_the_volumes_of_the_formula(lungs_root: Path) -> None:
    exact = json.loads((lungs_root / MARKER).read_text())["lung_volumes_ml"]
    assert len(exact) == 10
    for uid, (left, right) in exact.items():
        mask = mask_of(lungs_root, uid)
        voxel_ml = float(np.prod(mask.GetSpacing())) / 1000
        a = sitk.GetArrayFromImage(mask)
        assert set(np.unique(a).tolist()) == {0, 3, 4}
        # voxel counts within 3 % of 4/3 pi abc on these coarse 40-voxel slices (5-10 mL
        # lungs; the demo's 128-voxel slices: within 0.15 %)
        assert (a == 3).sum() * voxel_ml == pytest.approx(left, rel=0.03)
        assert (a == 4).sum() * voxel_ml == pytest.approx(right, rel=0.03)
        # the left lung (3) lies on the patient's left: larger world x in LPS
        idx = np.argwhere(a == 3).mean(0)[::-1]
        idx_r = np.argwhere(a == 4).mean(0)[::-1]
        x_left = mask.TransformContinuousIndexToPhysicalPoint(idx.tolist())[0]
        x_right = mask.TransformContinuousIndexToPhysicalPoint(idx_r.tolist())[0]
        assert x_left > x_right
    with pytest.raises(ValueError, match="lungs must be"):
        write_luna16(lungs_root.parent / "x", 1, lungs="round")


def test_cases_are_cached_as_segmentation_cases_on_each_scan_s_grid(
    lungs_root: Path, tmp_path: Path
) -> None:
    dm = datamodule(lungs_root, tmp_path / "cache", patch_size=32)
    assert dm.segmentation_target() == ("labels", 3, ["left_lung", "right_lung"])
    assert dm.label_names() == {3: "left_lung", 4: "right_lung"}
    assert dm.num_channels == 3  # one CT channel, ±1 slice
    dm.prepare_data()
    dm.setup("fit")
    [val] = dm.datasets["val"]
    uid = val["case_id"]
    mask = mask_of(lungs_root, uid)
    a = sitk.GetArrayFromImage(mask)
    assert val["image"].shape == (1, *a.shape)
    assert float(val["image"].min()) >= 0 and float(val["image"].max()) <= 1  # HU window
    np.testing.assert_array_equal(val["mask"].numpy(), np.stack([a == 3, a == 4]))
    batch = next(iter(dm.train_dataloader()))
    assert batch["image"].shape == (2, 3, 32, 32) and set(batch["mask"].unique().tolist()) <= {
        0,
        1,
        2,
    }
    # 3D patches from the same cache, augmented without left-right flips: in every
    # patch holding both lungs the left one (class 1) is at larger x (the patient's left)
    dm3 = datamodule(lungs_root, tmp_path / "cache", patch_size=[8, 40, 40], context_slices=0)
    assert dm3.mirror_axes() == (0, 1)
    dm3.prepare_data()
    dm3.setup("fit")
    both = 0
    for _, patches in zip(range(8), dm3.train_dataloader(), strict=False):
        assert patches["image"].shape == (2, 1, 8, 40, 40)
        for seg in patches["mask"].reshape(2, 8, 40, 40).numpy():
            if (seg == 1).any() and (seg == 2).any():
                both += 1
                assert np.argwhere(seg == 1)[:, 2].mean() > np.argwhere(seg == 2)[:, 2].mean()
    assert both >= 8


def test_a_scan_s_prediction_is_written_as_its_mask_on_its_own_grid(
    lungs_root: Path, tmp_path: Path
) -> None:
    """A scan stored mirrored (direction -1 -1 1) is cached turned to the identity
    direction, so each lung keeps its side; the reference regions written back through
    ``write_prediction`` are the mask file, voxel for voxel and geometry."""
    dm = datamodule(lungs_root, tmp_path / "cache", patch_size=32, split={"test": [3, 9]})
    dm.prepare_data()
    dm.setup("test")
    for item in dm.datasets["test"]:
        uid = item["case_id"]
        a = sitk.GetArrayFromImage(mask_of(lungs_root, uid))
        if mask_of(lungs_root, uid).GetDirection()[0] < 0:  # cached in the identity direction
            a = a[:, ::-1, ::-1]
        np.testing.assert_array_equal(item["mask"].numpy(), np.stack([a == 3, a == 4]))
        path = dm.write_prediction(uid, item["mask"].numpy(), tmp_path / "out")
        assert path.name == f"{uid}.mhd" and path.with_suffix(".zraw").is_file()
        written, mask = sitk.ReadImage(str(path)), mask_of(lungs_root, uid)
        np.testing.assert_array_equal(sitk.GetArrayFromImage(written), sitk.GetArrayFromImage(mask))
        assert written.GetOrigin() == pytest.approx(mask.GetOrigin())
        assert written.GetDirection() == pytest.approx(mask.GetDirection())
        assert written.GetSpacing() == pytest.approx(mask.GetSpacing())
    assert any(
        sitk.ReadImage(str(p)).GetDirection()[0] < 0 for p in (tmp_path / "out").glob("*.mhd")
    )


def test_check_names_a_scan_without_a_mask_and_a_mask_without_lungs(
    lungs_root: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    root = tmp_path / "LUNA16"
    shutil.copytree(lungs_root, root)
    masks = sorted((root / "seg-lungs-LUNA16").glob("*.mhd"))
    gone = masks[0].stem
    masks[0].unlink()
    masks[0].with_suffix(".zraw").unlink()
    empty = masks[1]
    image = sitk.ReadImage(str(empty))
    blank = sitk.GetImageFromArray(np.zeros(sitk.GetArrayFromImage(image).shape, np.uint8))
    blank.CopyInformation(image)
    sitk.WriteImage(blank, str(empty), True)
    status = check([str(DEMO), f"--data.root={root}", f"--data.cache_dir={tmp_path / 'c'}"])
    out = capsys.readouterr()
    text = out.out + out.err
    assert status != 0
    assert f"no lung mask seg-lungs-LUNA16/{gone}.mhd" in text
    assert empty.name in text and "holds no lung label 3 or 4" in text
    with pytest.raises(ConfigError, match="3D patches are for target: lungs"):
        LUNA16DataModule(root=str(root), patch_size=[8, 32, 32])


def test_a_trained_network_predicts_scans_as_lung_masks_with_their_volumes(
    lungs_root: Path, tmp_path: Path
) -> None:
    """The demo config shrunk to seconds, trained and tested (per-lung Dice and HD95,
    volumes in the per-case table), then ``medlit.predict`` on a folder of scans: a
    ``seg-lungs-LUNA16`` mask per scan on its grid, ``volumes.csv``, the viewers' label
    files."""
    import mlflow

    from medlit.fit import main as fit
    from medlit.predict import main as predict

    uri = f"sqlite:///{tmp_path}/mlruns/mlflow.db"
    tiny = [
        str(DEMO),
        f"--data.root={lungs_root}",
        f"--data.cache_dir={tmp_path / 'cache'}",
        f"--trainer.default_root_dir={tmp_path}",
        f"--trainer.logger.init_args.tracking_uri={uri}",
        "--trainer.max_epochs=1",
        "--trainer.enable_progress_bar=false",
        "--trainer.enable_model_summary=false",
        "--model.encoder=tu-test_resnet",
        "--model.model_kwargs={decoder_channels: [32, 16, 16, 8, 8]}",
        "--data.patch_size=32",
        "--data.samples_per_epoch=16",
        "--data.loader.batch_size=4",
        "--data.loader.num_workers=0",
        "--data.split.test=[9]",
    ]
    fit(tiny)
    client = mlflow.MlflowClient(uri)
    [run] = client.search_runs([client.get_experiment_by_name("luna16-lungs-demo").experiment_id])
    assert {"test/dice_left_lung", "test/hd95_right_lung", "test/dice_mean"} <= set(
        run.data.metrics
    )
    table = pd.read_csv(
        mlflow.artifacts.download_artifacts(
            run_id=run.info.run_id, artifact_path="test_per_case.csv", tracking_uri=uri
        )
    )
    assert {"volume_ml_ref_left_lung", "volume_ml_pred_right_lung"} <= set(table.columns)
    [ckpt] = (tmp_path / "mlruns").rglob("checkpoints/best-*.ckpt")
    new = tmp_path / "new"
    for k in (3, 9):
        shutil.copytree(lungs_root / f"subset{k}", new / f"subset{k}")
    written = predict(
        [*tiny, "--ckpt_path", str(ckpt), "--input", str(new), "--output", str(tmp_path / "out")]
    )
    scans = sorted(new.rglob("*.mhd"))
    assert sorted(p.name for p in written) == sorted(p.name for p in scans)
    for scan in scans:
        image, pred = sitk.ReadImage(str(scan)), sitk.ReadImage(str(tmp_path / "out" / scan.name))
        assert pred.GetSize() == image.GetSize()
        assert pred.GetOrigin() == pytest.approx(image.GetOrigin())
        assert pred.GetDirection() == pytest.approx(image.GetDirection())
        assert set(np.unique(sitk.GetArrayFromImage(pred)).tolist()) <= {0, 3, 4}
    volumes = pd.read_csv(tmp_path / "out" / "volumes.csv").set_index("case_id")
    assert sorted(volumes.index) == sorted(p.stem for p in scans)
    assert {"volume_ml_pred_left_lung", "components_pred_right_lung"} <= set(volumes.columns)
    slicer = (tmp_path / "out" / "labels.ctbl").read_text()
    assert "\n3 left_lung " in slicer and "\n4 right_lung " in slicer
    # The same scan as a DICOM CT series: named by its SeriesInstanceUID, the same mask on
    # the same grid, and a DICOM SEG of both lungs referencing the series.
    import highdicom as hd

    from medlit.datasets.io.dicom import write_series

    files = write_series(sitk.ReadImage(str(scans[0])), tmp_path / "dicom", modality="CT")
    uid = str(pydicom.dcmread(files[0]).SeriesInstanceUID)
    out = tmp_path / "out-dicom"
    mask, seg_file = predict(
        [*tiny, f"--ckpt_path={ckpt}", f"--input={tmp_path / 'dicom'}", f"--output={out}"]
    )
    assert (mask.name, seg_file.name) == (f"{uid}.mhd", f"{uid}_seg.dcm")
    a, b = (sitk.ReadImage(str(f)) for f in (tmp_path / "out" / scans[0].name, mask))
    assert b.GetSize() == a.GetSize() and b.GetOrigin() == pytest.approx(a.GetOrigin())
    assert np.mean(sitk.GetArrayFromImage(a) == sitk.GetArrayFromImage(b)) >= 0.999
    seg = hd.seg.segread(seg_file)
    assert seg.ReferencedSeriesSequence[0].SeriesInstanceUID == uid
    assert {s.segment_label for s in seg.SegmentSequence} <= {"left_lung", "right_lung"}
    assert {s.SegmentedPropertyTypeCodeSequence[0].CodeMeaning for s in seg.SegmentSequence} == {
        "Lung"
    }
    # Exported and deployed without torch: the masks medlit.predict --model writes, from
    # the scans and from the DICOM series.
    from medlit.export import main as export
    from tests.test_deploy import deploy

    model = export([*tiny, f"--ckpt_path={ckpt}", f"--output={tmp_path / 'lungs.onnx'}"])
    onnx = predict([*tiny, f"--model={model}", f"--input={new}", f"--output={tmp_path / 'onnx'}"])
    deploy(str(model), f"--input={new}", f"--output={tmp_path / 'deploy'}")
    deploy(str(model), f"--input={tmp_path / 'dicom'}", f"--output={tmp_path / 'deploy-dicom'}")
    for want in onnx:
        got = sitk.ReadImage(str(tmp_path / "deploy" / want.name))
        assert got.GetDirection() == sitk.ReadImage(str(want)).GetDirection()
        assert np.array_equal(
            sitk.GetArrayFromImage(got), sitk.GetArrayFromImage(sitk.ReadImage(str(want)))
        )
    assert (tmp_path / "deploy" / "volumes.csv").read_text() == (
        tmp_path / "onnx" / "volumes.csv"
    ).read_text()
    from_dicom = sitk.ReadImage(str(tmp_path / "deploy-dicom" / f"{uid}.mhd"))
    first = sitk.ReadImage(str(tmp_path / "onnx" / scans[0].name))
    assert np.mean(sitk.GetArrayFromImage(from_dicom) == sitk.GetArrayFromImage(first)) >= 0.999
    assert (tmp_path / "deploy-dicom" / f"{uid}_seg.dcm").exists()
