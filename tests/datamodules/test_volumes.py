"""Any dataset in the nnU-Net v2 raw or MSD format (VolumeDataModule): both formats read
alike, nnU-Net's fingerprint and normalisation against nnunetv2 itself, every problem of
a broken dataset named, and predictions that land exactly on each case's own grid."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import SimpleITK as sitk
import torch

from medlit.check import main as check
from medlit.datamodules import VolumeDataModule
from medlit.datasets.io.volume import read_volume
from medlit.datasets.volumes.phantom import write_phantoms
from medlit.datasets.volumes.source import Labels, normalise, target_spacing
from medlit.errors import ConfigError, InvalidCaseError, Report
from medlit.tasks import SegmentationTask
from tests.helpers.nnunet import nnunet

REPO = Path(__file__).resolve().parents[2]
DEMO = REPO / "experiments/demo/volumes_unet.yaml"


@pytest.fixture(scope="module")
def phantoms(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("volumes") / "Dataset900_Phantom"
    write_phantoms(root, 10, seed=5, n_test=2)
    return root


def datamodule(root: Path, cache: Path, **kwargs) -> VolumeDataModule:
    kwargs.setdefault("split", {"val_fraction": 0.2, "test_fraction": 0.2})
    kwargs.setdefault("loader", {"batch_size": 2, "num_workers": 0})
    kwargs.setdefault("intensity_samples", 1_000_000)  # nnU-Net's 10e7 costs seconds
    return VolumeDataModule(root=str(root), cache_dir=str(cache), **kwargs)


def to_msd(src: Path, dst: Path, channels: int = 2) -> None:
    """The nnU-Net raw phantoms as an MSD task: one 4D NIfTI per case (the CT repeated as
    ``channels`` modalities, the second shifted by 100 HU), MSD's label keys."""
    spec = json.loads((src / "dataset.json").read_text())
    training = []
    for label in sorted((src / "labelsTr").glob("*.nii.gz")):
        case = label.name.removesuffix(".nii.gz")
        image = sitk.ReadImage(str(src / "imagesTr" / f"{case}_0000.nii.gz"))
        vols = [sitk.Cast(image, sitk.sitkFloat32) + 100.0 * c for c in range(channels)]
        joined = sitk.JoinSeries(vols)  # 4D: x, y, z, channel (geometry of the 3D image)
        origin, spacing = image.GetOrigin(), image.GetSpacing()
        d = np.array(image.GetDirection()).reshape(3, 3)
        d4 = np.eye(4)
        d4[:3, :3] = d
        joined.SetOrigin((*origin, 0.0))
        joined.SetSpacing((*spacing, 1.0))
        joined.SetDirection(tuple(d4.ravel()))
        (dst / "imagesTr").mkdir(parents=True, exist_ok=True)
        (dst / "labelsTr").mkdir(exist_ok=True)
        sitk.WriteImage(joined, str(dst / "imagesTr" / f"{case}.nii.gz"))
        shutil.copy(label, dst / "labelsTr" / label.name)
        training.append(
            {"image": f"./imagesTr/{case}.nii.gz", "label": f"./labelsTr/{case}.nii.gz"}
        )
    (dst / "dataset.json").write_text(
        json.dumps(
            {
                "name": "Phantom",
                "modality": {str(c): f"MR{c}" for c in range(channels)},
                "labels": {str(v): k for k, v in spec["labels"].items()},
                "numTraining": len(training),
                "training": training,
                "test": [],
            }
        )
    )


# ---- dataset.json, both formats --------------------------------------------------------


