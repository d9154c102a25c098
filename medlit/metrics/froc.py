"""LUNA16 FROC and CPM, computed by the rules of the official ``noduleCADEvaluationLUNA16.py``.

The inputs use the official column names: CAD marks ``seriesuid,coordX,coordY,coordZ,
probability``; included nodules (``annotations.csv``) and excluded findings
(``annotations_excluded.csv``) ``seriesuid,coordX,coordY,coordZ,diameter_mm``, all in world
millimetres; and the list of evaluated scans (``seriesuids.csv``).

Rules, per evaluated scan:

* Marks of scans that are not evaluated are ignored. Every evaluated scan counts in the
  number of scans, with or without marks or nodules. A seriesuid listed twice counts once
  (the official script would count it twice).
* **100-mark cap**: a scan with more than 100 marks keeps only those whose probability is
  strictly above the 101st highest one (``sorted(p, reverse=True)[100]``); marks tied at that
  value are all dropped, so at most 100 stay.
* A mark **hits** a finding when its squared 3D world distance to the finding's centre is
  strictly below (diameter / 2)²; a negative diameter stands for 10 mm.
* An **included** nodule with hits is detected once, at the highest probability of its
  hits; every hit leaves the false-positive list (a mark on two nodules is a hit for both).
  A nodule without hits is **missed**: it still counts in the number of nodules, so the
  sensitivity cannot reach 1.
* Hits on **excluded** findings are ignored: neither detection nor false positive.
* Every other kept mark is a **false positive**.

The curve: ``fpr, tpr, thresholds = sklearn.metrics.roc_curve`` over the detected nodules
(label 1, their probability) and the false positives (label 0); FP/scan = ``fpr`` × false
positives / scans (all zeros when there is no false positive, as in the official script);
sensitivity = ``tpr`` × detected / nodules.

**How the curve is read at the 7 operating points** (1/8, 1/4, 1/2, 1, 2, 4 and 8 FP/scan):
by linear interpolation, ``np.interp(point, fps, sens)``. This is the interpolation the
official script applies to the curve it draws (``np.interp(fps_itp, fps, sens)`` with
``fps_itp = np.linspace(0.125, 8, 10001)``); medlit reads it exactly at the 7 points rather
than at the nearest grid value. ``np.interp`` clamps: beyond the largest FP rate reached the
final sensitivity holds, below the smallest the first one. Where the curve jumps (several
points at one FP rate) ``np.interp`` returns the top of the jump. The CPM is the mean of the
7 sensitivities.

Degenerate cases (no warning escapes, nothing raises):

* no included nodule in the evaluated scans: the sensitivity is undefined, the 7
  sensitivities and the CPM are NaN and the curve is empty;
* nodules but no detection (no marks, or only missed nodules): sensitivity 0 everywhere,
  CPM 0.0.

Command line::

    python -m medlit.metrics.froc SUBMISSION.csv --annotations annotations.csv \\
        --excluded annotations_excluded.csv --seriesuids seriesuids.csv [--plot froc.png]
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import sys
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from sklearn.exceptions import UndefinedMetricWarning
from sklearn.metrics import roc_curve

from medlit.errors import MedlitError

FROC_POINTS: tuple[float, ...] = (0.125, 0.25, 0.5, 1.0, 2.0, 4.0, 8.0)
"""The operating points of the CPM, in false positives per scan."""
MAX_MARKS = 100
"""The per-scan cap of the LUNA16 evaluation."""
MISSING_DIAMETER_MM = 10.0
"""The diameter used for a finding whose ``diameter_mm`` is negative."""
MARK_COLUMNS: tuple[str, ...] = ("seriesuid", "coordX", "coordY", "coordZ", "probability")
FINDING_COLUMNS: tuple[str, ...] = ("seriesuid", "coordX", "coordY", "coordZ", "diameter_mm")

_POINT_LABELS = ("1/8", "1/4", "1/2", "1", "2", "4", "8")


@dataclass(frozen=True)
class FROCResult:
    """The FROC curve and its reading at the 7 LUNA16 operating points.

    Attributes:
        fps: false positives per scan along the curve (non-decreasing).
        sensitivity: the sensitivity at each point of ``fps``.
        thresholds: the probability threshold of each point (``inf`` first).
        sensitivities: the sensitivity read at each of :data:`FROC_POINTS`.
        cpm: the competition performance metric, mean of ``sensitivities``.
        n_scans: evaluated scans, with or without marks.
        n_nodules: included nodules in the evaluated scans (missed ones included).
        n_detected: included nodules with at least one hit among the marks kept by the cap.
        n_false_positives: kept marks that hit no finding.
    """

    fps: np.ndarray
    sensitivity: np.ndarray
    thresholds: np.ndarray
    sensitivities: dict[float, float]
    cpm: float
    n_scans: int
    n_nodules: int
    n_detected: int
    n_false_positives: int

    def metrics(self, prefix: str = "") -> dict[str, float]:
        """Scalars for logging, under names MLflow accepts.

        Args:
            prefix: prepended as is to every name, e.g. ``"val/"``.

        Returns:
            ``cpm``; ``sens_at_0.125fp``, ``sens_at_0.25fp``, ``sens_at_0.5fp``,
            ``sens_at_1fp`` ... ``sens_at_8fp``; ``nodules_detected`` and
            ``false_positives_per_scan``.
        """
        out = {"cpm": self.cpm}
        out.update({f"sens_at_{p:g}fp": s for p, s in self.sensitivities.items()})
        out["nodules_detected"] = float(self.n_detected)
        out["false_positives_per_scan"] = self.n_false_positives / max(self.n_scans, 1)
        return {f"{prefix}{k}": float(v) for k, v in out.items()}

    def plot(self, path: str | Path) -> None:
        """Save the FROC curve as a PNG.

        Log-2 FP/scan axis from 1/8 to 8, the 7 operating points marked, the CPM in the
        title. Uses matplotlib's Agg canvas directly (pyplot's global backend is left
        alone) and its bundled font.

        Args:
            path: where the PNG goes.
        """
        from matplotlib.figure import Figure
        from matplotlib.ticker import NullFormatter, NullLocator

        fig = Figure(figsize=(6, 4.5), dpi=100)
        ax = fig.subplots()
        if self.fps.size:
            grid = np.geomspace(FROC_POINTS[0], FROC_POINTS[-1], 512)
            ax.plot(grid, np.interp(grid, self.fps, self.sensitivity), lw=2, label="FROC")
        points = [self.sensitivities[p] for p in FROC_POINTS]
        ax.plot(FROC_POINTS, points, "o", color="tab:red", label="operating points")
        ax.set_xscale("log", base=2)
        ax.set_xlim(FROC_POINTS[0], FROC_POINTS[-1])
        ax.set_xticks(FROC_POINTS, labels=_POINT_LABELS)
        ax.xaxis.set_minor_locator(NullLocator())
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.set_ylim(0, 1)
        ax.set_yticks(np.linspace(0, 1, 11))
        ax.set_xlabel("average number of false positives per scan")
        ax.set_ylabel("sensitivity")
        ax.grid(alpha=0.3)
        ax.legend(loc="lower right")
        ax.set_title(
            f"FROC - CPM {self.cpm:.4f} ({self.n_detected}/{self.n_nodules} nodules, "
            f"{self.n_scans} scans)",
            fontsize=10,
        )
        fig.tight_layout()
        fig.savefig(path, format="png")


# ---- scoring --------------------------------------------------------------------------------


def cap_marks(probabilities: np.ndarray, max_marks: int = MAX_MARKS) -> np.ndarray:
    """The marks of one scan that the official cap keeps.

    Args:
        probabilities: the probabilities of the scan's marks.
        max_marks: the cap; 0 or less keeps every mark.

    Returns:
        A boolean mask: all True with at most ``max_marks`` marks, otherwise True where the
        probability is strictly above the ``max_marks + 1``-th highest one.
    """
    probabilities = np.asarray(probabilities, dtype=float)
    if max_marks <= 0 or len(probabilities) <= max_marks:
        return np.ones(len(probabilities), dtype=bool)
    threshold = -np.sort(-probabilities)[max_marks]
    return probabilities > threshold


def _columns(
    table: pd.DataFrame | None, columns: Sequence[str], name: str
) -> tuple[np.ndarray, np.ndarray]:
    """``(seriesuids, values)`` of a table, its columns and numbers checked."""
    if table is None or (len(table) == 0 and not set(columns) <= set(table.columns)):
        return np.zeros(0, dtype=object), np.zeros((0, len(columns) - 1))
    if missing := [c for c in columns if c not in table.columns]:
        raise MedlitError(
            f"{name}: column(s) {missing} missing; expected {list(columns)} "
            f"(found {list(table.columns)})"
        )
    uids = table["seriesuid"].astype(str).to_numpy()
    try:
        values = table[list(columns[1:])].to_numpy(dtype=float)
    except (TypeError, ValueError) as e:
        raise MedlitError(f"{name}: {list(columns[1:])} must be numbers ({e})") from e
    if not (finite := np.isfinite(values)).all():
        row, col = np.argwhere(~finite)[0]
        raise MedlitError(
            f"{name}: row {table.index[row]!r}: {columns[1 + col]} = {values[row, col]} "
            "is not a finite number"
        )
    return uids, values


def _group(
    uids: np.ndarray, values: np.ndarray, scans: list[str]
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Rows of the evaluated scans, sorted by scan: ``(codes, values, starts)``.

    ``starts[i]:starts[i + 1]`` are the rows of ``scans[i]``.
    """
    codes = pd.Categorical(uids, categories=scans).codes.astype(np.int64)
    rows = np.flatnonzero(codes >= 0)
    rows = rows[np.argsort(codes[rows], kind="stable")]
    codes, values = codes[rows], values[rows]
    starts = np.searchsorted(codes, np.arange(len(scans) + 1))
    return codes, values, starts


