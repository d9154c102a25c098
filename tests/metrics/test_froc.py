"""LUNA16 FROC/CPM (medlit.metrics.froc): one small case per rule of the official evaluation,
its expected values worked out by hand in the comments.

Reading the curves by hand: ``sklearn.metrics.roc_curve`` walks the thresholds from the
highest probability down; each step adds the false positives (FP/scan = FPs so far / scans)
and detected nodules (sensitivity = detected so far / all nodules) at or above it. A tie
between a hit and a false positive gives a diagonal segment. Each operating point is read by
linear interpolation on that curve, holding the last sensitivity beyond its end.
"""

from __future__ import annotations

import re
import subprocess
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import roc_curve

from medlit.errors import MedlitError
from medlit.metrics.froc import (
    FROC_POINTS,
    FROCResult,
    cap_marks,
    froc,
    read_seriesuids,
    score_files,
)

MARK = ["seriesuid", "coordX", "coordY", "coordZ", "probability"]
FIND = ["seriesuid", "coordX", "coordY", "coordZ", "diameter_mm"]
REPO = Path(__file__).resolve().parents[2]


def marks(*rows: tuple) -> pd.DataFrame:
    return pd.DataFrame(list(rows), columns=MARK)


def finds(*rows: tuple) -> pd.DataFrame:
    return pd.DataFrame(list(rows), columns=FIND)


NODULE = ("A", 0.0, 0.0, 0.0, 10.0)  # scan A, at the origin, radius 5 mm: radius² = 25


def far_marks(uid: str, n: int, probability: float) -> list[tuple]:
    """``n`` false positives of scan ``uid``, 100 mm and more away from every finding."""
    return [(uid, 100.0 + 2 * i, 0.0, 0.0, probability) for i in range(n)]


# ---- 1. the 100-mark cap ----------------------------------------------------------------------


def test_cap_keeps_marks_strictly_above_the_101st_probability() -> None:
    # 100 false positives at 0.5 and the nodule's only hit at 0.1: 101 marks. Sorted
    # descending, the 101st value (index 100) is 0.1; only marks > 0.1 stay, so the hit goes:
    # 0 detected, 100 false positives, sensitivity 0 everywhere.
    capped = marks(*far_marks("A", 100, 0.5), ("A", 1.0, 0.0, 0.0, 0.1))
    r = froc(capped, finds(NODULE), None, ["A"])
    assert (r.n_detected, r.n_false_positives, r.n_nodules, r.cpm) == (0, 100, 1, 0.0)
    # 99 false positives and the hit: 100 marks, not over the cap, everything stays.
    r = froc(marks(*far_marks("A", 99, 0.5), ("A", 1.0, 0.0, 0.0, 0.1)), finds(NODULE), None, ["A"])
    assert (r.n_detected, r.n_false_positives) == (1, 99)


def test_cap_is_per_scan_and_can_be_switched_off() -> None:
    # Scan B: 101 false positives at 0.50, 0.51, ..., 1.50 (distinct). Its 101st value is the
    # smallest, 0.50: the other 100 stay. Scan A: one hit, untouched by B's cap.
    b = [("B", 100.0 + i, 0.0, 0.0, 0.5 + i / 100) for i in range(101)]
    r = froc(marks(*b, ("A", 1.0, 0.0, 0.0, 0.1)), finds(NODULE), None, ["A", "B"])
    assert (r.n_detected, r.n_false_positives) == (1, 100)
    # max_marks <= 0 means no cap (the official maxNumberOfCADMarks = -1): the 101st stays.
    capped = marks(*far_marks("A", 100, 0.5), ("A", 1.0, 0.0, 0.0, 0.1))
    r = froc(capped, finds(NODULE), None, ["A"], max_marks=0)
    assert (r.n_detected, r.n_false_positives) == (1, 100)


