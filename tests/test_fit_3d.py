"""The 3D path end to end, with the real entry points on tiny generated BraTS data: a
DynUNet with deep supervision trained on 3D patches, whole cases scored by a Gaussian
sliding window, predictions written on each input's grid, ``medlit.predict`` and a sweep
over the 3D experiment; DDP and resume are in test_ddp / test_resume."""

from __future__ import annotations

import shutil
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
import torch
import yaml

from medlit.datasets.brats.source import label_targets
from medlit.datasets.io.volume import read_volume
from medlit.errors import ConfigError
from medlit.fit import main as fit
from medlit.metrics.segmentation import connected_components, region_metrics
from medlit.predict import main as predict
from medlit.tasks import Segmentation3DTask
from tests.data.brats.data import SPACING, make_brats
from tests.helpers.shared import Trained

REPO = Path(__file__).resolve().parents[1]
DEMO_3D = str(REPO / "experiments/demo/brats_unet3d.yaml")


def tiny3d(root: Path, tracking_uri: str, *extra: str) -> list[str]:
    """The 3D demo shrunk to seconds: 16×32×32 patches (the test phantoms' size), a
    4-stage DynUNet of 4 to 32 features with one deep-supervision head."""
    return [
        DEMO_3D,
        f"--trainer.default_root_dir={root.parent}",
        f"--data.root={root}",
        "--data.demo=false",
        "--data.patch_size=[16, 32, 32]",
        "--model.patch_size=[16, 32, 32]",
        "--model.filters=[4, 8, 16, 32]",
        "--data.loader.batch_size=2",
        "--data.samples_per_epoch=8",
        "--data.loader.num_workers=0",
        "--data.split.val_fraction=0.25",
        "--data.split.test_fraction=0.25",
        f"--trainer.logger.init_args.tracking_uri={tracking_uri}",
        "--trainer.logger.init_args.experiment_name=test",
        "--trainer.enable_progress_bar=false",
        "--trainer.enable_model_summary=false",
        *extra,
    ]


def test_a_3d_network_trains_on_patches_and_scores_and_writes_whole_cases(
    brats_unet3d: Trained, tmp_path: Path
) -> None:
    """The session's 3D model: its test table holds every held-out case, each written as
    NIfTI on its input's grid, and the Dice of the written labels against the case's own
    segmentation file is the table's (the whole chain, from sliding window to file)."""
    client = mlflow.MlflowClient(brats_unet3d.tracking_uri)
    run = client.get_run(brats_unet3d.run_id)
    params = run.data.params
    assert params["model.class_path"] == "medlit.tasks.Segmentation3DTask"
    assert params["model.init_args.arch"] == "dynunet"
    names = {f.path for f in client.list_artifacts(run.info.run_id)}
    assert {"val_per_case.csv", "test_per_case.csv", "test_slices.png"} <= names, names
    table = pd.read_csv(
        mlflow.artifacts.download_artifacts(
            run_id=run.info.run_id,
            artifact_path="test_per_case.csv",
            tracking_uri=brats_unet3d.tracking_uri,
            dst_path=str(tmp_path),
        )
    ).set_index("case_id")
    written = sorted((brats_unet3d.folder / "predictions").glob("*.nii.gz"))
    assert [p.name.removesuffix(".nii.gz") for p in written] == sorted(table.index)
    for path in written:
        case = path.name.removesuffix(".nii.gz")
        pred, geometry = read_volume(path)
        seg, seg_geometry = read_volume(brats_unet3d.root / case / f"{case}_seg.nii.gz")
        assert pred.shape == seg.shape and geometry == seg_geometry
        assert set(np.unique(pred).tolist()) <= {0, 1, 2, 4}
        scores = region_metrics(
            label_targets(pred, 4, "regions").astype(bool),
            label_targets(seg, 4, "regions").astype(bool),
            ["WT", "TC", "ET"],
            [SPACING] * 3,
            1e3,
            ["dice"],
        )
        # The file holds the nested closure of the predicted regions (WT ∪ TC ∪ ET as
        # WT, TC ∪ ET as TC: labels_from_regions), so its ET is the scored prediction
        # itself; WT and TC equal the table's only where the sigmoids nest (a 2-epoch
        # network's do not).
        assert scores["dice_ET"] == pytest.approx(table.loc[case, "dice_ET"], abs=1e-9)
        # Volumes in mL from the voxel size; the reference's are the segmentation file's.
        voxel_ml = np.prod(geometry.spacing) / 1000
        assert table.loc[case, "volume_ml_pred_ET"] == pytest.approx((pred == 4).sum() * voxel_ml)
        assert table.loc[case, "volume_ml_ref_WT"] == pytest.approx((seg > 0).sum() * voxel_ml)
        assert table.loc[case, "components_pred_ET"] == connected_components(pred == 4)[1]
    assert brats_unet3d.metrics["test/dice_mean"] == pytest.approx(
        table[["dice_WT", "dice_TC", "dice_ET"]].mean().mean()
    )


