"""LUNA16 FROC and CPM, computed as the official ``noduleCADEvaluationLUNA16.py`` does.

Rules (per evaluated scan):

* **100-mark cap**: with more than 100 marks, only those whose probability is strictly
  above the 101st highest are kept (ties at that value are all dropped).
* A mark **hits** a finding when its squared world distance to the centre is strictly
  below (diameter / 2)²; a negative diameter means 10 mm.
* An **included** nodule with hits counts once, with its highest hit probability; all its
  hits leave the false-positive list (a mark on two nodules is a hit for both). A nodule
  without hits is **missed**: it still counts in the number of nodules.
* Hits on **excluded** findings are ignored: neither hit nor false positive.
* Every other kept mark is a **false positive**. Scans without marks still count.

The curve: ``fpr, tpr = sklearn.metrics.roc_curve`` over the detected nodules and false
positives; FP/scan = fpr · (number of false positives) / scans; sensitivity = tpr ·
detected / all nodules.

**How the curve is read at the 7 operating points** (1/8, 1/4, 1/2, 1, 2, 4, 8 FP/scan):
by linear interpolation of the curve, ``np.interp(point, fps, sens)`` — the interpolation
the official script applies to draw its curve (``np.interp(fps_itp, fps, sens)``) — read
exactly at each point instead of on its 10001-point grid. ``np.interp`` holds the last
sensitivity beyond the largest FP rate reached, and the first below the smallest. CPM is
the mean of the 7 sensitivities. With no nodule at all in the evaluated scans the
sensitivities are undefined and reported as NaN.

    python -m medlit.metrics.froc SUBMISSION.csv --annotations annotations.csv \
        --excluded annotations_excluded.csv --seriesuids seriesuids.csv [--plot froc.png]
"""

from __future__ import annotations

import argparse
import sys
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from sklearn.metrics import roc_curve

from medlit.errors import MedlitError

FROC_POINTS = (0.125, 0.25, 0.5, 1.0, 2.0, 4.0, 8.0)
MARK_COLUMNS = ("seriesuid", "coordX", "coordY", "coordZ", "probability")
FINDING_COLUMNS = ("seriesuid", "coordX", "coordY", "coordZ", "diameter_mm")
XYZ = ["coordX", "coordY", "coordZ"]


class ScoringInputError(MedlitError):
    """A submission, annotation or series-list file cannot be scored as it is."""