def test_cap_drops_every_mark_tied_at_the_threshold() -> None:
    # 99 false positives at 0.9, the hit at 0.5 and one more false positive at 0.5: 101 marks.
    # Sorted: 0.9 × 99, 0.5, 0.5 -> the 101st value is 0.5 and only marks > 0.5 stay. The hit
    # ranks 100th or 101st (a tie), yet goes: 99 marks are kept, not 100.
    rows = [*far_marks("A", 99, 0.9), ("A", 1.0, 0.0, 0.0, 0.5), ("A", 300.0, 0.0, 0.0, 0.5)]
    r = froc(marks(*rows), finds(NODULE), None, ["A"])
    assert (r.n_detected, r.n_false_positives) == (0, 99)
    # 99 at 0.9, the hit at 0.8, two false positives at 0.3: 102 marks; the 101st value is
    # 0.3, both 0.3 go and the hit (ranked 100th) stays: 1 detected, 99 false positives.
    rows = [*far_marks("A", 99, 0.9), ("A", 1.0, 0.0, 0.0, 0.8)]
    rows += [("A", 400.0, 0.0, 0.0, 0.3), ("A", 500.0, 0.0, 0.0, 0.3)]
    r = froc(marks(*rows), finds(NODULE), None, ["A"])
    assert (r.n_detected, r.n_false_positives) == (1, 99)
    # Scan B: 101 marks all at 0.5; the 101st value is 0.5 and none is above it: all go.
    r = froc(marks(*far_marks("B", 101, 0.5)), finds(NODULE), None, ["A", "B"])
    assert (r.n_detected, r.n_false_positives) == (0, 0)


def test_cap_marks_mask() -> None:
    p = np.array([0.2, 0.9, 0.5, 0.5, 0.7])
    # cap 3: sorted 0.9, 0.7, 0.5, 0.5, 0.2 -> 4th value 0.5 -> keep > 0.5: 0.9 and 0.7 only.
    assert cap_marks(p, 3).tolist() == [False, True, False, False, True]
    # cap 4: the 5th value is 0.2 -> keep the four others.
    assert cap_marks(p, 4).tolist() == [False, True, True, True, True]
    assert cap_marks(p, 5).all() and cap_marks(p, -1).all()


# ---- 2. double hits ---------------------------------------------------------------------------


def test_double_hit_counts_once_at_its_highest_probability() -> None:
    # Scan A: two hits on the nodule (0.6 at 1 mm, 0.8 at 2 mm) and a false positive at 0.7;
    # scans B-E are empty: 5 scans. Scored: detected 0.8, FP 0.7 (the 0.6 hit is no FP).
    # Curve: (0, 0) -> 0.8: (0, 1) -> 0.7: (1/5, 1). Sensitivity 1 at every point: CPM 1.
    m = marks(("A", 1.0, 0.0, 0.0, 0.6), ("A", 0.0, 2.0, 0.0, 0.8), ("A", 50.0, 0.0, 0.0, 0.7))
    r = froc(m, finds(NODULE), None, list("ABCDE"))
    assert (r.n_detected, r.n_false_positives, r.n_nodules) == (1, 1, 1)
    assert r.sensitivities == dict.fromkeys(FROC_POINTS, 1.0)
    assert r.cpm == 1.0
    # Had the nodule been scored at the lower 0.6, the FP at 0.7 would come first:
    # (0, 0) -> 0.7: (0.2, 0) -> 0.6: (0.2, 1). At 1/8: on the flat (0,0)-(0.2,0) -> 0;
    # from 1/4 on, past the end -> 1. CPM = 6/7.
    low = froc(marks(("A", 1.0, 0.0, 0.0, 0.6), m.iloc[2]), finds(NODULE), None, list("ABCDE"))
    assert low.sensitivities[0.125] == 0.0 and low.sensitivities[0.25] == 1.0
    assert low.cpm == pytest.approx(6 / 7)


# ---- 3. excluded findings and negative diameters ---------------------------------------------


def test_hits_on_excluded_findings_are_ignored() -> None:
    # Scan A: nodule at (100, 0, 0), 6 mm -> radius² 9; excluded finding at the origin with
    # diameter -1 -> 10 mm -> radius² 25. Scans A, B, C.
    nodule = ("A", 100.0, 0.0, 0.0, 6.0)
    excluded = finds(("A", 0.0, 0.0, 0.0, -1.0))
    m = marks(
        ("A", 4.9, 0.0, 0.0, 0.9),  # 4.9² = 24.01 < 25: on the excluded finding -> ignored
        ("A", 5.1, 0.0, 0.0, 0.8),  # 5.1² = 26.01 >= 25: a false positive
        ("A", 100.0, 1.0, 0.0, 0.5),  # 1 < 9: hits the nodule
    )
    r = froc(m, finds(nodule), excluded, list("ABC"))
    # The excluded finding is no nodule: 1 nodule, 1 detected (0.5), 1 FP (0.8).
    # Curve: (0, 0) -> 0.8: (1/3, 0) -> 0.5: (1/3, 1). 1/8, 1/4: on the flat -> 0;
    # 1/2 .. 8: past the end -> 1. CPM = 5/7.
    assert (r.n_nodules, r.n_detected, r.n_false_positives) == (1, 1, 1)
    assert r.cpm == pytest.approx(5 / 7)
    # Without the exclusion the 0.9 mark is a false positive too: FPs 0.9 and 0.8 before
    # the hit -> corner at 2/3 FP/scan: 1/8, 1/4, 1/2 -> 0; 1 .. 8 -> 1. CPM = 4/7.
    r = froc(m, finds(nodule), None, list("ABC"))
    assert (r.n_detected, r.n_false_positives) == (1, 2)
    assert r.cpm == pytest.approx(4 / 7)