def _hits(findings: np.ndarray, xyz: np.ndarray) -> np.ndarray:
    """``(findings, marks)`` booleans: squared world distance strictly below radius²."""
    diameter = findings[:, 3]
    radius2 = (np.where(diameter < 0, MISSING_DIAMETER_MM, diameter) / 2.0) ** 2
    d = findings[:, None, :3] - xyz[None, :, :]
    dist2 = d[..., 0] ** 2 + d[..., 1] ** 2 + d[..., 2] ** 2
    return dist2 < radius2[:, None]


def froc(
    marks: pd.DataFrame,
    annotations: pd.DataFrame,
    excluded: pd.DataFrame | None,
    seriesuids: Sequence[str],
    max_marks: int = MAX_MARKS,
) -> FROCResult:
    """Score CAD marks against the LUNA16 reference, as the official script does.

    The rules (100-mark cap, strict hit radius, double hits, excluded findings, missed
    nodules) and the degenerate cases are listed in the module docstring.

    How the curve is read at the 7 operating points: each sensitivity is
    ``np.interp(point, fps, sens)`` for ``point`` in :data:`FROC_POINTS` (1/8 ... 8 FP/scan),
    the linear interpolation the official script draws, read exactly at the point; beyond
    the last FP rate the final sensitivity holds. The CPM is their mean.

    Vectorised per scan: a full LUNA16 submission (888 scans × 100 marks) scores in about a
    tenth of a second.

    Args:
        marks: ``seriesuid,coordX,coordY,coordZ,probability`` (world mm); other columns are
            ignored.
        annotations: included nodules, ``seriesuid,coordX,coordY,coordZ,diameter_mm``.
        excluded: findings that count neither as hit nor as false positive (same columns),
            or None.
        seriesuids: every evaluated scan; marks and findings of other scans are ignored.
        max_marks: the per-scan cap (100 in LUNA16; 0 or less: no cap).

    Returns:
        The curve, the 7 sensitivities, the CPM and the counts.

    Raises:
        MedlitError: a table lacks a column or holds a non-numeric or non-finite value.
    """
    scans = list(dict.fromkeys(str(u) for u in seriesuids))
    n = len(scans)
    m_codes, m_values, _ = _group(*_columns(marks, MARK_COLUMNS, "marks"), scans)
    _, inc, inc_starts = _group(*_columns(annotations, FINDING_COLUMNS, "annotations"), scans)
    _, exc, exc_starts = _group(*_columns(excluded, FINDING_COLUMNS, "excluded"), scans)

    # The cap, for every scan at once: order by scan, then by probability descending.
    probs = m_values[:, 3]
    order = np.lexsort((-probs, m_codes))
    m_codes, m_values, probs = m_codes[order], m_values[order], probs[order]
    if max_marks > 0 and len(probs):
        counts = np.bincount(m_codes, minlength=n)
        first = np.concatenate(([0], np.cumsum(counts)[:-1]))
        threshold = np.full(n, -np.inf)
        over = counts > max_marks
        threshold[over] = probs[first[over] + max_marks]
        keep = probs > threshold[m_codes]
        m_codes, m_values, probs = m_codes[keep], m_values[keep], probs[keep]
    m_starts = np.searchsorted(m_codes, np.arange(n + 1))
    xyz = m_values[:, :3]

    # Hits, only in the scans that have both marks and findings.
    false_positive = np.ones(len(probs), dtype=bool)
    detected: list[np.ndarray] = []
    n_findings = np.diff(inc_starts) + np.diff(exc_starts)
    for i in np.flatnonzero((n_findings > 0) & (np.diff(m_starts) > 0)):
        lo, hi = m_starts[i], m_starts[i + 1]
        nodules = _hits(inc[inc_starts[i] : inc_starts[i + 1]], xyz[lo:hi])
        ignored = _hits(exc[exc_starts[i] : exc_starts[i + 1]], xyz[lo:hi])
        found = nodules.any(axis=1)
        detected.append(np.where(nodules, probs[lo:hi], -np.inf).max(axis=1)[found])
        false_positive[lo:hi] &= ~(nodules.any(axis=0) | ignored.any(axis=0))
    tp = np.concatenate(detected) if detected else np.zeros(0)
    return _curve(tp, probs[false_positive], n_nodules=len(inc), n_scans=n)