def test_nnunet_raw_phantoms_are_read_checked_and_cached(phantoms: Path, tmp_path: Path) -> None:
    dm = datamodule(phantoms, tmp_path)
    report = Report(strict=False)
    assert dm.check(report) == 12 and report.problems == []
    assert dm.spec.format == "nnunet" and dm.spec.channels == ("CT",)
    assert dm.segmentation_target() == ("labels", 3, ["organ", "lesion"])
    assert dm.num_channels == 1
    dm.prepare_data()
    dm.setup("fit")
    spacing = dm.fingerprint["target_spacing"]
    # Thick slices: nnU-Net's rule takes the 10th percentile of the z spacings (3 mm).
    assert spacing[0] == pytest.approx(3.0)
    entry = dm.datasets["val"].entries[0]
    assert entry.meta["spacing_zyx"] == pytest.approx(spacing)
    item = dm.datasets["val"][0]
    assert item["mask"].shape[0] == 2  # organ, lesion regions on the case's own grid
    assert tuple(item["mask"].shape[1:]) == tuple(
        b - a for a, b in entry.meta["bbox"]
    )  # the source's crop, not the cache's grid
    batch = dm.datasets["train"][0]
    assert batch["image"].shape == (1, 64, 64) and set(batch["mask"].unique().tolist()) <= {0, 1, 2}


def test_cross_validation_folds_are_fingerprinted_on_all_non_test_cases(
    phantoms: Path, tmp_path: Path
) -> None:
    """medlit.cv's folds share one fingerprint (one preprocessing, so that their models
    ensemble); a single fit's stays its training split's."""
    folds = datamodule(phantoms, tmp_path).cv_folds(3)
    assert folds[1] == [
        "--data.split.num_folds=3",
        "--data.split.fold=1",
        "--data.fingerprint_from=train_val",
    ]
    prints = {}
    for fold in (0, 1):
        for source in ("train", "train_val"):
            split = {"test_fraction": 0.2, "num_folds": 3, "fold": fold}
            dm = datamodule(
                phantoms, tmp_path, split=split, fingerprint_from=source, intensity_samples=20_000
            )
            dm.prepare_data()
            dm.setup("fit")
            prints[fold, source] = json.dumps(dm.fingerprint, sort_keys=True)
    assert prints[0, "train_val"] == prints[1, "train_val"]
    assert prints[0, "train"] != prints[1, "train"]


def test_an_msd_task_with_4d_images_reads_as_its_channels(phantoms: Path, tmp_path: Path) -> None:
    msd = tmp_path / "Task09_Phantom"
    to_msd(phantoms, msd)
    dm = datamodule(msd, tmp_path / "cache", patch_size=[16, 32, 32])
    report = Report(strict=False)
    assert dm.check(report) == 10 and report.problems == []
    assert dm.spec.format == "msd" and dm.spec.channels == ("MR0", "MR1")
    assert dm.num_channels == 2
    dm.prepare_data()
    dm.setup("fit")
    entry = dm.datasets["val"].entries[0]
    image = np.asarray(entry.arrays["image"], np.float32)
    assert image.shape[0] == 2
    # MR channels: z-scored per case, so the +100 of the second channel vanishes.
    np.testing.assert_allclose(image[0], image[1], atol=2e-2)
    batch = dm.datasets["train"][0]
    assert batch["image"].shape == (2, 2, 16, 32, 32)


def test_region_based_labels_train_sigmoid_regions_and_write_back_in_class_order() -> None:
    labels = Labels(
        ("background", "whole", "core"), ((0,), (1, 2), (2,)), True, regions_class_order=(1, 2)
    )
    seg = np.array([[0, 1, 2, 2]], np.uint8)
    regions = labels.regions(seg)
    np.testing.assert_array_equal(regions, [[[0, 1, 1, 1]], [[0, 0, 1, 1]]])
    np.testing.assert_array_equal(labels.training_target(seg), regions)
    np.testing.assert_array_equal(labels.label_map(regions), seg)


# ---- nnU-Net's own planning and normalisation ---------------------------------------------


