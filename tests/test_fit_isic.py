"""``medlit.fit`` on tiny generated ISIC releases: classification, segmentation, outputs."""

from __future__ import annotations

from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
from PIL import Image

from medlit.datasets.io.volume import read_volume
from medlit.datasets.isic.source import CLASSES
from medlit.errors import ConfigError, DatasetNotFoundError
from medlit.fit import main
from tests.data.isic.data import make_isic
from tests.helpers.shared import Trained
from tests.test_fit import REPO, _artifacts, _runs, cli_args

CLASSIFIER = str(REPO / "experiments/demo/isic_classifier.yaml")
SEGMENTER = str(REPO / "experiments/demo/isic_unet.yaml")


def common(root: Path, tracking_uri: str) -> list[str]:
    return cli_args(
        root,
        tracking_uri,
        "--data.image_size=32",
        "--data.split.val_fraction=0.25",
        "--data.split.test_fraction=0.25",
    )


@pytest.mark.parametrize(
    ("year", "extra"),
    [
        ("2018_task3", []),
        ("2019", ["--model.num_classes=8", "--data.balance=sampler", "--model.class_weights=none"]),
        ("2020", ["--model.num_classes=2", "--model.freeze_backbone=true"]),
    ],
)
def test_classifier_tracks_isic_metrics_and_writes_the_submission(
    tmp_path: Path, tracking_uri: str, year: str, extra: list[str]
) -> None:
    root = tmp_path / "isic"
    make_isic(root, year, lesions=60 if year == "2020" else 24, seed=4)  # 2020: 30% melanoma
    metrics = main(
        [
            CLASSIFIER,
            *common(root, tracking_uri),
            "--model.model=test_resnet",
            "--data.loader.batch_size=8",
            "--trainer.max_epochs=1",
            *extra,
        ]
    )
    assert 0 <= metrics["test/balanced_accuracy"] <= 1
    if year == "2020":
        assert "test/roc_auc" in metrics
    [run] = _runs(tracking_uri)
    files = _artifacts(tracking_uri, run.info.run_id)
    assert {
        "test_submission.csv",
        "test_confusion.png",
        "gradcam.png",
        "val_predictions.csv",
        "val_confusion.png",
        "test_predictions.csv",
    } <= set(files)
    client = mlflow.MlflowClient(tracking_uri)
    # Per image, the truth beside the prediction, from the epoch of the best checkpoint.
    table = pd.read_csv(client.download_artifacts(run.info.run_id, "test_predictions.csv"))
    assert list(table.columns[:5]) == ["epoch", "image", "truth", "prediction", "correct"]
    assert set(table["truth"]) <= set(CLASSES[year]) and len(table) > 0
    assert (table["correct"] == (table["truth"] == table["prediction"])).all()
    submission = pd.read_csv(client.download_artifacts(run.info.run_id, "test_submission.csv"))
    expected = {
        "2018_task3": ["image", *CLASSES[year]],
        "2019": ["image", *CLASSES[year], "UNK"],
        "2020": ["image", "target"],
    }[year]
    assert list(submission.columns) == expected
    assert submission["image"].str.fullmatch(r"ISIC_\d{7}").all()
    assert ((submission.iloc[:, 1:] >= 0) & (submission.iloc[:, 1:] <= 1)).all().all()


def test_lesion_segmentation_scores_and_writes_masks(tmp_path: Path, tracking_uri: str) -> None:
    root = tmp_path / "isic"
    make_isic(root, "2018_task1", lesions=16, seed=5)
    out = tmp_path / "masks"
    metrics = main(
        [
            SEGMENTER,
            *common(root, tracking_uri),
            "--model.encoder=tu-test_resnet",
            "--model.model_kwargs={decoder_channels: [32, 16, 16, 8, 8]}",
            "--data.loader.batch_size=4",
            "--trainer.max_epochs=1",
            f"--model.predictions_dir={out}",
        ]
    )
    assert {"test/threshold_jaccard_lesion", "test/jaccard_lesion", "test/dice_lesion"} <= set(
        metrics
    )
    masks = sorted(out.glob("*_segmentation.png"))
    [run] = _runs(tracking_uri)
    client = mlflow.MlflowClient(tracking_uri)
    table = pd.read_csv(client.download_artifacts(run.info.run_id, "test_per_case.csv"))
    # one per test image, named like the ground truth
    assert [m.name for m in masks] == [f"{i}_segmentation.png" for i in sorted(table["case_id"])]
    first = Image.open(masks[0])
    truth = Image.open(next(root.rglob(masks[0].name)))
    assert first.mode == "L" and first.size == truth.size  # the image's own resolution
    assert set(np.unique(np.asarray(first)).tolist()) <= {0, 255}
    files = _artifacts(tracking_uri, run.info.run_id)
    assert {f"test_predictions/{m.name}" for m in masks} <= set(files)


def test_brats_predictions_keep_the_input_geometry(brats_unet: Trained) -> None:
    """``model.predictions_dir``: the test stage writes each held-out case's labels."""
    written = sorted((brats_unet.folder / "predictions").glob("*.nii.gz"))
    assert len(written) == 2
    pred, geom = read_volume(written[0])
    ref, ref_geom = read_volume(
        brats_unet.root
        / written[0].name.removesuffix(".nii.gz")
        / written[0].name.replace(".nii.gz", "_t1.nii.gz")
    )
    assert pred.shape == ref.shape and geom == ref_geom
    assert set(np.unique(pred).tolist()) <= {0, 1, 2, 4}  # the 2021 label values


def test_target_must_fit_the_release(tmp_path: Path, tracking_uri: str) -> None:
    root = tmp_path / "isic"
    make_isic(root, "2018_task3", lesions=4)
    with pytest.raises(ConfigError, match="target: mask needs segmentation masks"):
        main([SEGMENTER, *common(root, tracking_uri)])


def test_real_isic_experiments_point_to_the_demo(
    tmp_path: Path, tracking_uri: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    for name in ("isic_classifier", "isic2019_classifier", "isic_unet"):
        with pytest.raises(DatasetNotFoundError, match="isic-archive.*demo"):
            main(
                [
                    str(REPO / f"experiments/{name}.yaml"),
                    f"--trainer.logger.init_args.tracking_uri={tracking_uri}",
                ]
            )