def test_a_mark_on_a_nodule_and_an_excluded_finding_is_a_hit() -> None:
    # The nodule at the origin lies inside a larger excluded finding: the mark is a hit.
    r = froc(
        marks(("A", 1.0, 0.0, 0.0, 0.9)),
        finds(NODULE),
        finds(("A", 0.0, 0.0, 0.0, 20.0)),
        ["A"],
    )
    assert (r.n_detected, r.n_false_positives, r.cpm) == (1, 0, 1.0)


def test_a_negative_diameter_means_10_mm() -> None:
    # Included nodule of diameter -5 at the origin -> 10 mm -> radius² 25:
    # a mark at 4.9 mm (24.01) hits, one at 5.1 mm (26.01) does not.
    nodule = finds(("A", 0.0, 0.0, 0.0, -5.0))
    assert froc(marks(("A", 0.0, 4.9, 0.0, 0.5)), nodule, None, ["A"]).n_detected == 1
    r = froc(marks(("A", 0.0, 5.1, 0.0, 0.5)), nodule, None, ["A"])
    assert (r.n_detected, r.n_false_positives) == (0, 1)
    # The same for an excluded finding: 4.9 mm is ignored (no FP), 5.1 mm is a FP.
    excluded = finds(("A", 0.0, 0.0, 0.0, -1.0))
    two = marks(("A", 0.0, 0.0, 4.9, 0.5), ("A", 0.0, 0.0, -5.1, 0.4))
    assert froc(two, finds(), excluded, ["A"]).n_false_positives == 1


# ---- 4. missed nodules ------------------------------------------------------------------------


def test_a_missed_nodule_counts_in_the_total() -> None:
    # Two nodules in A (origin and (100, 0, 0)); one hit at 0.9 on the first, one FP at 0.4
    # 50 mm away (150 from... (50,0,0) is 50 mm from both centres: no hit). 1 scan.
    # Detected 1 of 2: sensitivity = tpr × 1/2. Curve: (0, 0) -> 0.9: (0, 1/2) -> 0.4:
    # (1, 1/2). Every point reads 1/2 and the curve never goes higher. CPM = 1/2.
    nodules = finds(NODULE, ("A", 100.0, 0.0, 0.0, 10.0))
    r = froc(marks(("A", 0.0, 0.0, 1.0, 0.9), ("A", 50.0, 0.0, 0.0, 0.4)), nodules, None, ["A"])
    assert (r.n_nodules, r.n_detected, r.n_false_positives) == (2, 1, 1)
    assert r.sensitivities == dict.fromkeys(FROC_POINTS, 0.5)
    assert r.sensitivity.max() == 0.5 and r.cpm == 0.5


# ---- 5. scans without marks -------------------------------------------------------------------


def test_scans_without_marks_lower_the_false_positive_rate() -> None:
    # Scan A: FPs at 0.9, 0.8, 0.6 above the nodule's hit at 0.5.
    m = marks(
        ("A", 50.0, 0.0, 0.0, 0.9),
        ("A", 60.0, 0.0, 0.0, 0.8),
        ("A", 70.0, 0.0, 0.0, 0.6),
        ("A", 0.0, 0.0, 0.0, 0.5),
    )
    # 1 scan: 3 FPs/scan before the hit -> corner (3, 0) -> (3, 1): 1/8 .. 2 -> 0 (flat at 0
    # up to 3); 4 and 8 -> 1. CPM = 2/7.
    alone = froc(m, finds(NODULE), None, ["A"])
    assert alone.fps.max() == 3.0 and alone.cpm == pytest.approx(2 / 7)
    # Scans B, C, D without marks: the same 3 FPs over 4 scans -> corner at 3/4:
    # 1/8, 1/4, 1/2 -> 0; 1 .. 8 -> 1. CPM = 4/7.
    four = froc(m, finds(NODULE), None, list("ABCD"))
    assert four.n_scans == 4 and four.fps.max() == 0.75
    assert four.cpm == pytest.approx(4 / 7)
    assert four.metrics()["false_positives_per_scan"] == 0.75
    # Marks of a scan that is not evaluated (Z) are ignored.
    other = froc(pd.concat([m, marks(("Z", 0.0, 0.0, 0.0, 0.99))]), finds(NODULE), None, ["A"])
    assert other.n_false_positives == 3 and other.cpm == alone.cpm