def test_the_target_spacing_is_nnunet_v2_s_rule() -> None:
    rng = np.random.default_rng(0)
    cases = {
        "isotropic": (rng.uniform(0.7, 1.0, (9, 3)), rng.integers(100, 200, (9, 3))),
        "thick slices": (
            np.column_stack([rng.choice([2.5, 5.0, 6.0], 9), np.full((9, 2), 0.8)]),
            np.column_stack([rng.integers(20, 40, 9), np.full((9, 2), 512)]),
        ),
        "thick but many slices": (
            np.column_stack([np.full(9, 5.0), np.full((9, 2), 0.8)]),
            np.full((9, 3), 300),
        ),
    }
    ours = {k: list(target_spacing(s, n)) for k, (s, n) in cases.items()}
    theirs = nnunet(
        "import json, types, numpy as np\n"
        "from nnunetv2.experiment_planning.experiment_planners.default_experiment_planner "
        "import ExperimentPlanner\n"
        f"cases = {json.dumps({k: (s.tolist(), n.tolist()) for k, (s, n) in cases.items()})}\n"
        "out = {}\n"
        "for k, (s, n) in cases.items():\n"
        "    self = types.SimpleNamespace(overwrite_target_spacing=None, anisotropy_threshold=3,\n"
        "        dataset_fingerprint={'spacings': s, 'shapes_after_crop': n})\n"
        "    out[k] = ExperimentPlanner.determine_fullres_target_spacing(self).tolist()\n"
        "print(json.dumps(out))\n"
    )
    assert ours.keys() == theirs.keys()
    for k in ours:
        np.testing.assert_allclose(ours[k], theirs[k], rtol=1e-12, err_msg=k)
    assert ours["thick slices"][0] < 5.0  # the rule did apply


