"""Postprocessing of segmentations, chosen on out-of-fold predictions (``medlit.cv``).

The steps act on a case's (R, Z, Y, X) boolean evaluation regions, with 26-connected
components (:func:`~medlit.metrics.segmentation.connected_components`, as nnU-Net labels
them):

* keep the largest component of all foreground (the union of the regions): every region
  is cleared outside it;
* keep the largest component of one region;
* remove the components of one region smaller than a volume (mm³): medlit's addition,
  the one step that removes a lone false-positive speck (an enhancing-tumour voxel in a
  case without enhancement), which keeping the largest component cannot.

:func:`choose` tries them in that order on the out-of-fold cases, as nnU-Net's
``determine_postprocessing`` does: a step is kept only if the mean of the metric over the
regions improves and no region's mean gets worse; the minimum volume is the best of a
small grid of voxel counts (times the cases' median voxel volume). The chosen steps
(:class:`Postprocessing`) are recorded on the cross-validation's parent run and applied
by ``medlit.predict`` and ``medlit.evaluate`` to its ensemble.

Written here rather than taken from nnU-Net: its postprocessing reads and writes files
per label (its own folder layout and plans), knows neither regions named by the task nor
a minimum volume, and would re-read every prediction for every candidate; here each
region of each case is labelled once and every candidate is scored from the components'
sizes and overlaps with the reference.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from medlit.errors import ConfigError
from medlit.metrics.segmentation import connected_components

# Minimum component sizes tried, in voxels of the out-of-fold cases' grid.
MIN_VOXELS = (2, 5, 10, 20, 50, 100, 200, 500)


def _dice(inter: float, pred: float, ref: float) -> float:
    return 1.0 if pred + ref == 0 else 2.0 * inter / (pred + ref)


def _jaccard(inter: float, pred: float, ref: float) -> float:
    union = pred + ref - inter
    return 1.0 if union == 0 else inter / union


METRICS: dict[str, Callable[[float, float, float], float]] = {
    "dice": _dice,
    "jaccard": _jaccard,
}


@dataclass(frozen=True)
class Postprocessing:
    """The chosen steps. ``min_volume_mm3``: region -> smallest component kept (mm³)."""

    regions: tuple[str, ...]
    keep_largest_foreground: bool = False
    keep_largest: tuple[str, ...] = ()
    min_volume_mm3: dict[str, float] = field(default_factory=dict)

    @property
    def empty(self) -> bool:
        return not (self.keep_largest_foreground or self.keep_largest or self.min_volume_mm3)

    def apply(self, regions: np.ndarray, spacing: Sequence[float]) -> np.ndarray:
        """(R, ...) boolean regions, postprocessed (a new array; the input is kept)."""
        if len(regions) != len(self.regions):
            raise ConfigError(
                f"the postprocessing was chosen for the regions {list(self.regions)}; the "
                f"model predicts {len(regions)}"
            )
        out = np.array(regions, dtype=bool, copy=True)
        if self.empty:
            return out
        if self.keep_largest_foreground:
            out &= _largest(out.any(0))[None]
        voxel = float(np.prod(spacing))
        for k, name in enumerate(self.regions):
            if name in self.keep_largest:
                out[k] = _largest(out[k])
            if name in self.min_volume_mm3:
                labels, n = connected_components(out[k])
                if n:
                    sizes = np.bincount(labels.ravel(), minlength=n + 1) * voxel
                    small = np.flatnonzero(sizes < self.min_volume_mm3[name])
                    out[k][np.isin(labels, small[small > 0])] = False
        return out

    def describe(self) -> str:
        if self.empty:
            return "none"
        parts = ["largest component of all foreground"] if self.keep_largest_foreground else []
        parts += [f"largest component of {r}" for r in self.keep_largest]
        parts += [f"{r} components < {v:.4g} mm³ removed" for r, v in self.min_volume_mm3.items()]
        return "; ".join(parts)

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2)

    @classmethod
    def from_json(cls, text: str, where: str = "postprocessing") -> Postprocessing:
        try:
            raw = json.loads(text)
            return cls(
                regions=tuple(raw["regions"]),
                keep_largest_foreground=bool(raw.get("keep_largest_foreground", False)),
                keep_largest=tuple(raw.get("keep_largest", ())),
                min_volume_mm3={str(k): float(v) for k, v in raw.get("min_volume_mm3", {}).items()},
            )
        except (ValueError, KeyError, TypeError) as e:
            raise ConfigError(f"{where}: not a medlit postprocessing file ({e})") from None

    @classmethod
    def read(cls, path: Path) -> Postprocessing:
        try:
            return cls.from_json(path.read_text(), str(path))
        except OSError as e:
            raise ConfigError(f"{path}: cannot read the postprocessing ({e.strerror})") from None


def _largest(mask: np.ndarray) -> np.ndarray:
    labels, n = connected_components(mask)
    if n <= 1:
        return np.asarray(mask, bool)
    sizes = np.bincount(labels.ravel())
    sizes[0] = 0
    return labels == int(sizes.argmax())


@dataclass
class _Region:
    """One region of one case as its components: each one's size and overlap with the
    reference (voxels), and the reference's size."""

    sizes: np.ndarray
    overlaps: np.ndarray
    ref: int

    @classmethod
    def of(cls, pred: np.ndarray, ref: np.ndarray) -> _Region:
        labels, n = connected_components(pred)
        sizes = np.bincount(labels.ravel(), minlength=n + 1)[1:]
        overlaps = np.bincount(labels[ref].ravel(), minlength=n + 1)[1:]
        return cls(sizes, overlaps, int(ref.sum()))

    def score(self, metric: Callable, kept: np.ndarray | None = None) -> float:
        k = np.ones(len(self.sizes), bool) if kept is None else kept
        return metric(float(self.overlaps[k].sum()), float(self.sizes[k].sum()), float(self.ref))

    def largest(self) -> np.ndarray:
        kept = np.zeros(len(self.sizes), bool)
        if len(self.sizes):
            kept[int(self.sizes.argmax())] = True
        return kept