def test_predict_writes_what_the_test_stage_wrote_with_and_without_mirroring(
    brats_unet3d: Trained, tracking_uri: str, tmp_path: Path
) -> None:
    """``medlit.predict`` on label-free copies of the held-out cases, without the training
    data: the labels the test stage wrote; ``--model.tta=mirror`` runs the 8 flips (other
    labels where the network is not symmetric, the same grid)."""
    tested = brats_unet3d.folder / "predictions"
    cases = sorted(p.name.removesuffix(".nii.gz") for p in tested.glob("*.nii.gz"))
    new = tmp_path / "new"
    for case in cases:
        shutil.copytree(
            brats_unet3d.root / case, new / case, ignore=shutil.ignore_patterns("*_seg*")
        )
    config = [
        *tiny3d(brats_unet3d.root, tracking_uri),
        "--data.root=/nonexistent/training-data",
        "--ckpt_path",
        str(brats_unet3d.ckpt),
        "--input",
        str(new),
    ]
    written = predict([*config, "--output", str(tmp_path / "plain")])
    assert [p.name for p in written] == [f"{c}.nii.gz" for c in cases]
    for path in written:
        np.testing.assert_array_equal(read_volume(path)[0], read_volume(tested / path.name)[0])
    # Beside the label maps: each case's predicted volumes, and the label names for viewers.
    volumes = pd.read_csv(tmp_path / "plain" / "volumes.csv").set_index("case_id")
    assert sorted(volumes.index) == cases
    for path in written:
        pred, geometry = read_volume(path)
        # ET is the file's own (WT and TC there are the closure of the regions: above)
        assert volumes.loc[path.name.removesuffix(".nii.gz"), "volume_ml_pred_ET"] == (
            pytest.approx((pred == 4).sum() * np.prod(geometry.spacing) / 1000)
        )
    itksnap = (tmp_path / "plain" / "label_descriptions.txt").read_text()
    assert "4   " in itksnap and '"enhancing tumour (ET)"' in itksnap
    slicer = (tmp_path / "plain" / "labels.ctbl").read_text().splitlines()
    assert "2 peritumoral_edema_(ED) 255 127 14 255" in slicer
    mirrored = predict([*config, "--output", str(tmp_path / "tta"), "--model.tta=mirror"])
    for a, b in zip(written, mirrored, strict=True):
        assert read_volume(a)[1] == read_volume(b)[1]


def test_3d_settings_that_cannot_work_stop_before_training(
    tmp_path: Path, tracking_uri: str, brats_root: Path
) -> None:
    base = tiny3d(brats_root, tracking_uri, "--trainer.max_epochs=1")
    with pytest.raises(ConfigError, match=r"model.patch_size is \[16, 32, 32\]"):
        fit([*base, "--data.patch_size=32"])
    with pytest.raises(ConfigError, match=r"patches of \[16, 24, 24\] voxels"):
        fit([*base, "--data.patch_size=[16, 24, 24]"])
    with pytest.raises(ConfigError, match="filters has 3 entries"):
        fit([*base, "--model.filters=[4, 8, 16]"])


