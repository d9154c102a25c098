"""``medlit.fit`` on tiny generated LUNA16 releases: YOLO detection scored with FROC/CPM,
the submission CSV scored again from the file alone, and false-positive reduction."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest

from medlit.datasets.slices import slice_boxes
from medlit.detections import merge_detections
from medlit.errors import ConfigError
from medlit.fit import main
from medlit.metrics.froc import FROC_POINTS
from tests.data.luna16.data import make_luna16
from tests.helpers.shared import Trained
from tests.test_fit import REPO, _artifacts, _runs, cli_args

DETECTOR = str(REPO / "experiments/demo/luna16_yolo.yaml")
FPR = str(REPO / "experiments/demo/luna16_fpr.yaml")


def common(root: Path, tracking_uri: str) -> list[str]:
    return cli_args(
        root,
        tracking_uri,
        "--data.spacing=null",
    )


@pytest.fixture(scope="module")
def _luna_pristine(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("luna16") / "LUNA16"
    make_luna16(root, scans=10, seed=0)
    return root


def score_file(run_id: str, tracking_uri: str, root: Path, out: Path) -> str:
    """The evaluator run on the run's submission CSV alone (a separate process)."""
    mlflow.set_tracking_uri(tracking_uri)
    folder = mlflow.artifacts.download_artifacts(run_id=run_id, dst_path=str(out))
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "medlit.metrics.froc",
            f"{folder}/test_submission.csv",
            "--annotations",
            str(root / "annotations.csv"),
            "--excluded",
            str(root / "annotations_excluded.csv"),
            "--seriesuids",
            f"{folder}/test_seriesuids.csv",
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    return done.stdout


def cpm_from(stdout: str) -> float:
    line = next(ln for ln in stdout.splitlines() if ln.strip().lower().startswith("cpm"))
    return float(line.replace(":", " ").split()[-1])


def tiny_detector(root: Path, tracking_uri: str) -> list[str]:
    """The demo detector shrunk to seconds: 64 px slices, 8 samples an epoch."""
    return [
        DETECTOR,
        *common(root, tracking_uri),
        "--data.patch_size=64",
        "--data.loader.batch_size=4",
        "--data.samples_per_epoch=8",
        "--model.conf_threshold=0.001",
    ]


def tiny_fpr(root: Path, tracking_uri: str) -> list[str]:
    """The demo false-positive-reduction classifier shrunk to seconds: timm's test_resnet
    on 16-voxel candidate patches, one epoch of 32."""
    return [
        FPR,
        *common(root, tracking_uri),
        "--model.model=test_resnet",
        "--data.candidate_size=16",
        "--data.samples_per_epoch=32",
        "--data.loader.batch_size=16",
        "--trainer.max_epochs=1",
    ]


def test_detector_tracks_froc_and_writes_a_submission_the_scorer_agrees_with(
    luna16_yolo: Trained, tmp_path: Path
) -> None:
    metrics, tracking_uri = luna16_yolo.metrics, luna16_yolo.tracking_uri  # trained once
    assert {"test/cpm", *(f"test/sens_at_{p:g}fp" for p in FROC_POINTS)} <= set(metrics)
    assert 0 <= metrics["test/cpm"] <= 1
    [run] = _runs(tracking_uri)
    assert run.info.status == "FINISHED"
    assert run.data.tags["data"] == "synthetic"
    assert {"val/cpm", "val/map50", "train/box_loss"} <= set(run.data.metrics)
    files = _artifacts(tracking_uri, run.info.run_id)
    assert {"test_submission.csv", "test_seriesuids.csv", "test_froc.png"} <= set(files)
    out = score_file(run.info.run_id, tracking_uri, luna16_yolo.root, tmp_path / "art")
    # Lightning returns logged metrics as float32: equal to float32 precision.
    assert cpm_from(out) == pytest.approx(metrics["test/cpm"], abs=1e-6)
    submission = pd.read_csv(tmp_path / "art" / "test_submission.csv")
    assert list(submission.columns) == ["seriesuid", "coordX", "coordY", "coordZ", "probability"]
    assert submission.groupby("seriesuid").size().max() <= 100