@dataclass
class Case:
    """An out-of-fold case: predicted and reference regions (R, Z, Y, X), voxel size (mm)."""

    case_id: str
    pred: np.ndarray
    ref: np.ndarray
    spacing: tuple[float, ...]


def save_case(
    folder: Path,
    case_id: str,
    pred: np.ndarray,
    ref: np.ndarray,
    spacing: Sequence[float],
    names: Sequence[str],
) -> None:
    """One case's predicted and reference regions (named ``names``), for :func:`choose`
    (written whole or not at all)."""
    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / f".{case_id}.tmp.npz"
    np.savez_compressed(
        tmp,
        pred=np.asarray(pred, bool),
        ref=np.asarray(ref, bool),
        spacing=np.asarray(spacing, float),
        names=np.asarray(list(names)),
    )
    tmp.replace(folder / f"{case_id}.npz")


def load_cases(folders: Sequence[Path]) -> tuple[list[Case], list[str]]:
    """The cases :func:`save_case` kept in ``folders``, and their regions' names."""
    cases, names = [], None
    for folder in folders:
        for path in sorted(folder.glob("*.npz")):
            if path.name.startswith("."):
                continue
            with np.load(path) as z:
                cases.append(
                    Case(path.stem, z["pred"], z["ref"], tuple(float(s) for s in z["spacing"]))
                )
                names = [str(n) for n in z["names"]]
    return cases, names or []


def choose(
    cases: Sequence[Case], names: Sequence[str], metric: str = "dice"
) -> tuple[Postprocessing, pd.DataFrame]:
    """The postprocessing that the out-of-fold ``cases`` support, and the table of every
    step tried: its metric per region (mean over cases) before and after, and whether it
    was kept."""
    if metric not in (*METRICS, "lesion_dice"):
        raise ConfigError(
            f"postprocessing metric {metric!r}: use one of {sorted((*METRICS, 'lesion_dice'))}"
        )
    if not cases:
        raise ConfigError("no out-of-fold segmentations to choose the postprocessing on")
    if metric == "lesion_dice":
        return _choose_by_lesions(cases, list(names))
    fn = METRICS[metric]
    names = list(names)
    preds = [np.asarray(c.pred, bool) for c in cases]
    refs = [np.asarray(c.ref, bool) for c in cases]
    rows: list[dict] = []

    def per_region(masks: list[np.ndarray]) -> np.ndarray:
        """(cases, R) scores of ``masks`` as predicted."""
        return np.array(
            [
                [fn(*_counts(m[k], r[k])) for k in range(len(names))]
                for m, r in zip(masks, refs, strict=True)
            ]
        )

    def record(
        step: str, region: str, setting: str, before: np.ndarray, after: np.ndarray, kept: bool
    ) -> None:
        row = {"step": step, "region": region, "setting": setting, "kept": kept}
        for k, n in enumerate(names):
            row[f"{metric}_{n}_before"] = float(before[k])
            row[f"{metric}_{n}_after"] = float(after[k])
        row[f"{metric}_mean_before"] = float(before.mean())
        row[f"{metric}_mean_after"] = float(after.mean())
        rows.append(row)

    current = per_region(preds).mean(0)
    start = current.copy()
    # 1. the largest component of all foreground
    fg = [m & _largest(m.any(0))[None] for m in preds]
    after = per_region(fg).mean(0)
    keep_fg = _better(after, current)
    record("keep_largest", "all foreground", "", current, after, keep_fg)
    if keep_fg:
        preds, current = fg, after
    # 2. per region: its largest component, then the smallest volume kept
    regions = [
        [_Region.of(m[k], r[k]) for m, r in zip(preds, refs, strict=True)]
        for k in range(len(names))
    ]
    voxel = float(np.median([np.prod(c.spacing) for c in cases]))
    largest: list[str] = []
    min_volume: dict[str, float] = {}
    for k, name in enumerate(names):
        comps = regions[k]
        kept = [np.ones(len(c.sizes), bool) for c in comps]
        trial = [c.largest() for c in comps]
        tried = np.array([c.score(fn, s) for c, s in zip(comps, trial, strict=True)])
        after = current.copy()
        after[k] = tried.mean()
        ok = _better(after, current)
        record("keep_largest", name, "", current, after, ok)
        if ok:
            largest.append(name)
            kept, current = trial, after
        best: tuple[float, float] | None = None  # (score, mm3)
        for n_vox in MIN_VOXELS:
            mm3 = n_vox * voxel
            trial = [
                s & (c.sizes * float(np.prod(case.spacing)) >= mm3)
                for c, s, case in zip(comps, kept, cases, strict=True)
            ]
            value = float(np.mean([c.score(fn, s) for c, s in zip(comps, trial, strict=True)]))
            if best is None or value > best[0]:
                best = (value, mm3)
        assert best is not None
        after = current.copy()
        after[k] = best[0]
        ok = _better(after, current)
        setting = f"{best[1]:.4g} mm³ ({best[1] / voxel:.0f} voxels)"
        record("min_volume", name, setting, current, after, ok)
        if ok:
            min_volume[name] = best[1]
            current = after
    chosen = Postprocessing(tuple(names), keep_fg, tuple(largest), min_volume)
    table = pd.DataFrame(rows)
    table.attrs["start"], table.attrs["end"] = start, current
    return chosen, table