def _curve(tp: np.ndarray, fp: np.ndarray, n_nodules: int, n_scans: int) -> FROCResult:
    """The official ``computeFROC`` on the detected nodules' and false positives' scores."""
    n_tp, n_fp = len(tp), len(fp)
    if n_nodules == 0:
        nan = float("nan")
        empty = np.zeros(0)
        points = dict.fromkeys(FROC_POINTS, nan)
        return FROCResult(empty, empty, empty, points, nan, n_scans, 0, 0, n_fp)
    if n_tp + n_fp == 0:  # nothing to rank: a single point at the origin
        fps, sens, thresholds = np.zeros(1), np.zeros(1), np.full(1, np.inf)
    else:
        truth = np.concatenate((np.ones(n_tp), np.zeros(n_fp)))
        with warnings.catch_warnings():
            # Only one class present: sklearn warns and returns NaN rates for the missing
            # class; the official border cases below replace them.
            warnings.simplefilter("ignore", UndefinedMetricWarning)
            fpr, tpr, thresholds = roc_curve(truth, np.concatenate((tp, fp)))
        fps = np.zeros(len(fpr)) if n_fp == 0 else fpr * n_fp / n_scans
        sens = np.zeros(len(tpr)) if n_tp == 0 else tpr * n_tp / n_nodules
    points = {p: float(np.interp(p, fps, sens)) for p in FROC_POINTS}
    cpm = float(np.mean(list(points.values())))
    return FROCResult(fps, sens, thresholds, points, cpm, n_scans, n_nodules, n_tp, n_fp)