@dataclass(frozen=True)
class FROCResult:
    """The FROC curve and its reading at the 7 LUNA16 operating points."""

    fps: np.ndarray
    sensitivity: np.ndarray
    thresholds: np.ndarray
    sensitivities: dict[float, float]
    cpm: float
    n_scans: int
    n_nodules: int
    n_detected: int
    n_false_positives: int

    def metrics(self) -> dict[str, float]:
        """``cpm``, ``sens_at_<p>fp`` for the 7 points, and the counts, for logging."""
        out = {"cpm": self.cpm}
        out.update({f"sens_at_{p:g}fp": s for p, s in self.sensitivities.items()})
        out["nodules_detected"] = float(self.n_detected)
        out["false_positives_per_scan"] = self.n_false_positives / max(self.n_scans, 1)
        return out

    def plot(self, path: str | Path) -> None:
        """The FROC curve (log-2 FP axis, 1/8 to 8), the 7 points marked, CPM in the title."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(5, 4))
        grid = np.geomspace(FROC_POINTS[0], FROC_POINTS[-1], 200)
        if len(self.fps):
            ax.plot(grid, np.interp(grid, self.fps, self.sensitivity), lw=2)
        ax.plot(list(self.sensitivities), list(self.sensitivities.values()), "o")
        ax.set_xscale("log", base=2)
        ax.set_xticks(FROC_POINTS, ["1/8", "1/4", "1/2", "1", "2", "4", "8"])
        ax.set_xlim(FROC_POINTS[0], FROC_POINTS[-1])
        ax.set_ylim(0, 1)
        ax.set_xlabel("average false positives per scan")
        ax.set_ylabel("sensitivity")
        ax.grid(alpha=0.3)
        ax.set_title(
            f"FROC: CPM {self.cpm:.3f} ({self.n_detected}/{self.n_nodules} nodules, "
            f"{self.n_scans} scans)",
            fontsize=9,
        )
        fig.tight_layout()
        fig.savefig(path, dpi=100)
        plt.close(fig)


def _hits(marks_xyz: np.ndarray, findings: pd.DataFrame) -> np.ndarray:
    """(findings, marks) booleans: squared world distance < radius² (strict)."""
    if findings.empty or len(marks_xyz) == 0:
        return np.zeros((len(findings), len(marks_xyz)), bool)
    diameter = findings["diameter_mm"].to_numpy(float)
    radius2 = (np.where(diameter < 0, 10.0, diameter) / 2) ** 2
    d2 = ((findings[XYZ].to_numpy(float)[:, None, :] - marks_xyz[None]) ** 2).sum(-1)
    return d2 < radius2[:, None]


def cap_marks(probs: np.ndarray, max_marks: int = 100) -> np.ndarray:
    """Boolean mask of the marks the official script keeps (see the module docstring)."""
    if max_marks <= 0 or len(probs) <= max_marks:
        return np.ones(len(probs), bool)
    threshold = np.sort(probs)[::-1][max_marks]
    return probs > threshold


def froc(
    marks: pd.DataFrame,
    annotations: pd.DataFrame,
    excluded: pd.DataFrame | None,
    seriesuids: Sequence[str],
    max_marks: int = 100,
) -> FROCResult:
    """Score CAD marks against the reference of the scans ``seriesuids``.

    Args:
        marks: ``seriesuid,coordX,coordY,coordZ,probability`` (world mm).
        annotations: included nodules ``seriesuid,coordX,coordY,coordZ,diameter_mm``.
        excluded: findings that count neither as hit nor as false positive (same columns).
        seriesuids: every evaluated scan (marks of other scans are ignored).
        max_marks: the per-scan cap (100 in LUNA16).
    """
    uids = list(dict.fromkeys(seriesuids))
    wanted = set(uids)
    marks = marks[marks["seriesuid"].isin(wanted)]
    annotations = annotations[annotations["seriesuid"].isin(wanted)]
    excluded = (
        excluded[excluded["seriesuid"].isin(wanted)]
        if excluded is not None
        else annotations.iloc[:0]
    )
    by_scan = {u: g for u, g in marks.groupby("seriesuid", sort=False)}
    ann_by = {u: g for u, g in annotations.groupby("seriesuid", sort=False)}
    exc_by = {u: g for u, g in excluded.groupby("seriesuid", sort=False)}
    tp_probs: list[float] = []
    fp_probs: list[np.ndarray] = []
    n_nodules = 0
    for uid in uids:
        scan = by_scan.get(uid, marks.iloc[:0])
        probs = scan["probability"].to_numpy(float)
        keep = cap_marks(probs, max_marks)
        probs, xyz = probs[keep], scan[XYZ].to_numpy(float)[keep]
        nodules = ann_by.get(uid, annotations.iloc[:0])
        n_nodules += len(nodules)
        hit = _hits(xyz, nodules)
        for row in hit:
            if row.any():
                tp_probs.append(float(probs[row].max()))
        ignored = _hits(xyz, exc_by.get(uid, excluded.iloc[:0])).any(0)
        fp_probs.append(probs[~hit.any(0) & ~ignored])
    fps_all = np.concatenate(fp_probs) if fp_probs else np.zeros(0)
    return _curve(np.asarray(tp_probs), fps_all, n_nodules, len(uids))


def _curve(tp: np.ndarray, fp: np.ndarray, n_nodules: int, n_scans: int) -> FROCResult:
    detected = len(tp)
    nan = {p: float("nan") for p in FROC_POINTS}
    if n_nodules == 0:
        return FROCResult(
            np.zeros(0), np.zeros(0), np.zeros(0), nan, float("nan"), n_scans, 0, 0, len(fp)
        )
    if detected == 0:
        zero = {p: 0.0 for p in FROC_POINTS}
        fps = np.array([0.0, len(fp) / max(n_scans, 1)])
        return FROCResult(fps, np.zeros(2), np.zeros(0), zero, 0.0, n_scans, n_nodules, 0, len(fp))
    truth = np.r_[np.ones(detected), np.zeros(len(fp))]
    scores = np.r_[tp, fp]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # no negatives: fpr is NaN, handled below
        fpr, tpr, thresholds = roc_curve(truth, scores)
    # The official border case: a system without false positives has FP rate 0 throughout.
    fps = np.zeros(len(tpr)) if len(fp) == 0 else fpr * len(fp) / n_scans
    sens = tpr * detected / n_nodules
    points = {p: float(np.interp(p, fps, sens)) for p in FROC_POINTS}
    return FROCResult(
        fps,
        sens,
        thresholds,
        points,
        float(np.mean(list(points.values()))),
        n_scans,
        n_nodules,
        detected,
        len(fp),
    )


# ---- files -------------------------------------------------------------------------------


def read_csv(path: str | Path, columns: Sequence[str]) -> pd.DataFrame:
    """An official CSV with its columns checked and coordinates parsed; errors name the
    file and the 1-based line."""
    path = Path(path)
    if not path.is_file():
        raise ScoringInputError(f"{path} does not exist")
    try:
        raw = pd.read_csv(path, dtype=str, keep_default_na=False, skipinitialspace=True)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as e:
        raise ScoringInputError(f"{path}: unreadable CSV ({e})") from e
    raw.columns = [c.strip() for c in raw.columns]
    if missing := [c for c in columns if c not in raw.columns]:
        raise ScoringInputError(
            f"{path}: columns {missing} are missing (found {list(raw.columns)})"
        )
    table = pd.DataFrame({"seriesuid": raw["seriesuid"].str.strip()})
    for c in columns[1:]:
        values = pd.to_numeric(raw[c], errors="coerce").to_numpy(float)
        if not np.isfinite(values).all():
            i = int(np.flatnonzero(~np.isfinite(values))[0])
            raise ScoringInputError(
                f"{path}: line {i + 2}: {c} = {raw[c].iloc[i]!r} is not a finite number"
            )
        table[c] = values
    return table


def read_seriesuids(path: str | Path) -> list[str]:
    """One seriesuid per line (the official ``seriesuids.csv`` has no header)."""
    path = Path(path)
    if not path.is_file():
        raise ScoringInputError(f"{path} does not exist")
    lines = [ln.split(",")[0].strip() for ln in path.read_text().splitlines()]
    return [u for u in lines if u and u != "seriesuid"]


def score_files(
    submission: str | Path,
    annotations: str | Path,
    excluded: str | Path | None,
    seriesuids: str | Path,
) -> FROCResult:
    """Score a submission CSV from the files alone, as the challenge would."""
    return froc(
        read_csv(submission, MARK_COLUMNS),
        read_csv(annotations, FINDING_COLUMNS),
        read_csv(excluded, FINDING_COLUMNS) if excluded else None,
        read_seriesuids(seriesuids),
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m medlit.metrics.froc", description="LUNA16 FROC/CPM of a submission CSV"
    )
    parser.add_argument("submission", help="seriesuid,coordX,coordY,coordZ,probability")
    parser.add_argument("--annotations", required=True)
    parser.add_argument("--excluded", default=None)
    parser.add_argument("--seriesuids", required=True, help="evaluated scans, one per line")
    parser.add_argument("--plot", default=None, help="write the FROC curve PNG here")
    args = parser.parse_args(argv)
    try:
        result = score_files(args.submission, args.annotations, args.excluded, args.seriesuids)
    except MedlitError as e:
        print(f"medlit: error: {e}", file=sys.stderr)
        return 2
    print(f"scans {result.n_scans}  nodules {result.n_nodules}  detected {result.n_detected}")
    for p, s in result.sensitivities.items():
        print(f"sensitivity at {p:g} FP/scan: {s:.6f}")
    print(f"CPM: {result.cpm!r}")
    if args.plot:
        result.plot(args.plot)
    return 0


if __name__ == "__main__":
    sys.exit(main())