# ---- 6. the hit distance ----------------------------------------------------------------------


def test_the_hit_rule_is_strict_and_three_dimensional() -> None:
    # Nodule at the origin, radius² 25.
    m = marks(
        ("A", 5.0, 0.0, 0.0, 0.9),  # 25: not < 25
        ("A", 3.0, 4.0, 0.0, 0.8),  # 9 + 16 = 25: not < 25
        ("A", 0.0, 3.0, 4.0, 0.7),  # 9 + 16 = 25 along y, z: not < 25
        ("A", 3.0, 0.0, 4.5, 0.6),  # 3 mm away in x-y, but 9 + 20.25 = 29.25 in 3D
        ("A", 3.0, 3.0, 2.0, 0.5),  # 9 + 9 + 4 = 22 < 25: the hit
    )
    r = froc(m, finds(NODULE), None, ["A"])
    assert (r.n_detected, r.n_false_positives) == (1, 4)
    assert froc(marks(("A", 3.0, 3.0, 3.0, 0.5)), finds(NODULE), None, ["A"]).n_detected == 0
    assert froc(marks(("A", 2.0, 2.0, -4.0, 0.5)), finds(NODULE), None, ["A"]).n_detected == 1


# ---- 7. one mark, two nodules -----------------------------------------------------------------


def test_a_mark_on_two_nodules_is_a_hit_for_both() -> None:
    # Nodules at the origin and at (6, 0, 0), both radius² 25; the mark at (3, 0, 0) is 9
    # from each: a hit for both. The FP at 0.5 is the only false positive (the shared mark
    # leaves the FP list once, without error). Curve: (0,0) -> 0.9: (0, 1) -> 0.5: (1, 1).
    nodules = finds(NODULE, ("A", 6.0, 0.0, 0.0, 10.0))
    m = marks(("A", 3.0, 0.0, 0.0, 0.9), ("A", 50.0, 0.0, 0.0, 0.5))
    r = froc(m, nodules, None, ["A"])
    assert (r.n_nodules, r.n_detected, r.n_false_positives, r.cpm) == (2, 2, 1, 1.0)


# ---- 8. the CPM -------------------------------------------------------------------------------


def cpm_case() -> tuple[pd.DataFrame, pd.DataFrame]:
    """4 nodules (scans S0-S3) found at 0.9, 0.7, 0.4 and 0.2; 20 false positives at 0.8,
    0.7, 0.6, 0.5, 0.3 × 7 and 0.1 × 9, spread over S0-S9."""
    nodules = [(f"S{i}", 0.0, 0.0, 0.0, 10.0) for i in range(4)]
    hits = [(f"S{i}", 0.0, 0.0, 0.0, p) for i, p in enumerate((0.9, 0.7, 0.4, 0.2))]
    fp_probs = [0.8, 0.7, 0.6, 0.5] + [0.3] * 7 + [0.1] * 9
    fps = [(f"S{k % 10}", 100.0 + k, 0.0, 0.0, p) for k, p in enumerate(fp_probs)]
    return marks(*hits, *fps), finds(*nodules)