def test_false_positive_reduction_scores_candidates_and_reranks_the_detector(
    _luna_pristine: Path, tracking_uri: str
) -> None:
    fpr = main(tiny_fpr(_luna_pristine, tracking_uri))
    assert {"test/balanced_accuracy", "test/cpm", "test/auc_nodule"} <= set(fpr)
    [run] = _runs(tracking_uri)
    files = _artifacts(tracking_uri, run.info.run_id)
    assert {"test_submission.csv", "test_froc.png"} <= set(files)
    [name] = [f for f in files if f.endswith(".ckpt")]
    ckpt = mlflow.MlflowClient(tracking_uri).download_artifacts(run.info.run_id, name)
    base = [
        DETECTOR,
        *common(_luna_pristine, tracking_uri),
        "--data.patch_size=64",
        "--data.loader.batch_size=4",
        "--data.candidate_size=16",
        "--trainer.max_epochs=0",  # the seeded initial detector: identical in every run
        "--model.conf_threshold=0.0",  # an untrained detector: keep every box
    ]
    main(base)
    plain = latest_submission(tracking_uri)
    main([*base, f"--model.fpr_checkpoint={ckpt}", "--model.fpr_weight=0.5"])
    reranked = latest_submission(tracking_uri)
    # Same seed, same detector: the same candidates, re-scored by the classifier.
    key = ["seriesuid", "coordX", "coordY", "coordZ"]
    both = plain.merge(reranked, on=key, suffixes=("_det", "_fpr"))
    assert len(both) == len(plain) > 0
    assert not np.allclose(both["probability_det"], both["probability_fpr"])
    main([*base, "--model.lung_margin_mm=0"])
    in_lungs = latest_submission(tracking_uri)
    assert 0 < len(in_lungs) < len(plain)  # candidates outside the lung masks dropped
    assert len(in_lungs.merge(plain, on=key)) == len(in_lungs)
    # A classifier trained on other candidate patches is refused with the reason named.
    with pytest.raises(Exception, match="candidate_size=16"):
        main([*base, "--data.candidate_size=24", f"--model.fpr_checkpoint={ckpt}"])


def latest_submission(tracking_uri: str) -> pd.DataFrame:
    run = max(_runs(tracking_uri), key=lambda r: r.info.start_time)
    path = mlflow.MlflowClient(tracking_uri).download_artifacts(
        run.info.run_id, "test_submission.csv"
    )
    return pd.read_csv(path)


def test_merge_joins_a_nodule_across_slices_and_keeps_neighbours_apart() -> None:
    spacing = np.array([2.0, 1.0, 1.0])  # z, y, x mm
    nodule = np.array([[10.0, 30.0, 40.0, 6.0]])  # z, y, x index, radius mm
    slices = []
    for z in range(6, 15):
        boxes = slice_boxes(nodule, z, spacing)
        slices.append((z, np.column_stack([boxes, np.full(len(boxes), 0.9 - abs(z - 10) * 0.1)])))
    # A vessel cross-section 20 mm away on two slices, lower scores.
    slices += [(z, np.array([[58.0, 30.0, 62.0, 34.0, 0.3]])) for z in (9, 10)]
    merged = merge_detections(slices, spacing)
    assert len(merged) == 2
    np.testing.assert_allclose(merged[0, :3], [10.0, 30.0, 40.0], atol=0.05)
    assert merged[0, 3] == pytest.approx(12.0, abs=0.01)  # widest box: the diameter
    assert merged[0, 4] == pytest.approx(0.9)
    np.testing.assert_allclose(merged[1, :3], [9.5, 31.5, 59.5], atol=1e-6)
    assert merge_detections([(0, np.zeros((0, 5)))], spacing).shape == (0, 5)


def test_unknown_model_yaml_is_a_config_error(_luna_pristine: Path, tracking_uri: str) -> None:
    with pytest.raises(ConfigError, match=r"model.model='yolov99q.yaml' is not a known name.*"):
        main([DETECTOR, *common(_luna_pristine, tracking_uri), "--model.model=yolov99q.yaml"])