# ---- files ----------------------------------------------------------------------------------


def _floats(cells: list[str]) -> np.ndarray:
    """``float`` of each cell (as the official script parses), NaN where it fails."""
    try:
        return np.fromiter(map(float, cells), dtype=np.float64, count=len(cells))
    except ValueError:
        values = np.full(len(cells), np.nan)
        for i, cell in enumerate(cells):
            with contextlib.suppress(ValueError):
                values[i] = float(cell)
        return values


def read_csv(path: str | Path, columns: Sequence[str]) -> pd.DataFrame:
    """Read an official LUNA16 CSV (header line first), checked.

    Parsed like the official script (``csv.reader`` and ``float``); blank lines are skipped
    and other columns ignored. This is the scorer's reader, on purpose not the dataset's
    (:func:`medlit.datasets.luna16.source.read_table`): a submission is scored as the official
    script reads it (extra columns, any column order, the first bad row fails the whole
    file), whereas the dataset's own CSVs must have the exact official header and a run
    reports every bad row.

    Args:
        path: the CSV file.
        columns: the columns it must have, ``seriesuid`` first, numbers after.

    Returns:
        ``columns`` only: ``seriesuid`` as stripped strings, the others as floats.

    Raises:
        MedlitError: naming the file: it is missing or unreadable, a column is missing, or
            (with its 1-based line) a row is short or a value is not a finite number.
    """
    path = Path(path)
    if not path.is_file():
        raise MedlitError(f"{path}: no such file")
    rows: list[list[str]] = []
    lines: list[int] = []
    try:
        with path.open(newline="", encoding="utf-8-sig") as f:
            reader = csv.reader(f)
            header = [h.strip() for h in next(reader, [])]
            if missing := [c for c in columns if c not in header]:
                raise MedlitError(
                    f"{path}: line 1: column(s) {missing} missing; expected "
                    f"{','.join(columns)} (found {','.join(header) or 'an empty file'})"
                )
            index = [header.index(c) for c in columns]
            width = max(index) + 1
            for row in reader:
                if len(row) < width:
                    if not any(cell.strip() for cell in row):
                        continue  # a blank line
                    raise MedlitError(
                        f"{path}: line {reader.line_num}: {len(row)} field(s), "
                        f"expected {len(header)}"
                    )
                rows.append(row)
                lines.append(reader.line_num)
    except (UnicodeDecodeError, csv.Error) as e:
        raise MedlitError(f"{path}: unreadable CSV ({e})") from e
    table = pd.DataFrame(
        {"seriesuid": pd.Series([r[index[0]].strip() for r in rows], dtype=object)}
    )
    for name, j in zip(columns[1:], index[1:], strict=True):
        cells = [r[j] for r in rows]
        values = _floats(cells)
        if not (finite := np.isfinite(values)).all():
            i = int(np.flatnonzero(~finite)[0])
            raise MedlitError(
                f"{path}: line {lines[i]}: {name} = {cells[i]!r} is not a finite number"
            )
        table[name] = values
    return table