def test_cpm_reads_the_interpolated_curve_at_the_seven_points() -> None:
    # 10 scans, 20 FPs: each FP adds 0.1 FP/scan; each hit adds 1/4 sensitivity.
    # Thresholds down: 0.9 -> (0, 1/4); 0.8 -> (0.1, 1/4); 0.7 (hit and FP tied) -> diagonal
    # to (0.2, 1/2); 0.6, 0.5 -> (0.4, 1/2); 0.4 -> (0.4, 3/4); 0.3 × 7 -> (1.1, 3/4);
    # 0.2 -> (1.1, 1); 0.1 × 9 -> (2.0, 1).
    # 1/8 on the diagonal: 1/4 + (0.125 - 0.1) / 0.1 × 1/4 = 0.25 + 0.0625 = 0.3125;
    # 1/4 on the flat (0.2, 1/2)-(0.4, 1/2): 0.5; 1/2 and 1 on (0.4, 3/4)-(1.1, 3/4): 0.75;
    # 2 at the last point: 1; 4 and 8 past the end: 1.
    # CPM = (0.3125 + 0.5 + 0.75 + 0.75 + 1 + 1 + 1) / 7 = 5.3125 / 7.
    m, nodules = cpm_case()
    r = froc(m, nodules, None, [f"S{i}" for i in range(10)])
    assert (r.n_nodules, r.n_detected, r.n_false_positives) == (4, 4, 20)
    expected = {0.125: 0.3125, 0.25: 0.5, 0.5: 0.75, 1.0: 0.75, 2.0: 1.0, 4.0: 1.0, 8.0: 1.0}
    assert r.sensitivities == pytest.approx(expected)
    assert list(r.sensitivities) == list(FROC_POINTS)
    assert r.cpm == pytest.approx(5.3125 / 7)
    assert r.fps[-1] == pytest.approx(2.0) and r.sensitivity[-1] == 1.0
    assert r.thresholds[0] == np.inf and len(r.thresholds) == len(r.fps) == len(r.sensitivity)
    # Over 20 scans each FP adds 0.05: corners (0.05, 1/4), (0.1, 1/2), (0.2, 1/2),
    # (0.2, 3/4), (0.55, 3/4), (0.55, 1), (1, 1). 1/8 -> 0.5 (flat 0.1-0.2); 1/4 and 1/2 ->
    # 0.75; 1 (the last point) .. 8 -> 1. CPM = (0.5 + 0.75 × 2 + 1 × 4) / 7 = 6/7.
    r20 = froc(m, nodules, None, [f"S{i}" for i in range(20)])
    assert [r20.sensitivities[p] for p in FROC_POINTS] == pytest.approx(
        [0.5, 0.75, 0.75, 1, 1, 1, 1]
    )
    assert r20.cpm == pytest.approx(6 / 7)


# ---- degenerate inputs ------------------------------------------------------------------------


@pytest.mark.filterwarnings("error")
def test_degenerate_inputs_give_nan_or_zero_without_warnings() -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        # No nodule at all: the sensitivity is undefined -> NaN, the FP still counted.
        r = froc(marks(("A", 0.0, 0.0, 0.0, 0.5)), finds(), None, ["A"])
        assert np.isnan(r.cpm) and all(np.isnan(s) for s in r.sensitivities.values())
        assert (r.n_nodules, r.n_false_positives, r.fps.size) == (0, 1, 0)
        assert froc(marks(), finds(), finds(NODULE), ["A"]).n_nodules == 0  # excluded only
        # No marks at all: sensitivity 0 everywhere.
        r = froc(marks(), finds(NODULE), None, ["A"])
        assert r.cpm == 0.0 and r.sensitivities == dict.fromkeys(FROC_POINTS, 0.0)
        assert (r.n_detected, r.n_false_positives) == (0, 0)
        assert froc(pd.DataFrame(), finds(NODULE), None, ["A"]).cpm == 0.0  # no columns
        # Only missed nodules, only false positives: 0, with a curve out to 2 FP/scan.
        r = froc(marks(*far_marks("A", 2, 0.7)), finds(NODULE), None, ["A"])
        assert r.cpm == 0.0 and r.fps.max() == 2.0 and (r.sensitivity == 0).all()
        # Only hits, no false positive at all: FP rate 0 throughout (the official border
        # case), the final sensitivity holds at every point.
        r = froc(marks(("A", 0.0, 0.0, 0.0, 0.5)), finds(NODULE), None, ["A"])
        assert (r.fps == 0).all() and r.cpm == 1.0
        # No scan evaluated.
        r = froc(marks(("A", 0.0, 0.0, 0.0, 0.5)), finds(NODULE), None, [])
        assert r.n_scans == 0 and np.isnan(r.cpm)
        assert r.metrics()["false_positives_per_scan"] == 0.0


