"""medlit's ISIC metrics (computed on tensors/arrays during training) against the official
scorer, ``isic-challenge-scoring``, on the same files, edge cases included."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

# The official scorer is a dev dependency: these tests must run, never skip.
from isic_challenge_scoring.classification import ClassificationMetric, ClassificationScore
from isic_challenge_scoring.segmentation import SegmentationScore
from PIL import Image

from medlit.datasets.io.images import read_mask
from medlit.datasets.isic.source import CLASSES, write_mask, write_submission
from medlit.metrics.classification import balanced_accuracy, per_class_auc
from medlit.metrics.segmentation import dice, jaccard, threshold_jaccard


def _truth_csv(path: Path, ids: list[str], labels: np.ndarray, columns: list[str]) -> None:
    onehot = np.eye(len(columns))[labels]
    pd.concat([pd.DataFrame({"image": ids}), pd.DataFrame(onehot, columns=columns)], axis=1).to_csv(
        path, index=False
    )


@pytest.mark.parametrize("year", ["2018_task3", "2019"])
def test_balanced_accuracy_and_auc_match_the_official_scorer(tmp_path: Path, year: str) -> None:
    rng = np.random.default_rng(0)
    classes = list(CLASSES[year])
    n = 120
    ids = [f"ISIC_{i:07d}" for i in range(n)]
    labels = rng.choice(
        len(classes), n, p=np.linspace(2, 1, len(classes)) / np.linspace(2, 1, len(classes)).sum()
    )
    logits = rng.normal(0, 1, (n, len(classes)))
    logits[np.arange(n), labels] += 1.2  # a decent but imperfect classifier
    probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    probs = np.round(probs, 6)
    probs[:8, :] = 0.1  # argmax ties: all classes equal ...
    probs[8:14, 0] = probs[8:14, 1] = 0.4  # ... or two classes share the top
    probs[8:14, 2:] = 0.2 / (len(classes) - 2)
    truth_columns = classes + (["UNK"] if year == "2019" else [])
    if year == "2019":  # the test set has images of none of the 8 classes
        labels[rng.choice(n, 10, replace=False)] = len(classes)
    _truth_csv(tmp_path / "truth.csv", ids, labels, truth_columns)
    write_submission(tmp_path / "pred.csv", ids, probs, year)

    official = ClassificationScore.from_file(
        tmp_path / "truth.csv", tmp_path / "pred.csv", ClassificationMetric.BALANCED_ACCURACY
    )
    p, t = torch.tensor(probs), torch.tensor(labels)
    if year == "2019":  # UNK is scored like any class: ours comes from the UNK rule
        unk = torch.tensor(pd.read_csv(tmp_path / "pred.csv")["UNK"].to_numpy())
        p = torch.cat([p, unk[:, None]], 1)
    assert balanced_accuracy(p, t) == pytest.approx(
        official.aggregate["balanced_accuracy"], abs=1e-12
    )
    aucs = per_class_auc(p, t)
    for name, ours in zip(truth_columns, aucs, strict=True):
        assert ours == pytest.approx(
            official.per_category.loc[
                official.per_category.index[truth_columns.index(name)], "auc"
            ],
            abs=1e-6,
        )
    assert float(np.nanmean(aucs)) == pytest.approx(official.macro_average["auc"], abs=1e-6)
    assert 0.1 < balanced_accuracy(p, t) < 0.9  # a non-trivial case


def test_binary_2020_roc_auc_matches_the_official_scorer(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    n = 200
    ids = [f"ISIC_{i:07d}" for i in range(n)]
    target = (rng.random(n) < 0.2).astype(int)
    p_mel = np.clip(0.3 * target + rng.random(n) * 0.7, 0, 1).round(3)  # ties in scores too
    pd.DataFrame({"image": ids, "target": target.astype(float)}).to_csv(
        tmp_path / "truth.csv", index=False
    )
    write_submission(tmp_path / "pred.csv", ids, np.stack([1 - p_mel, p_mel], 1), "2020")
    official = ClassificationScore.from_file(
        tmp_path / "truth.csv", tmp_path / "pred.csv", ClassificationMetric.AUC
    )
    ours = per_class_auc(torch.tensor(np.stack([1 - p_mel, p_mel], 1)), torch.tensor(target))[1]
    assert ours == pytest.approx(official.overall, abs=1e-6)


def _square(h: int, w: int, y: int, x: int, side: int) -> np.ndarray:
    m = np.zeros((h, w), bool)
    m[y : y + side, x : x + side] = True
    return m


def test_thresholded_jaccard_matches_the_official_scorer(tmp_path: Path) -> None:
    truth_dir, pred_dir = tmp_path / "truth", tmp_path / "pred"
    h, w = 60, 80
    ref = _square(h, w, 10, 10, 20)  # 400 px
    cases = {
        # shift by 4 rows: J = 320 / 480 = 0.667 (just over 0.65)
        "ISIC_0000001": (ref, _square(h, w, 14, 10, 20)),
        # shift by 5 rows: J = 300 / 500 = 0.600 (under 0.65: counts 0)
        "ISIC_0000002": (ref, _square(h, w, 15, 10, 20)),
        # the truth plus one stray pixel: J = 400 / 401
        "ISIC_0000003": (ref, ref | _square(h, w, 50, 70, 1)),
        "ISIC_0000004": (np.zeros((h, w), bool), np.zeros((h, w), bool)),  # all empty: 1.0
        "ISIC_0000005": (np.zeros((h, w), bool), ref),  # empty truth, a prediction: 0
        "ISIC_0000006": (ref, None),  # prediction stored with the values 128 and 129
    }
    pred_dir.mkdir(parents=True)
    for image_id, (truth, pred) in cases.items():
        write_mask(truth_dir / f"{image_id}_segmentation.png", truth)
        if pred is None:
            values = np.where(ref, 129, 128).astype(np.uint8)  # > 128 is lesion: all of ref
            values[10:14, 10:30] = 128  # ... except 4 rows: J = 320/400 = 0.8
            Image.fromarray(values, "L").save(pred_dir / f"{image_id}_segmentation.png")
        else:
            write_mask(pred_dir / f"{image_id}_segmentation.png", pred)
    official = SegmentationScore.from_dir(truth_dir, pred_dir).macro_average
    ours = {"threshold_jaccard": [], "jaccard": [], "dice": []}
    for image_id in cases:
        t = read_mask(truth_dir / f"{image_id}_segmentation.png").astype(bool)
        p = read_mask(pred_dir / f"{image_id}_segmentation.png").astype(bool)
        ours["threshold_jaccard"].append(threshold_jaccard(p, t))
        ours["jaccard"].append(jaccard(p, t))
        ours["dice"].append(dice(p, t))
    assert ours["threshold_jaccard"][:2] == [pytest.approx(320 / 480), 0.0]
    assert ours["threshold_jaccard"][3:5] == [1.0, 0.0]
    assert ours["threshold_jaccard"][5] == pytest.approx(0.8)
    for metric, values in ours.items():
        assert np.mean(values) == pytest.approx(official[metric], abs=1e-12), metric