def read_seriesuids(path: str | Path) -> list[str]:
    """The evaluated scans: the first field of each line.

    The official ``seriesuids.csv`` has no header; a first line ``seriesuid`` is skipped.
    Blank lines are skipped.

    Raises:
        MedlitError: naming the file when it is missing, unreadable or lists no scan.
    """
    path = Path(path)
    if not path.is_file():
        raise MedlitError(f"{path}: no such file")
    try:
        with path.open(newline="", encoding="utf-8-sig") as f:
            uids = [row[0].strip() for row in csv.reader(f) if row and row[0].strip()]
    except (UnicodeDecodeError, csv.Error) as e:
        raise MedlitError(f"{path}: unreadable CSV ({e})") from e
    if uids and uids[0] == "seriesuid":
        uids = uids[1:]
    if not uids:
        raise MedlitError(f"{path}: lists no seriesuid")
    return uids


def score_files(
    submission: str | Path,
    annotations: str | Path,
    excluded: str | Path | None,
    seriesuids: str | Path,
    max_marks: int = MAX_MARKS,
) -> FROCResult:
    """Score a submission CSV from the files alone, as the challenge does.

    Args:
        submission: ``seriesuid,coordX,coordY,coordZ,probability``.
        annotations: the included nodules (``annotations.csv``).
        excluded: the excluded findings (``annotations_excluded.csv``), or None.
        seriesuids: the evaluated scans, one per line (``seriesuids.csv``).
        max_marks: the per-scan cap.

    Raises:
        MedlitError: a file is missing or malformed (the message names it and the line).
    """
    return froc(
        read_csv(submission, MARK_COLUMNS),
        read_csv(annotations, FINDING_COLUMNS),
        read_csv(excluded, FINDING_COLUMNS) if excluded is not None else None,
        read_seriesuids(seriesuids),
        max_marks=max_marks,
    )


def main(argv: Sequence[str] | None = None) -> int:
    """The command line; returns the exit status (2 on a :class:`MedlitError`)."""
    parser = argparse.ArgumentParser(
        prog="python -m medlit.metrics.froc",
        description="LUNA16 FROC and CPM of a submission CSV (official evaluation rules).",
    )
    parser.add_argument("submission", help="CSV: seriesuid,coordX,coordY,coordZ,probability")
    parser.add_argument("--annotations", required=True, help="included nodules CSV")
    parser.add_argument("--excluded", default=None, help="excluded findings CSV")
    parser.add_argument("--seriesuids", required=True, help="evaluated scans, one per line")
    parser.add_argument("--max-marks", type=int, default=MAX_MARKS, help="per-scan cap")
    parser.add_argument("--plot", default=None, help="write the FROC curve PNG here")
    args = parser.parse_args(argv)
    try:
        result = score_files(
            args.submission, args.annotations, args.excluded, args.seriesuids, args.max_marks
        )
    except MedlitError as e:
        print(f"medlit: error: {e}", file=sys.stderr)
        return 2
    print(
        f"scans {result.n_scans}  nodules {result.n_nodules}  detected {result.n_detected}  "
        f"false positives {result.n_false_positives}"
    )
    for p, s in result.sensitivities.items():
        print(f"sensitivity at {p:g} FP/scan: {s:.6f}")
    print(f"CPM: {result.cpm!r}")
    if args.plot:
        result.plot(args.plot)
    return 0


if __name__ == "__main__":
    sys.exit(main())