def test_bad_tables_raise_medlit_errors() -> None:
    with pytest.raises(MedlitError, match=r"marks: column\(s\) \['probability'\] missing"):
        froc(marks(NODULE).rename(columns={"probability": "p"}), finds(NODULE), None, ["A"])
    with pytest.raises(MedlitError, match="annotations"):
        froc(marks(), finds(NODULE).drop(columns="diameter_mm"), None, ["A"])
    with pytest.raises(MedlitError, match="must be numbers"):
        froc(marks(("A", "x", 0.0, 0.0, 0.5)), finds(NODULE), None, ["A"])
    with pytest.raises(MedlitError, match="probability = nan is not a finite number"):
        froc(marks(("A", 0.0, 0.0, 0.0, float("nan"))), finds(NODULE), None, ["A"])


# ---- the vectorised scorer against a literal transcription of the rules -----------------------


def literal_froc(m: pd.DataFrame, a: pd.DataFrame, e: pd.DataFrame, uids: list[str]):
    """The rules written as plainly as possible, mark by mark: ``(fps, sens, n_fp)``."""
    truth, score, missed = [], [], 0
    for uid in uids:
        cands = [tuple(r) for r in m.loc[m.seriesuid == uid, MARK[1:]].to_numpy()]
        if len(cands) > 100:
            threshold = sorted((c[3] for c in cands), reverse=True)[100]
            cands = [c for c in cands if c[3] > threshold]
        remaining = set(range(len(cands)))
        findings = [(row, True) for row in a.loc[a.seriesuid == uid, FIND[1:]].to_numpy()]
        findings += [(row, False) for row in e.loc[e.seriesuid == uid, FIND[1:]].to_numpy()]
        for (x, y, z, d), included in findings:
            r2 = ((10.0 if d < 0 else d) / 2) ** 2
            hits = [
                k
                for k, c in enumerate(cands)
                if (x - c[0]) ** 2 + (y - c[1]) ** 2 + (z - c[2]) ** 2 < r2
            ]
            remaining -= set(hits)
            if included and hits:
                truth.append(1)
                score.append(max(cands[k][3] for k in hits))
            elif included:
                missed += 1
        for k in sorted(remaining):
            truth.append(0)
            score.append(cands[k][3])
    fpr, tpr, _ = roc_curve(truth, score)
    n_tp = sum(truth)
    n_fp = len(truth) - n_tp
    return fpr * n_fp / len(uids), tpr * n_tp / (n_tp + missed), n_fp


def test_matches_a_literal_transcription_of_the_rules_on_random_scans() -> None:
    # Integer coordinates and even diameters put marks exactly on hit boundaries; probabilities
    # on a 0.01 grid make ties, at the cap and between hits and false positives; some scans
    # have more than 100 marks, overlapping nodules and excluded findings.
    rng = np.random.default_rng(7)
    uids = [f"1.3.6.1.{i}" for i in range(40)]
    m_rows, a_rows, e_rows = [], [], []
    for uid in uids:
        n = int(rng.choice([0, 5, 60, 101, 130]))
        xyz = rng.integers(-12, 13, size=(n, 3)).astype(float)
        probs = rng.integers(0, 100, size=n) / 100
        m_rows += [(uid, *c, p) for c, p in zip(xyz, probs, strict=True)]
        for rows, k in ((a_rows, rng.integers(0, 4)), (e_rows, rng.integers(0, 3))):
            centres = rng.integers(-10, 11, size=(k, 3)).astype(float)
            sizes = rng.choice([-1.0, 4.0, 6.0, 10.0], size=k)
            rows += [(uid, *c, s) for c, s in zip(centres, sizes, strict=True)]
    m, a, e = marks(*m_rows), finds(*a_rows), finds(*e_rows)
    # Marks and findings of a scan left out of the list must change nothing.
    m_extra = pd.concat([m, marks(("X", 0.0, 0.0, 0.0, 0.99))], ignore_index=True)
    r = froc(m_extra.sample(frac=1, random_state=0), a, e, uids)
    fps, sens, n_fp = literal_froc(m, a, e, uids)
    assert r.n_false_positives == n_fp and r.n_nodules == len(a) and r.n_detected > 0
    np.testing.assert_array_equal(r.fps, fps)
    np.testing.assert_array_equal(r.sensitivity, sens)
    points = [float(np.interp(p, fps, sens)) for p in FROC_POINTS]
    assert list(r.sensitivities.values()) == points
    assert r.cpm == float(np.mean(points))