def _choose_by_lesions(
    cases: Sequence[Case], names: list[str]
) -> tuple[Postprocessing, pd.DataFrame]:
    """:func:`choose` by BraTS 2023's lesion-wise Dice (GLI's dilation and threshold):
    the same steps, in the same order, with the same acceptance; each candidate applied
    to every case and scored whole, since removing a component changes which lesions a
    prediction matches, not only its overlap."""
    from medlit.metrics.brats_lesionwise import CHALLENGES, lesionwise_region

    dilation, threshold = CHALLENGES["BraTS-GLI"]

    def score(post: Postprocessing) -> np.ndarray:
        out = []
        for c in cases:
            pred = post.apply(c.pred, c.spacing)
            out.append(
                [
                    lesionwise_region(pred[k], c.ref[k], c.spacing, dilation, threshold, False).dice
                    for k in range(len(names))
                ]
            )
        return np.asarray(out).mean(0)

    rows: list[dict] = []

    def record(step: str, region: str, setting: str, before, after, kept: bool) -> None:
        row = {"step": step, "region": region, "setting": setting, "kept": kept}
        for k, n in enumerate(names):
            row[f"lesion_dice_{n}_before"] = float(before[k])
            row[f"lesion_dice_{n}_after"] = float(after[k])
        row["lesion_dice_mean_before"] = float(np.mean(before))
        row["lesion_dice_mean_after"] = float(np.mean(after))
        rows.append(row)

    chosen = Postprocessing(tuple(names))
    current = start = score(chosen)
    trial = Postprocessing(tuple(names), keep_largest_foreground=True)
    after = score(trial)
    ok = _better(after, current)
    record("keep_largest", "all foreground", "", current, after, ok)
    if ok:
        chosen, current = trial, after
    voxel = float(np.median([np.prod(c.spacing) for c in cases]))
    for name in names:
        trial = Postprocessing(
            tuple(names),
            chosen.keep_largest_foreground,
            (*chosen.keep_largest, name),
            dict(chosen.min_volume_mm3),
        )
        after = score(trial)
        ok = _better(after, current)
        record("keep_largest", name, "", current, after, ok)
        if ok:
            chosen, current = trial, after
        best: tuple[np.ndarray, float] | None = None
        for n_vox in MIN_VOXELS:
            mm3 = n_vox * voxel
            trial = Postprocessing(
                tuple(names),
                chosen.keep_largest_foreground,
                chosen.keep_largest,
                {**chosen.min_volume_mm3, name: mm3},
            )
            after = score(trial)
            if best is None or after.mean() > best[0].mean():
                best = (after, mm3)
        assert best is not None
        ok = _better(best[0], current)
        record(
            "min_volume",
            name,
            f"{best[1]:.4g} mm³ ({best[1] / voxel:.0f} voxels)",
            current,
            best[0],
            ok,
        )
        if ok:
            chosen = Postprocessing(
                tuple(names),
                chosen.keep_largest_foreground,
                chosen.keep_largest,
                {**chosen.min_volume_mm3, name: best[1]},
            )
            current = best[0]
    table = pd.DataFrame(rows)
    table.attrs["start"], table.attrs["end"] = start, current
    return chosen, table


def _counts(pred: np.ndarray, ref: np.ndarray) -> tuple[float, float, float]:
    return float((pred & ref).sum()), float(pred.sum()), float(ref.sum())


def _better(after: np.ndarray, before: np.ndarray) -> bool:
    """nnU-Net's acceptance: the mean improves and no region gets worse."""
    eps = 1e-12
    return bool(after.mean() > before.mean() + eps and (after >= before - eps).all())
