"""BraTS 2023 lesion-wise metrics (``medlit.metrics.brats_lesionwise``) on NIfTI pairs
built to exercise each rule of the challenge's ``eval.py``: the values derived from the
rules by hand, the HD95 equal to DeepMind's ``surface-distance`` (the challenge's own
call) wherever both masks are non-empty."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import SimpleITK as sitk
import surface_distance

from medlit.errors import ConfigError
from medlit.metrics.brats_lesionwise import main, robust_hd95

SHAPE = (32, 40, 40)  # z, y, x


def cube(a: np.ndarray, z: int, y: int, x: int, side: int, value: int = 3) -> np.ndarray:
    a[z : z + side, y : y + side, x : x + side] = value
    return a


def empty() -> np.ndarray:
    return np.zeros(SHAPE, np.uint8)


def oracle(ref: np.ndarray, pred: np.ndarray, spacing_zyx: tuple[float, ...]) -> float:
    d = surface_distance.compute_surface_distances(ref.astype(bool), pred.astype(bool), spacing_zyx)
    return float(surface_distance.compute_robust_hausdorff(d, 95))


def _pairs() -> dict[str, tuple[np.ndarray, np.ndarray, tuple[float, float, float]]]:
    """case -> (reference, prediction, spacing x, y, z); 2023 labels."""
    one = (1.0, 1.0, 1.0)
    two = cube(cube(empty(), 4, 4, 4, 5), 20, 28, 28, 5)  # two 125 mm³ ET lesions
    pairs = {
        "several": (two, two.copy(), one),
        "missed": (two, cube(empty(), 4, 4, 4, 5), one),
        "false_positive": (
            cube(empty(), 4, 4, 4, 5),
            cube(cube(empty(), 4, 4, 4, 5), 25, 30, 30, 2),
            one,
        ),
        # a 27 mm³ lesion (<= 50) missed: out of the scores; a predicted one touching it: no FP
        "small": (cube(cube(empty(), 4, 4, 4, 5), 24, 30, 30, 3), cube(empty(), 4, 4, 4, 5), one),
        "small_found": (
            cube(cube(empty(), 4, 4, 4, 5), 24, 30, 30, 3),
            cube(cube(empty(), 4, 4, 4, 5), 25, 31, 31, 2),
            one,
        ),
        "empty_both": (empty(), empty(), one),
        "empty_reference": (empty(), cube(empty(), 10, 10, 10, 4), one),
        "empty_prediction": (cube(empty(), 10, 10, 10, 5), empty(), one),
    }
    # Two lesions 2 voxels apart: one lesion after the dilation; half of it found
    near = cube(cube(empty(), 4, 4, 4, 5), 4, 4, 11, 5)
    pairs["grouped"] = (near, cube(empty(), 4, 4, 4, 5), one)
    # One predicted bar touching two lesions 10 voxels apart: it serves both
    far = cube(cube(empty(), 10, 10, 4, 5), 10, 10, 19, 5)
    bar = empty()
    bar[11:14, 11:14, 5:23] = 3
    pairs["bar"] = (far, bar, one)
    # Anisotropic voxels and a prediction with an outlier arm on one side
    ref = cube(empty(), 8, 10, 10, 8)
    pred = cube(empty(), 9, 10, 11, 8)
    pred[12, 13, 19:30] = 3
    pairs["anisotropic"] = (ref, pred, (0.8, 1.0, 2.5))
    # Nested labels: oedema 2 around a core 1 around enhancement 3
    nested = cube(cube(cube(empty(), 6, 6, 6, 12, 2), 9, 9, 9, 6, 1), 10, 10, 10, 4, 3)
    pred = cube(cube(empty(), 6, 6, 6, 12, 2), 9, 9, 9, 6, 1)  # no enhancement found
    pairs["nested"] = (nested, cube(pred, 28, 30, 30, 2, 3), one)  # and an ET speck far off
    return pairs


def _write(folder: Path, name: str, labels: np.ndarray, spacing: tuple[float, ...]) -> None:
    image = sitk.GetImageFromArray(labels)
    image.SetSpacing(spacing)
    image.SetOrigin((-12.0, 7.5, 3.0))
    folder.mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(image, str(folder / name))


@pytest.fixture(scope="module")
def scored(tmp_path_factory: pytest.TempPathFactory) -> tuple[pd.DataFrame, dict]:
    root = tmp_path_factory.mktemp("lesionwise")
    pairs = _pairs()
    for case, (ref, pred, spacing) in pairs.items():
        _write(root / "ref", f"BraTS-GLI-{case}-000-seg.nii.gz", ref, spacing)
        _write(root / "pred", f"BraTS-GLI-{case}-000.nii.gz", pred, spacing)
    table = main(
        [str(root / "pred"), str(root / "ref"), "--output", str(root / "s.csv"), "--panoptic"]
    )
    assert pd.read_csv(root / "s.csv").shape == table.shape
    return table.set_index("case_id"), pairs, root


def row(scored: tuple[pd.DataFrame, dict], case: str, region: str = "ET") -> dict[str, float]:
    r = scored[0].loc[f"BraTS-GLI-{case}-000"]
    return {
        k: r[f"{region}_{k}"]
        for k in ("lesionwise_dice", "lesionwise_hd95", "num_tp", "num_fp", "num_fn")
    }


def expect(dice: float, hd95: float, tp: int, fp: int, fn: int) -> dict[str, float]:
    return {
        "lesionwise_dice": pytest.approx(dice, abs=1e-6),
        "lesionwise_hd95": pytest.approx(hd95, abs=1e-6),
        "num_tp": tp,
        "num_fp": fp,
        "num_fn": fn,
    }


def test_found_missed_and_false_positive_lesions(scored) -> None:
    assert row(scored, "several") == expect(1, 0, 2, 0, 0)
    assert row(scored, "missed") == expect(0.5, 374 / 2, 1, 0, 1)
    assert row(scored, "false_positive") == expect(0.5, 374 / 2, 1, 1, 0)


def test_lesions_at_or_below_50_mm3_count_neither_way(scored) -> None:
    assert row(scored, "small") == expect(1, 0, 1, 0, 0)
    assert row(scored, "small_found") == expect(1, 0, 1, 0, 0)  # its finding is not an FP


def test_empty_masks(scored) -> None:
    assert row(scored, "empty_both") == expect(1, 0, 0, 0, 0)
    assert row(scored, "empty_reference") == expect(0, 374, 0, 1, 0)
    assert row(scored, "empty_prediction") == expect(0, 374, 0, 0, 1)


def test_lesions_within_the_dilation_are_one(scored) -> None:
    ref, pred, _ = scored[1]["grouped"]  # two lesions 2 voxels apart, the first found
    hd = oracle(ref, pred, (1, 1, 1))
    assert row(scored, "grouped") == expect(2 * 125 / (250 + 125), hd, 1, 0, 0)


def test_one_component_serves_two_lesions(scored) -> None:
    ref, bar, _ = scored[1]["bar"]
    first, second = ref.copy(), ref.copy()
    first[..., 12:] = 0
    second[..., :12] = 0
    dices = [
        2 * np.count_nonzero(les & (bar > 0)) / (np.count_nonzero(les) + np.count_nonzero(bar))
        for les in (first > 0, second > 0)
    ]
    hds = [oracle(les, bar, (1, 1, 1)) for les in (first, second)]
    assert row(scored, "bar") == expect(np.mean(dices), np.mean(hds), 2, 0, 0)


def test_anisotropic_voxels_and_an_asymmetric_outlier(scored) -> None:
    ref, pred, (sx, sy, sz) = scored[1]["anisotropic"]
    hd = oracle(ref, pred, (sz, sy, sx))
    assert hd > oracle(pred, ref, (sz, sy, sx)) - 1e-9  # symmetric: the larger side
    inter = np.count_nonzero((ref > 0) & (pred > 0))
    dice = 2 * inter / (np.count_nonzero(ref) + np.count_nonzero(pred))
    assert row(scored, "anisotropic") == expect(dice, hd, 1, 0, 0)
    assert robust_hd95(ref > 0, pred > 0, (sz, sy, sx)) == pytest.approx(hd)


def test_regions_come_from_the_2023_labels(scored) -> None:
    # The tumour found in WT and TC; the ET speck far off is a false positive of all three
    assert row(scored, "nested", "WT") == expect(0.5, 374 / 2, 1, 1, 0)
    assert row(scored, "nested", "TC") == expect(0.5, 374 / 2, 1, 1, 0)
    # ET (64 mm³) missed, and the speck: (0 + 0) / 2, (374 + 374) / 2
    assert row(scored, "nested", "ET") == expect(0, 374, 0, 1, 1)


def test_earlier_releases_labels_are_remapped(tmp_path: Path) -> None:
    ref, pred, spacing = _pairs()["nested"]
    for name, labels in (("ref", ref), ("pred", pred)):
        old = labels.copy()
        old[labels == 3] = 4
        _write(
            tmp_path / name,
            "BraTS2021_00001_seg.nii.gz" if name == "ref" else "BraTS2021_00001.nii.gz",
            old,
            spacing,
        )
    table = main(
        [str(tmp_path / "pred"), str(tmp_path / "ref"), "--output", str(tmp_path / "s.csv")]
    )
    assert table.loc[0, "ET_num_fn"] == 1 and table.loc[0, "WT_lesionwise_dice"] == 0.5
    (tmp_path / "pred" / "BraTS2021_00001.nii.gz").unlink()
    with pytest.raises(ConfigError, match="no prediction for 1 cases"):
        main([str(tmp_path / "pred"), str(tmp_path / "ref"), "--output", str(tmp_path / "s.csv")])


def test_a_brats_2023_evaluation_logs_them_as_the_file_scorer_scores_its_predictions(
    brats_unet, tmp_path: Path, tracking_uri: str
) -> None:
    """On for a 2023 release without being asked, per case and as means; the files the
    test stage writes score the same from disk."""
    from medlit.evaluate import main as evaluate
    from tests.data.brats.data import make_brats
    from tests.test_fit import tiny

    assert not any(k.startswith("test/lesion") for k in brats_unet.metrics)  # 2021: off
    root = tmp_path / "BraTS2023"
    make_brats(root, "2023", cases=8, seed=3)
    out = tmp_path / "written"
    args = [*tiny(root, tracking_uri), f"--ckpt_path={brats_unet.ckpt}", "--split=test"]
    metrics = evaluate([*args, f"--model.predictions_dir={out}"])
    assert {f"test/lesion_{m}_mean" for m in ("dice", "hd95")} <= set(metrics)
    assert 0 <= metrics["test/lesion_dice_mean"] <= 1
    refs = tmp_path / "refs"  # the test cases' reference label files
    refs.mkdir()
    for written in out.glob("*.nii.gz"):
        case = written.name.removesuffix(".nii.gz")
        (refs / f"{case}-seg.nii.gz").symlink_to(root / case / f"{case}-seg.nii.gz")
    table = main([str(out), str(refs), "--output", str(tmp_path / "scores.csv")])
    assert len(table) == 2
    for r in ("WT", "TC", "ET"):
        assert table[f"{r}_lesionwise_dice"].mean() == pytest.approx(
            metrics[f"test/lesion_dice_{r}"], abs=1e-6
        )
        assert table[f"{r}_num_fp"].mean() == pytest.approx(metrics[f"test/lesion_fp_{r}"])
    off = evaluate([*args, "--model.metrics=[dice, hd95]"])
    assert not any(k.startswith("test/lesion") for k in off)


def test_the_panoptic_metrics_are_the_brats_evaluation_config_s(scored) -> None:
    """medlit's panoptica evaluator against brats-evaluation's own config_gli.yaml, on
    the same files (1e-6)."""
    from brats_evaluation import config_path
    from panoptica import Panoptica_Evaluator

    table, pairs, root = scored
    oracle_ev = Panoptica_Evaluator.load_from_config(str(config_path("gli")))
    checked = 0
    for case in pairs:
        name = f"BraTS-GLI-{case}-000"
        got = table.loc[name]
        want = oracle_ev.evaluate(
            str(root / "pred" / f"{name}.nii.gz"), str(root / "ref" / f"{name}-seg.nii.gz")
        )
        for region in ("wt", "tc", "et"):
            values = want[region].to_dict()
            for column in ("tp", "fp", "fn", "sq_dsc", "pq_dsc", "sq_hd95"):
                a, b = float(got[f"{region.upper()}_panoptic_{column}"]), float(values[column])
                assert (np.isnan(a) and np.isnan(b)) or a == pytest.approx(b, abs=1e-6), (
                    case,
                    region,
                    column,
                )
                checked += 1
    assert checked == len(pairs) * 18
    # the dilation-grouped lesion-wise rule and the matched panoptic one differ where
    # lesions lie close: two lesions 2 voxels apart are one lesion-wise, two panoptically
    grouped = table.loc["BraTS-GLI-grouped-000"]
    assert grouped["ET_num_fn"] == 0 and grouped["ET_panoptic_fn"] == 1