def test_a_full_size_submission_scores_in_well_under_a_second() -> None:
    # 888 scans × 120 marks (the cap bites), 2 nodules and 1 excluded finding per scan.
    # Each scan: a hit at 0.99 on its first nodule, 119 FPs at 0.500-0.618 (distinct). Cap:
    # the 101st value is the 100th FP; the hit and 99 FPs stay. The second nodule is
    # missed: detected 888 of 1776, 888 × 99 FPs, sensitivity 1/2 at every point.
    n_scans, rng = 888, np.random.default_rng(0)
    uids = np.array([f"1.3.6.1.4.1.14519.5.2.1.6279.{i}" for i in range(n_scans)])
    per_scan = 120
    xyz = np.column_stack(
        [np.arange(per_scan) * 3.0 + 50.0, np.zeros(per_scan), np.zeros(per_scan)]
    )
    xyz[0] = 0.0
    probs = np.r_[0.99, 0.5 + np.arange(per_scan - 1) / 1000]
    m = pd.DataFrame(np.tile(xyz, (n_scans, 1)), columns=MARK[1:4])
    m.insert(0, "seriesuid", np.repeat(uids, per_scan))
    m["probability"] = np.tile(probs, n_scans)
    m = m.sample(frac=1, random_state=1).reset_index(drop=True)
    a = pd.DataFrame({"seriesuid": np.repeat(uids, 2), "coordX": np.tile([0.0, -40.0], n_scans)})
    a["coordY"], a["coordZ"], a["diameter_mm"] = 0.0, 0.0, rng.uniform(4, 30, 2 * n_scans)
    e = a.iloc[1::2].assign(coordX=-80.0)
    start = time.perf_counter()
    r = froc(m, a, e, list(uids))
    elapsed = time.perf_counter() - start
    assert (r.n_detected, r.n_nodules, r.n_false_positives) == (888, 1776, 888 * 99)
    assert r.cpm == 0.5
    assert elapsed < 2.0, f"{elapsed:.2f} s"  # ~0.1 s on a laptop core


# ---- reporting --------------------------------------------------------------------------------


def test_metrics_are_mlflow_names_with_an_optional_prefix() -> None:
    m, nodules = cpm_case()
    r = froc(m, nodules, None, [f"S{i}" for i in range(10)])
    got = r.metrics("val/")
    assert list(got) == [
        "val/cpm",
        "val/sens_at_0.125fp",
        "val/sens_at_0.25fp",
        "val/sens_at_0.5fp",
        "val/sens_at_1fp",
        "val/sens_at_2fp",
        "val/sens_at_4fp",
        "val/sens_at_8fp",
        "val/nodules_detected",
        "val/false_positives_per_scan",
    ]
    assert all(re.fullmatch(r"[\w\-./ ]+", k) for k in got)
    assert got["val/cpm"] == r.cpm and got["val/sens_at_0.125fp"] == pytest.approx(0.3125)
    assert got["val/nodules_detected"] == 4.0 and got["val/false_positives_per_scan"] == 2.0
    assert set(r.metrics()) == {k.removeprefix("val/") for k in got}
    assert all(isinstance(v, float) for v in got.values())


def test_plot_writes_a_png(tmp_path: Path) -> None:
    m, nodules = cpm_case()
    froc(m, nodules, None, [f"S{i}" for i in range(10)]).plot(tmp_path / "froc.png")
    assert (tmp_path / "froc.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    nan = froc(marks(), finds(), None, ["A"])  # no nodule: NaN points, no curve
    assert isinstance(nan, FROCResult)
    nan.plot(tmp_path / "nan.png")
    assert (tmp_path / "nan.png").stat().st_size > 0


# ---- 9. files and the command line ------------------------------------------------------------


def write_case(folder: Path) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame, list[str]]:
    m = marks(
        ("A", 0.0, 0.0, 0.0, 0.9),
        ("A", 50.0, 0.0, 0.0, 0.8),
        ("A", 30.0, 0.0, 1.0, 0.7),  # on the excluded finding
        ("B", 1.0, 2.0, 3.0, 0.4),
        ("Z", 1.0, 2.0, 3.0, 0.95),  # not evaluated
    )
    a = finds(NODULE, ("B", 1.0, 2.0, 3.5, 8.0), ("C", 0.0, 0.0, 0.0, 5.0))
    e = finds(("A", 30.0, 0.0, 0.0, -1.0))
    uids = ["A", "B", "C"]
    m.to_csv(folder / "sub.csv", index=False)
    a.to_csv(folder / "ann.csv", index=False)
    e.to_csv(folder / "exc.csv", index=False)
    (folder / "uids.csv").write_text("".join(f"{u}\n" for u in uids))  # official: no header
    return m, a, e, uids