def test_ct_and_zscore_normalisation_are_nnunet_v2_s(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    image = rng.normal(40, 300, (6, 8, 9)).astype(np.float32)
    image[image < -100] = 0  # outside the non-zero region, as cropping leaves it
    stats = {"mean": 52.0, "std": 31.0, "percentile_00_5": -80.0, "percentile_99_5": 170.0}
    mask = image != 0
    np.save(tmp_path / "image.npy", image)
    theirs = nnunet(
        "import json, numpy as np\n"
        "from nnunetv2.preprocessing.normalization.default_normalization_schemes import "
        "CTNormalization, ZScoreNormalization\n"
        f"image = np.load({str(tmp_path / 'image.npy')!r})\n"
        f"props = {json.dumps(stats)}\n"
        "ct = CTNormalization(use_mask_for_norm=False, intensityproperties=props)\n"
        "z = ZScoreNormalization(use_mask_for_norm=False, intensityproperties={})\n"
        "zm = ZScoreNormalization(use_mask_for_norm=True, intensityproperties={})\n"
        "seg = np.where(image != 0, 0, -1)\n"  # nnU-Net marks outside the non-zero mask -1
        "out = {'ct': ct.run(image.copy()).tolist(), 'z': z.run(image.copy()).tolist(),\n"
        "       'zm': zm.run(image.copy(), seg).tolist()}\n"
        "print(json.dumps(out))\n"
    )
    np.testing.assert_allclose(normalise(image, "ct", stats, None), theirs["ct"], atol=1e-5)
    np.testing.assert_allclose(normalise(image, "zscore", None, None), theirs["z"], atol=1e-5)
    np.testing.assert_allclose(normalise(image, "zscore", None, mask), theirs["zm"], atol=1e-5)


def test_ct_statistics_draw_the_foreground_voxels_nnunet_v2_draws(tmp_path: Path) -> None:
    """The same voxels, in the same order, as nnU-Net's fingerprint extractor draws from a
    case (with replacement, seeded 1234 per case): so the statistics are nnU-Net's."""
    from medlit.datasets.volumes.source import sample_foreground

    rng = np.random.default_rng(2)
    image = rng.integers(-1000, 1000, (2, 5, 6, 7)).astype(np.float32)
    seg = (rng.random((5, 6, 7)) > 0.7).astype(np.uint8)
    np.save(tmp_path / "image.npy", image)
    np.save(tmp_path / "seg.npy", seg)
    theirs = nnunet(
        "import json, numpy as np\n"
        "from nnunetv2.experiment_planning.dataset_fingerprint.fingerprint_extractor import "
        "DatasetFingerprintExtractor as E\n"
        f"image = np.load({str(tmp_path / 'image.npy')!r})\n"
        f"seg = np.load({str(tmp_path / 'seg.npy')!r})[None]\n"
        "values, _ = E.collect_foreground_intensities(seg, image, seed=1234, num_samples=50)\n"
        "print(json.dumps([np.asarray(v).tolist() for v in values]))\n"
    )
    ours = sample_foreground(list(image), seg, 50)
    for a, b in zip(ours, theirs, strict=True):
        np.testing.assert_array_equal(a, b)


# ---- broken datasets: every problem named -----------------------------------------------


def broken_copy(phantoms: Path, tmp_path: Path) -> Path:
    root = tmp_path / "Dataset901_Broken"
    shutil.copytree(phantoms, root)
    return root


def listed(root: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> str:
    """``medlit.check`` of the demo config on ``root``: what it printed (it must fail)."""
    status = check(
        [str(DEMO), f"--data.root={root}", "--data.demo=false", f"--data.cache_dir={tmp_path}"]
    )
    out = capsys.readouterr()
    assert status != 0
    return out.out + out.err


def test_check_names_a_broken_dataset_json(
    phantoms: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    root = broken_copy(phantoms, tmp_path)
    (root / "dataset.json").write_text('{"channel_names": {"0": "CT"}, "labels": ')
    text = listed(root, tmp_path, capsys)
    assert "dataset.json" in text and "not valid JSON" in text
    spec = {"channel_names": {"0": "CT"}, "labels": {"background": 0, "organ": 1}}
    (root / "dataset.json").write_text(
        json.dumps({**spec, "numTraining": 10, "file_ending": ".png"})
    )
    text = listed(root, tmp_path, capsys)
    assert "file_ending '.png'" in text
    (root / "dataset.json").write_text(json.dumps({**spec, "numTraining": 10}))
    assert "lacks file_ending" in listed(root, tmp_path, capsys)
    (root / "dataset.json").write_text(
        json.dumps(
            {
                **spec,
                "labels": {"background": 0, "organ": 2},
                "numTraining": 10,
                "file_ending": ".nii.gz",
            }
        )
    )
    assert "must be consecutive" in listed(root, tmp_path, capsys)
    (root / "dataset.json").write_text(
        json.dumps({**spec, "numTraining": 9, "file_ending": ".nii.gz"})
    )
    assert "numTraining is 9 but 10 labelled training cases" in listed(root, tmp_path, capsys)
    (root / "dataset.json").write_text(
        json.dumps(
            {
                **spec,
                "labels": {"background": 0, "organ": 1, "ignore": 2},
                "numTraining": 10,
                "file_ending": ".nii.gz",
            }
        )
    )
    assert "label 'ignore'" in listed(root, tmp_path, capsys)


def test_check_lists_a_missing_channel_an_undeclared_label_and_a_foreign_file(
    phantoms: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    root = broken_copy(phantoms, tmp_path)
    for f in sorted((root / "imagesTr").glob("*_0000.nii.gz")):  # a second channel
        shutil.copy(f, f.with_name(f.name.replace("_0000", "_0001")))
    spec = json.loads((root / "dataset.json").read_text())
    spec["channel_names"] = {"0": "CT", "1": "CT late"}
    (root / "dataset.json").write_text(json.dumps(spec))
    (root / "imagesTr" / "phantom_001_0001.nii.gz").unlink()
    seg, geometry = read_volume(root / "labelsTr" / "phantom_002.nii.gz")
    seg[0, 0, 0] = 7
    from medlit.datasets.io.volume import write_volume

    write_volume(seg, geometry, root / "labelsTr" / "phantom_002.nii.gz")
    (root / "imagesTr" / "phantom_003_0000.png").write_bytes(b"\x89PNG")
    text = listed(root, tmp_path, capsys)
    assert "phantom_001_0001.nii.gz" in text and "channel file is missing" in text
    assert "phantom_002.nii.gz" in text and "label values [7] are not declared" in text
    assert "phantom_003_0000.png" in text and "file_ending is .nii.gz" in text
    # A run stops at the first of them, before training, naming the file.
    dm = datamodule(root, tmp_path / "cache2")
    with pytest.raises(InvalidCaseError, match="phantom_00"):
        dm.prepare_data()


def test_a_task_that_cannot_predict_the_labels_is_refused(phantoms: Path, tmp_path: Path) -> None:
    from medlit.cli import check_compatible

    dm = datamodule(phantoms, tmp_path)
    task = SegmentationTask(
        arch="unet",
        encoder="tu-test_resnet.r160_in1k",
        in_channels=1,
        num_classes=2,
        target="labels",
        region_names=["organ"],
    )
    with pytest.raises(ConfigError, match="--model.target=labels --model.num_classes=3"):
        check_compatible(task, dm)
    named = SegmentationTask(
        arch="unet",
        encoder="tu-test_resnet.r160_in1k",
        in_channels=1,
        num_classes=3,
        target="labels",
        region_names=["liver", "tumour"],
    )
    with pytest.raises(ConfigError, match=r"--model.region_names=\[organ, lesion\]"):
        check_compatible(named, dm)


# ---- back to each case's own grid --------------------------------------------------------


def test_a_resampled_oblique_case_goes_back_exactly_to_its_own_grid(
    phantoms: Path, tmp_path: Path
) -> None:
    """Labels cached on the target spacing, as one-hot probabilities, taken back to the
    source grid by the task (what evaluation and prediction do) and written by the data
    module: the file has the input's size, spacing, origin and direction, and the
    structures lie where the reference's do (world centroids within a tenth of a voxel,
    Dice near 1: what remains is the nearest-neighbour resampling of the labels; the old
    extent-aligned interpolation was off by up to half a cached voxel)."""
    dm = datamodule(phantoms, tmp_path)
    dm.prepare_data()
    entries = dm._entries([c for c in dm.cases_found.values() if c.label is not None])
    oblique = [e for e in entries if e.meta["geometry"]["direction"][0] != -1.0]
    # resampled along z too (4 or 5 mm slices to 3 mm), where a misplacement shows most
    [entry, *_] = [e for e in oblique if e.meta["geometry"]["spacing"][2] > 3.5]
    meta = entry.meta
    geometry_dir = np.array(meta["geometry"]["direction"]).reshape(3, 3)
    assert not np.allclose(np.abs(geometry_dir), np.eye(3))  # oblique
    seg = torch.from_numpy(np.asarray(entry.arrays["seg"]).astype(np.int64))
    probs = torch.nn.functional.one_hot(seg, 3).permute(3, 0, 1, 2).float()
    native = list(reversed(meta["geometry"]["spacing"]))
    scale = [a / b for a, b in zip(native, meta["spacing_zyx"], strict=True)]
    shape = [b - a for a, b in meta["bbox"]]
    back = SegmentationTask.to_grid(probs, shape, tuple(scale)).argmax(0).numpy()
    regions = np.stack([back == 1, back == 2])
    path = dm.write_prediction(meta["case_id"], regions, tmp_path / "out", meta)
    source = sitk.ReadImage(str(phantoms / "labelsTr" / f"{meta['case_id']}.nii.gz"))
    written = sitk.ReadImage(str(path))
    assert written.GetSize() == source.GetSize()
    assert written.GetSpacing() == pytest.approx(source.GetSpacing())
    assert written.GetOrigin() == pytest.approx(source.GetOrigin())
    assert written.GetDirection() == pytest.approx(source.GetDirection())
    ours, ref = sitk.GetArrayFromImage(written), sitk.GetArrayFromImage(source)
    for value in (1, 2):
        a, b = ours == value, ref == value
        assert 2 * (a & b).sum() / (a.sum() + b.sum()) > 0.9
        # Centroids in source voxels (z, y, x): along z, resampled from 5 or 4 mm to 3 mm,
        # they agree to a twentieth of a slice (extent-aligned interpolation put them a
        # fifth of a slice off); in-plane what is left is the nearest-neighbour labels'.
        dz, dy, dx = np.argwhere(a).mean(0) - np.argwhere(b).mean(0)
        assert abs(dz) < 0.05 and abs(dy) < 0.25 and abs(dx) < 0.25, (dz, dy, dx)


# ---- end to end: the 3D path, then prediction from the checkpoint alone --------------------


def test_a_3d_network_trains_on_the_dataset_and_predicts_from_its_checkpoint_alone(
    phantoms: Path, tmp_path: Path
) -> None:
    """The 3D experiment for any dataset, shrunk to seconds: trained, tested (per-label
    Dice on each case's own grid, the labels written in the dataset's values), then
    ``medlit.predict`` on imagesTs with the training data gone: the checkpoint's
    fingerprint and dataset.json preprocess the new cases; each prediction has its input's
    grid."""
    import mlflow

    from medlit.fit import main as fit
    from medlit.predict import main as predict

    root = tmp_path / "Dataset900_Phantom"
    shutil.copytree(phantoms, root)
    uri = f"sqlite:///{tmp_path}/mlruns/mlflow.db"
    tiny = [
        str(REPO / "experiments/volumes_unet3d.yaml"),
        f"--data.root={root}",
        f"--trainer.default_root_dir={tmp_path}",
        f"--trainer.logger.init_args.tracking_uri={uri}",
        "--trainer.precision=32-true",
        "--trainer.max_epochs=1",
        "--trainer.check_val_every_n_epoch=1",
        "--trainer.enable_progress_bar=false",
        "--trainer.enable_model_summary=false",
        "--data.patch_size=[16, 32, 32]",
        "--model.patch_size=[16, 32, 32]",
        "--model.filters=[4, 8, 16, 32]",
        "--model.spacing=[3.0, 1.25, 1.25]",
        "--model.tta=none",
        "--data.samples_per_epoch=4",
        "--data.loader.num_workers=0",
        "--data.split.val_fraction=0.2",
        "--data.split.test_fraction=0.2",
        f"--data.cache_dir={tmp_path / 'cache'}",
        "--data.intensity_samples=1000000",
    ]
    fit([*tiny, f"--model.predictions_dir={tmp_path / 'tested'}"])
    client = mlflow.MlflowClient(uri)
    [run] = client.search_runs([client.get_experiment_by_name("volumes").experiment_id])
    assert {"test/dice_organ", "test/dice_lesion", "test/hd95_lesion"} <= set(run.data.metrics)
    assert not [m for m in run.data.metrics if "volume_ml" in m or "components" in m]
    for path in sorted((tmp_path / "tested").glob("*.nii.gz")):
        pred, ref = sitk.ReadImage(str(path)), sitk.ReadImage(str(root / "labelsTr" / path.name))
        assert pred.GetSize() == ref.GetSize() and pred.GetOrigin() == pytest.approx(
            ref.GetOrigin()
        )
        assert set(np.unique(sitk.GetArrayFromImage(pred)).tolist()) <= {0, 1, 2}
    [ckpt] = (tmp_path / "mlruns").rglob("checkpoints/best-*.ckpt")
    state = torch.load(ckpt, map_location="cpu", weights_only=True)
    kept = state["VolumeDataModule"]
    assert kept["fingerprint"]["target_spacing"][0] == pytest.approx(3.0)
    new = tmp_path / "new"
    shutil.copytree(root / "imagesTs", new)
    shutil.rmtree(root)  # the training data are gone
    written = predict(
        [*tiny, "--ckpt_path", str(ckpt), "--input", str(new), "--output", str(tmp_path / "out")]
    )
    assert [p.name for p in written] == ["phantom_010.nii.gz", "phantom_011.nii.gz"]
    volumes = pd.read_csv(tmp_path / "out" / "volumes.csv").set_index("case_id")
    assert sorted(volumes.index) == ["phantom_010", "phantom_011"]
    assert {"volume_ml_pred_organ", "components_pred_lesion"} <= set(volumes.columns)
    slicer = (tmp_path / "out" / "labels.ctbl").read_text()
    assert "\n1 organ " in slicer and "\n2 lesion " in slicer
    for path in written:
        image = sitk.ReadImage(str(new / path.name.replace(".nii.gz", "_0000.nii.gz")))
        pred = sitk.ReadImage(str(path))
        assert pred.GetSize() == image.GetSize()
        assert pred.GetSpacing() == pytest.approx(image.GetSpacing())
        assert pred.GetOrigin() == pytest.approx(image.GetOrigin())
        assert pred.GetDirection() == pytest.approx(image.GetDirection())
