"""medlit's LUNA16 FROC/CPM on small cases whose values are worked out by hand, one per
rule of the official evaluation script."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from medlit.metrics.froc import FROC_POINTS, froc, score_files

MARK = ["seriesuid", "coordX", "coordY", "coordZ", "probability"]
FIND = ["seriesuid", "coordX", "coordY", "coordZ", "diameter_mm"]


def marks(*rows) -> pd.DataFrame:
    return pd.DataFrame(list(rows), columns=MARK)


def finds(*rows) -> pd.DataFrame:
    return pd.DataFrame(list(rows), columns=FIND)


NODULE = ("A", 0.0, 0.0, 0.0, 10.0)  # radius 5 mm at the origin of scan A


def test_100_mark_cap_drops_the_101st_and_ties_at_the_threshold() -> None:
    far = [("A", 100.0 + i, 0.0, 0.0, 0.9) for i in range(99)]
    # 101 marks: the hit ranks 101st (0.1 < every other) -> dropped, the nodule is missed.
    r = froc(
        marks(*far, ("A", 200.0, 0, 0, 0.5), ("A", 1.0, 0, 0, 0.1)), finds(NODULE), None, ["A"]
    )
    assert (r.n_detected, r.n_false_positives, r.cpm) == (0, 100, 0.0)
    # 100 marks: nothing is capped, the hit counts.
    r = froc(marks(*far, ("A", 1.0, 0, 0, 0.1)), finds(NODULE), None, ["A"])
    assert (r.n_detected, r.n_false_positives) == (1, 99)
    # 102 marks: sorted 0.9 x99, 0.2, 0.2, 0.1 -> the 101st value is 0.2 and only marks
    # strictly above it stay: the hit at 0.2 goes although it ranks 100th or 101st.
    rows = [*far, ("A", 1.0, 0, 0, 0.2), ("A", 300.0, 0, 0, 0.2), ("A", 400.0, 0, 0, 0.1)]
    r = froc(marks(*rows), finds(NODULE), None, ["A"])
    assert (r.n_detected, r.n_false_positives) == (0, 99)


def test_double_hit_counts_once_with_its_highest_probability() -> None:
    # Two marks on one nodule (0.6 and 0.8) and a false positive at 0.7, in 2 scans.
    m = marks(("A", 1.0, 0, 0, 0.6), ("A", 0, 2.0, 0, 0.8), ("A", 50.0, 0, 0, 0.7))
    r = froc(m, finds(NODULE), None, ["A", "B"])
    # TP at 0.8 ranks above the FP at 0.7: sensitivity 1 from 0 FP/scan; the 0.6 hit is
    # not a false positive (else there would be 2).
    assert (r.n_detected, r.n_false_positives) == (1, 1)
    assert r.cpm == 1.0
    # Were the hit scored at its lower probability 0.6, the FP (0.7) would come first:
    # FP/scan 0.5 before any detection, so the sensitivity at 1/8 and 1/4 would be 0.
    r_low = froc(
        marks(("A", 1.0, 0, 0, 0.6), ("A", 50.0, 0, 0, 0.7)), finds(NODULE), None, ["A", "B"]
    )
    assert r_low.sensitivities[0.125] == 0.0 and r_low.sensitivities[0.25] == 0.0


def test_hits_on_excluded_findings_are_ignored_and_negative_diameter_is_10_mm() -> None:
    nodule = ("A", 100.0, 0.0, 0.0, 6.0)
    excluded = finds(("A", 0.0, 0.0, 0.0, -1.0))  # -1 -> 10 mm, radius 5
    m = marks(("A", 4.9, 0, 0, 0.9), ("A", 5.1, 0, 0, 0.8), ("A", 100.0, 1.0, 0, 0.5))
    r = froc(m, finds(nodule), excluded, ["A"])
    # 4.9 mm: on the excluded finding -> ignored; 5.1 mm: outside -> a false positive.
    assert (r.n_detected, r.n_false_positives, r.n_nodules) == (1, 1, 1)
    r_no_exclusion = froc(m, finds(nodule), None, ["A"])
    assert r_no_exclusion.n_false_positives == 2


def test_a_missed_nodule_still_counts() -> None:
    nodules = finds(NODULE, ("A", 100.0, 0.0, 0.0, 10.0))
    r = froc(marks(("A", 0.0, 0.0, 1.0, 0.9)), nodules, None, ["A"])
    # 1 of 2 nodules found, no false positive: the curve tops out at 1/2 everywhere.
    assert (r.n_detected, r.n_nodules, r.n_false_positives) == (1, 2, 0)
    assert r.sensitivities == {p: 0.5 for p in FROC_POINTS}
    assert r.cpm == 0.5


def test_scans_without_marks_count_in_the_false_positives_per_scan() -> None:
    m = marks(("A", 0.0, 0, 0, 0.9), ("A", 50.0, 0, 0, 0.8), ("A", 60.0, 0, 0, 0.7))
    alone = froc(m, finds(NODULE), None, ["A"])
    assert alone.fps.max() == 2.0  # 2 false positives / 1 scan
    with_empty = froc(m, finds(NODULE), None, ["A", "B", "C", "D"])
    assert with_empty.fps.max() == 0.5  # the same 2 over 4 scans
    assert with_empty.n_scans == 4 and with_empty.metrics()["false_positives_per_scan"] == 0.5
    # Marks of a scan that is not evaluated are ignored.
    other = froc(pd.concat([m, marks(("Z", 0, 0, 0, 0.99))]), finds(NODULE), None, ["A"])
    assert other.n_false_positives == 2


def test_the_hit_rule_is_strict_and_three_dimensional() -> None:
    m = marks(("A", 5.0, 0, 0, 0.9), ("A", 3.0, 4.0, 0, 0.8), ("A", 3.0, 3.0, 2.0, 0.7))
    r = froc(m, finds(NODULE), None, ["A"])
    # d² = 25 and 25 are not < 25: false positives; 9 + 9 + 4 = 22 < 25: the hit.
    assert (r.n_detected, r.n_false_positives) == (1, 2)
    r2 = froc(marks(("A", 3.0, 3.0, 3.0, 0.7)), finds(NODULE), None, ["A"])  # 27 > 25
    assert r2.n_detected == 0


def test_a_mark_on_two_nodules_is_a_hit_for_both() -> None:
    nodules = finds(NODULE, ("A", 6.0, 0.0, 0.0, 10.0))
    r = froc(marks(("A", 3.0, 0, 0, 0.9)), nodules, None, ["A"])
    assert (r.n_detected, r.n_false_positives, r.cpm) == (2, 0, 1.0)


def test_cpm_reads_the_interpolated_curve_at_the_seven_points() -> None:
    # 10 scans; 4 nodules (scans 0-3) found at 0.9, 0.7, 0.5, 0.3 and 4 false positives
    # at 0.8, 0.6, 0.4, 0.2. Descending: T F T F T F T F, so the curve's corners are
    # (FP/scan, sensitivity) = (0, 1/4), (0.1, 1/4), (0.1, 2/4), (0.2, 2/4), (0.2, 3/4),
    # (0.3, 3/4), (0.3, 1), (0.4, 1).
    # 1/8 lies between 0.1 and 0.2 at sensitivity 0.5; 1/4 between 0.2 and 0.3 at 0.75;
    # 1/2 and beyond lie past the last FP rate (0.4): the final sensitivity 1 holds.
    # CPM = (0.5 + 0.75 + 5 × 1) / 7 = 6.25 / 7.
    rows, nodules = [], []
    for i, (tp, fp) in enumerate([(0.9, 0.8), (0.7, 0.6), (0.5, 0.4), (0.3, 0.2)]):
        nodules.append((f"S{i}", 0.0, 0.0, 0.0, 10.0))
        rows += [(f"S{i}", 0.0, 0.0, 0.0, tp), (f"S{i}", 100.0, 0.0, 0.0, fp)]
    r = froc(marks(*rows), finds(*nodules), None, [f"S{i}" for i in range(10)])
    assert r.sensitivities == {
        0.125: 0.5,
        0.25: 0.75,
        0.5: 1.0,
        1.0: 1.0,
        2.0: 1.0,
        4.0: 1.0,
        8.0: 1.0,
    }
    assert r.cpm == pytest.approx(6.25 / 7)
    # Over 20 scans the same marks give half the FP rates: corners at 0.05, 0.1, 0.15, 0.2.
    r20 = froc(marks(*rows), finds(*nodules), None, [f"S{i}" for i in range(20)])
    assert r20.sensitivities[0.125] == 0.75  # between (0.1, 3/4) and (0.15, 3/4)


def test_no_nodules_gives_nan_and_no_marks_gives_zero() -> None:
    assert np.isnan(froc(marks(("A", 0, 0, 0, 0.5)), finds(), None, ["A"]).cpm)
    assert froc(marks(), finds(NODULE), None, ["A"]).cpm == 0.0


def test_files_and_command_line_score_the_same(tmp_path: Path) -> None:
    m = marks(("A", 0.0, 0, 0, 0.9), ("A", 50.0, 0, 0, 0.8), ("B", 1.0, 2.0, 3.0, 0.4))
    m.to_csv(tmp_path / "sub.csv", index=False)
    finds(NODULE, ("B", 1.0, 2.0, 3.5, 8.0)).to_csv(tmp_path / "ann.csv", index=False)
    finds().to_csv(tmp_path / "exc.csv", index=False)
    (tmp_path / "uids.csv").write_text("A\nB\nC\n")
    expected = froc(m, finds(NODULE, ("B", 1.0, 2.0, 3.5, 8.0)), None, ["A", "B", "C"])
    got = score_files(
        tmp_path / "sub.csv", tmp_path / "ann.csv", tmp_path / "exc.csv", tmp_path / "uids.csv"
    )
    assert got.cpm == expected.cpm and got.sensitivities == expected.sensitivities
    cmd = [
        sys.executable,
        "-m",
        "medlit.metrics.froc",
        str(tmp_path / "sub.csv"),
        "--annotations",
        str(tmp_path / "ann.csv"),
        "--seriesuids",
        str(tmp_path / "uids.csv"),
        "--plot",
        str(tmp_path / "froc.png"),
    ]
    done = subprocess.run(cmd, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert f"CPM: {expected.cpm!r}" in done.stdout
    assert (tmp_path / "froc.png").stat().st_size > 0
    bad = m.astype(object)
    bad.loc[1, "coordY"] = "n/a"
    bad.to_csv(tmp_path / "sub.csv", index=False)
    done = subprocess.run(cmd, capture_output=True, text=True)
    assert done.returncode == 2
    assert "sub.csv: line 3: coordY = 'n/a' is not a finite number" in done.stderr