def test_score_files_matches_froc(tmp_path: Path) -> None:
    m, a, e, uids = write_case(tmp_path)
    expected = froc(m, a, e, uids)
    # A hit at 0.9 (A), FP 0.8 (A), 0.7 ignored, a hit at 0.4 (B); C's nodule missed.
    assert (expected.n_detected, expected.n_nodules, expected.n_false_positives) == (2, 3, 1)
    got = score_files(
        tmp_path / "sub.csv", tmp_path / "ann.csv", tmp_path / "exc.csv", tmp_path / "uids.csv"
    )
    assert got.cpm == expected.cpm and got.sensitivities == expected.sensitivities
    assert (got.n_scans, got.n_nodules, got.n_detected, got.n_false_positives) == (
        3,
        3,
        2,
        1,
    )
    np.testing.assert_array_equal(got.fps, expected.fps)
    np.testing.assert_array_equal(got.sensitivity, expected.sensitivity)
    # A seriesuids file with a header and a blank line reads the same.
    (tmp_path / "uids2.csv").write_text("seriesuid\nA\n\nB\nC\n")
    assert read_seriesuids(tmp_path / "uids2.csv") == uids
    # Without the excluded file the 0.7 mark is a false positive.
    no_exc = score_files(tmp_path / "sub.csv", tmp_path / "ann.csv", None, tmp_path / "uids.csv")
    assert no_exc.n_false_positives == 2


def test_file_errors_name_the_file_and_the_line(tmp_path: Path) -> None:
    write_case(tmp_path)
    ann, exc, uids = tmp_path / "ann.csv", tmp_path / "exc.csv", tmp_path / "uids.csv"
    missing = tmp_path / "nope.csv"
    with pytest.raises(MedlitError, match=re.escape(f"{missing}: no such file")):
        score_files(missing, ann, exc, uids)
    with pytest.raises(MedlitError, match=re.escape(f"{missing}: no such file")):
        score_files(tmp_path / "sub.csv", ann, exc, missing)
    bad = tmp_path / "bad.csv"
    bad.write_text("seriesuid,coordX,coordY,coordZ\nA,0,0,0\n")
    with pytest.raises(MedlitError, match=re.escape(f"{bad}: line 1: column(s) ['probability']")):
        score_files(bad, ann, exc, uids)
    # Line 3 is blank; the bad probability is on line 4 of the file.
    bad.write_text("seriesuid,coordX,coordY,coordZ,probability\nA,0,0,0,0.9\n\nA,1,1,1,high\n")
    with pytest.raises(MedlitError, match=re.escape(f"{bad}: line 4: probability = 'high'")):
        score_files(bad, ann, exc, uids)
    bad.write_text("seriesuid,coordX,coordY,coordZ,diameter_mm\nA,0,0,0,inf\n")
    with pytest.raises(MedlitError, match=re.escape(f"{bad}: line 2: diameter_mm = 'inf'")):
        score_files(tmp_path / "sub.csv", bad, exc, uids)


def run_cli(*args: str | Path) -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, "-m", "medlit.metrics.froc", *map(str, args)]
    return subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=120)


def test_command_line_prints_the_cpm_and_exits_2_on_a_malformed_csv(tmp_path: Path) -> None:
    m, a, e, uids = write_case(tmp_path)
    expected = froc(m, a, e, uids)
    files = ["--annotations", tmp_path / "ann.csv", "--excluded", tmp_path / "exc.csv"]
    files += ["--seriesuids", tmp_path / "uids.csv"]
    done = run_cli(tmp_path / "sub.csv", *files, "--plot", tmp_path / "froc.png")
    assert done.returncode == 0, done.stderr
    assert f"CPM: {expected.cpm!r}" in done.stdout
    for p, s in expected.sensitivities.items():
        assert f"sensitivity at {p:g} FP/scan: {s:.6f}" in done.stdout
    assert (tmp_path / "froc.png").read_bytes()[:4] == b"\x89PNG"
    # A non-numeric coordinate on line 3 (the second mark).
    broken = m.astype(object)
    broken.loc[1, "coordY"] = "n/a"
    broken.to_csv(tmp_path / "sub.csv", index=False)
    done = run_cli(tmp_path / "sub.csv", *files)
    assert done.returncode == 2
    assert done.stderr.startswith("medlit: error: ")
    assert f"{tmp_path / 'sub.csv'}: line 3: coordY = 'n/a' is not a finite number" in done.stderr
    assert "Traceback" not in done.stderr