def test_a_case_resampled_in_the_cache_is_scored_and_written_on_its_own_grid(
    tmp_path: Path, tracking_uri: str
) -> None:
    """``data.target_spacing``: the network sees the cache's coarser grid; evaluation and
    the written labels are on each case's own."""
    root = tmp_path / "BraTS2021"
    make_brats(root, cases=6, seed=5)
    out = tmp_path / "predictions"
    metrics = fit(
        tiny3d(
            root,
            tracking_uri,
            "--trainer.max_epochs=1",
            "--data.target_spacing=[10.0, 10.0, 10.0]",
            "--data.patch_size=[16, 16, 16]",
            "--model.patch_size=[16, 16, 16]",
            "--model.filters=[4, 8, 16]",
            "--model.deep_supervision=false",
            f"--model.predictions_dir={out}",
        )
    )
    assert 0 <= metrics["test/dice_mean"] <= 1
    for path in sorted(out.glob("*.nii.gz")):
        case = path.name.removesuffix(".nii.gz")
        pred, geometry = read_volume(path)
        seg, seg_geometry = read_volume(root / case / f"{case}_seg.nii.gz")
        assert pred.shape == seg.shape and geometry == seg_geometry


def test_a_sweep_searches_the_3d_experiment(
    tmp_path: Path, brats_root: Path, tracking_uri: str
) -> None:
    from tests.test_sweep import run_sweep, study_of

    overrides = dict(
        a.removeprefix("--").split("=", 1)
        for a in tiny3d(brats_root, tracking_uri)[1:]
        if a.startswith("--")
    )
    doc = {
        "experiment": DEMO_3D,
        "overrides": {
            **{k: yaml.safe_load(v) for k, v in overrides.items()},
            "trainer.max_epochs": 1,
            "trainer.logger.init_args.experiment_name": "sweep-3d",
        },
        "objective": {"metric": "val/dice_mean", "direction": "maximize"},
        "search_space": {
            "model.lr": {"type": "float", "low": 1e-3, "high": 1e-1, "log": True},
            "model.tta": {"type": "categorical", "choices": ["none", "mirror"]},
        },
        # One trial: the sweep machinery is test_sweep's; this checks that a 3D trial runs,
        # reports its metric and that the best config is the 3D task's.
        "n_trials": 1,
        "sampler": {"name": "random", "seed": 0},
        "pruner": {"name": "none"},
        "storage": str(tmp_path / "sweep.journal"),
        "output_dir": str(tmp_path / "sweep"),
    }
    sweep = tmp_path / "sweep3d.yaml"
    sweep.write_text(yaml.safe_dump(doc, sort_keys=False))
    done = run_sweep(sweep)
    assert done.returncode == 0, done.stderr[-3000:]
    study = study_of(sweep)
    [trial] = study.trials
    assert trial.value is not None and trial.state.name == "COMPLETE"
    best = yaml.safe_load((tmp_path / "sweep" / "best_config.yaml").read_text())
    assert best["model"]["class_path"] == "medlit.tasks.Segmentation3DTask"


def test_the_3d_task_loads_from_its_checkpoint_alone(brats_unet3d: Trained) -> None:
    task = Segmentation3DTask.load_from_checkpoint(brats_unet3d.ckpt, map_location="cpu")
    assert task.patch == (16, 32, 32) and task.heads == 1
    task.eval()
    with torch.no_grad():
        probs = task.predict_volume(torch.zeros(4, 13, 29, 35))
    assert probs.shape == (3, 13, 29, 35) and 0 <= float(probs.min()) <= float(probs.max()) <= 1
