"""BraTS 2023 lesion-wise Dice and HD95, as the challenge's metric code computes them.

    python -m medlit.metrics.brats_lesionwise PRED_DIR REF_DIR --output scores.csv
        [--challenge BraTS-GLI] [--labels auto|2023|2021] [--panoptic]

``--panoptic`` adds the newer scorer's panoptic columns per region
(``<R>_panoptic_pq_dsc``, ``_sq_dsc``, ``_sq_hd95`` and its matched ``_tp|fp|fn``),
computed by panoptica
(:mod:`medlit.metrics.brats_panoptic`, the ``lesions`` extra).

The rules follow the BraTS-2023-Metrics repository's ``eval.py`` (R. Saluja, used by the
BraTS 2023/2024 evaluation), per region (WT = labels 1, 2, 3; TC = 1, 3; ET = 3 in the
2023 labels; earlier releases' ET = 4 is remapped):

* Reference lesions: the reference is dilated ``dilation`` times with the 18-neighbour
  structuring element (``generate_binary_structure(3, 2)``), its 26-connected components
  group the reference voxels (lesions closer than the dilation count as one).
* Predicted components: 26-connected
  (:func:`~medlit.metrics.segmentation.connected_components`).
* For each reference lesion, its own dilation (same element, same count) picks the
  predicted components that touch it (true positives; one component may serve two
  lesions); the lesion's Dice and HD95 are those of the lesion against the union of the
  components it picked; a lesion with none is missed: Dice 0, HD95 374.
* A predicted component that touches no lesion is a false positive: Dice 0, HD95 374,
  counted at any size.
* Reference lesions of ``threshold`` mm³ or less are left out of the scores and counts.
* Per case: lesion-wise Dice = sum of the kept lesions' Dice / (kept lesions + false
  positives); HD95 = (sum of their HD95 + 374 × false positives) / the same count; both
  empty: Dice 1, HD95 0.
* Per challenge (dilation, threshold mm³): GLI, SSA and PED (3, 50); MEN (1, 50);
  MET (1, 2).

HD95 is DeepMind's ``surface-distance`` robust Hausdorff, as the challenge code calls it:
surface elements weighted by their area, the larger of the two directed 95th
percentiles. It differs from medlit's legacy BraTS HD95 (pooled voxel distances,
:func:`~medlit.metrics.segmentation.hd95`). The surface elements, their areas and the
distances come from MONAI (``get_edge_surface_distance`` with ``use_subvoxels``, the same
area tables); the area-weighted percentile is written here, because MONAI's Hausdorff
distance takes unweighted percentiles and the PyPI ``surface-distance`` package no longer
runs on NumPy 2 when a mask is empty.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from scipy import ndimage

from medlit.errors import ConfigError, exit_process, run_main
from medlit.metrics.segmentation import connected_components

MISSED_HD95 = 374.0
# challenge -> (dilation iterations, lesion volume threshold in mm³), as eval.py sets them
CHALLENGES: dict[str, tuple[int, float]] = {
    "BraTS-GLI": (3, 50.0),
    "BraTS-SSA": (3, 50.0),
    "BraTS-MEN": (1, 50.0),
    "BraTS-PED": (3, 50.0),
    "BraTS-MET": (1, 2.0),
}
REGIONS = ("WT", "TC", "ET")
_STRUCTURE = ndimage.generate_binary_structure(3, 2)


def robust_hd95(ref: np.ndarray, pred: np.ndarray, spacing: Sequence[float]) -> float:
    """DeepMind's robust Hausdorff distance at 95 % of two non-empty boolean volumes:
    for each surface, the distance below which 95 % of its area lies from the other
    surface; the larger of the two (mm, ``spacing`` in the arrays' axis order)."""
    import torch
    from monai.metrics.utils import get_edge_surface_distance

    if not ref.any() or not pred.any():
        return float("inf")
    edges, distances, areas = get_edge_surface_distance(
        torch.from_numpy(np.ascontiguousarray(pred)),
        torch.from_numpy(np.ascontiguousarray(ref)),
        spacing=list(map(float, spacing)),
        use_subvoxels=True,
        symmetric=True,
    )
    out = []
    # MONAI: distances of each side's surface elements, in raster order; areas as maps
    for d, a, e in zip(distances, areas, edges, strict=True):
        d = d.double().cpu().numpy()
        a = a[e].double().cpu().numpy()
        order = np.argsort(d, kind="stable")
        d, a = d[order], a[order]
        cum = np.cumsum(a) / np.sum(a)
        i = int(np.searchsorted(cum, 0.95))
        out.append(float(d[min(i, len(d) - 1)]))
    return max(out)


@dataclass(frozen=True)
class RegionScore:
    dice: float
    hd95: float
    num_tp: int
    num_fp: int
    num_fn: int


def _dilate(mask: np.ndarray, times: int) -> np.ndarray:
    if times <= 0:
        return mask
    return ndimage.binary_dilation(mask, structure=_STRUCTURE, iterations=times)


def lesionwise_region(
    pred: np.ndarray,
    ref: np.ndarray,
    spacing: Sequence[float],
    dilation: int,
    threshold: float,
    with_hd95: bool = True,
) -> RegionScore:
    """The lesion-wise scores of one region (boolean (Z, Y, X) volumes); without
    ``with_hd95`` the HD95 of each found lesion is skipped (NaN: the Dice alone, for
    choosing postprocessing)."""
    pred, ref = np.asarray(pred, bool), np.asarray(ref, bool)
    voxel = float(np.prod(spacing))
    groups, n_lesions = connected_components(_dilate(ref, dilation))
    lesions = np.where(ref, groups, 0)
    components, n_components = connected_components(pred)
    sizes = np.bincount(components.ravel(), minlength=n_components + 1)
    touched: set[int] = set()
    kept_dice, kept_hd, tp, fn = [], [], 0, 0
    objects = ndimage.find_objects(groups)  # each group's box holds its lesion and reach
    for k in range(1, n_lesions + 1):
        box = tuple(
            slice(max(s.start - dilation, 0), min(s.stop + dilation, n))
            for s, n in zip(objects[k - 1], ref.shape, strict=True)
        )
        lesion = lesions[box] == k
        reach = _dilate(lesion, dilation)
        hits = np.unique(components[box][reach])
        hits = hits[hits > 0]
        touched.update(int(h) for h in hits)
        volume = float(lesion.sum()) * voxel
        if volume <= threshold:
            continue  # too small to count, found or not
        if not len(hits):
            fn += 1
            kept_dice.append(0.0)
            kept_hd.append(MISSED_HD95)
            continue
        tp += 1
        full = lesions == k
        found = np.isin(components, hits)
        inter = float(np.count_nonzero(found & full))
        kept_dice.append(2.0 * inter / (float(lesion.sum()) + float(sizes[hits].sum())))
        hd = robust_hd95(full, found, spacing) if with_hd95 else float("nan")
        kept_hd.append(MISSED_HD95 if not np.isfinite(hd) else hd)
    fp = n_components - len(touched)
    count = len(kept_dice) + fp
    if count == 0:
        return RegionScore(1.0, 0.0, tp, fp, fn)
    return RegionScore(
        sum(kept_dice) / count, (sum(kept_hd) + MISSED_HD95 * fp) / count, tp, fp, fn
    )


def lesionwise(
    pred: np.ndarray,
    ref: np.ndarray,
    names: Sequence[str],
    spacing: Sequence[float],
    challenge: str = "BraTS-GLI",
) -> dict[str, float]:
    """Per region of (R, Z, Y, X) boolean stacks: ``lesion_dice_<R>``, ``lesion_hd95_<R>``
    and the lesion counts ``lesion_tp_<R>``, ``lesion_fp_<R>``, ``lesion_fn_<R>``."""
    if challenge not in CHALLENGES:
        raise ConfigError(f"challenge {challenge!r}: use one of {', '.join(CHALLENGES)}")
    dilation, threshold = CHALLENGES[challenge]
    out: dict[str, float] = {}
    for k, name in enumerate(names):
        s = lesionwise_region(pred[k], ref[k], spacing, dilation, threshold)
        out |= {
            f"lesion_dice_{name}": s.dice,
            f"lesion_hd95_{name}": s.hd95,
            f"lesion_tp_{name}": s.num_tp,
            f"lesion_fp_{name}": s.num_fp,
            f"lesion_fn_{name}": s.num_fn,
        }
    return out


def regions_of(labels: np.ndarray, et_label: int) -> np.ndarray:
    """BraTS label map -> (3, ...) WT, TC, ET (2023: ET = 3; earlier releases: 4)."""
    # necrosis / non-enhancing core is 1 and oedema 2 in every release
    wt = np.isin(labels, [1, 2, et_label])
    tc = np.isin(labels, [1, et_label])
    return np.stack([wt, tc, labels == et_label])


def score_files(
    pred_dir: Path,
    ref_dir: Path,
    challenge: str = "BraTS-GLI",
    labels: str = "auto",
    panoptic: bool = False,
) -> pd.DataFrame:
    """One row per case of the label files in ``pred_dir`` and ``ref_dir`` paired by case
    id (the file name less ``-seg``/``_seg`` and the extension), with the challenge's
    columns ``<R>_lesionwise_dice``, ``<R>_lesionwise_hd95``, ``<R>_num_tp``,
    ``<R>_num_fp``, ``<R>_num_fn``."""
    from medlit.datasets.io.volume import read_volume

    def cases(folder: Path) -> dict[str, Path]:
        """Case id -> label file; where some files are named ``*-seg``/``*_seg`` (a
        release's case folders, images beside them), only those."""
        if not folder.is_dir():
            raise ConfigError(f"{folder}: not a folder of label files")
        files = sorted(folder.rglob("*.nii*"))
        stems = {p: p.name.split(".nii")[0] for p in files}
        segs = [p for p in files if stems[p].endswith(("-seg", "_seg"))]
        return {stems[p].removesuffix("-seg").removesuffix("_seg"): p for p in (segs or files)}

    preds, refs = cases(pred_dir), cases(ref_dir)
    if missing := sorted(set(refs) - set(preds)):
        raise ConfigError(f"{pred_dir}: no prediction for {len(missing)} cases: {missing[:5]}")
    rows = []
    if panoptic:
        from medlit.metrics.brats_panoptic import evaluator
        from medlit.metrics.brats_panoptic import panoptic as panoptic_scores

        ev = evaluator()
    for case_id in sorted(refs):
        ref, geometry = read_volume(refs[case_id])
        pred, pred_geometry = read_volume(preds[case_id])
        if pred.shape != ref.shape:
            raise ConfigError(
                f"{preds[case_id]}: shape {pred.shape}, its reference {refs[case_id]} {ref.shape}"
            )
        et = _et_label(labels, ref, pred, refs[case_id])
        spacing = list(reversed(geometry.spacing))  # (x, y, z) -> the arrays' (z, y, x)
        scores = lesionwise(regions_of(pred, et), regions_of(ref, et), REGIONS, spacing, challenge)
        row: dict[str, float | str] = {"case_id": case_id}
        for r in REGIONS:
            row[f"{r}_lesionwise_dice"] = scores[f"lesion_dice_{r}"]
            row[f"{r}_lesionwise_hd95"] = scores[f"lesion_hd95_{r}"]
            for count in ("tp", "fp", "fn"):
                row[f"{r}_num_{count}"] = scores[f"lesion_{count}_{r}"]
        if panoptic:  # panoptica reads the 2023 labels
            as_2023 = [np.where(a == et, 3, np.where(a == 3, 0, a)) for a in (pred, ref)]
            for key, value in panoptic_scores(*as_2023, spacing, ev).items():
                region, _, column = key.partition("_")
                row[f"{region.upper()}_panoptic_{column}"] = value
        rows.append(row)
    return pd.DataFrame(rows)


def _et_label(labels: str, ref: np.ndarray, pred: np.ndarray, path: Path) -> int:
    if labels == "2023":
        return 3
    if labels == "2021":
        return 4
    values = set(np.unique(ref).tolist()) | set(np.unique(pred).tolist())
    if 3 in values and 4 in values:
        raise ConfigError(f"{path}: labels 3 and 4 both present; give --labels 2023 or 2021")
    return 4 if 4 in values else 3


def main(argv: list[str] | None = None) -> pd.DataFrame:
    p = argparse.ArgumentParser(
        prog="python -m medlit.metrics.brats_lesionwise",
        description="BraTS 2023 lesion-wise Dice and HD95 of label files",
    )
    p.add_argument("pred_dir", type=Path)
    p.add_argument("ref_dir", type=Path)
    p.add_argument("--output", type=Path, required=True)
    p.add_argument("--challenge", default="BraTS-GLI", choices=sorted(CHALLENGES))
    p.add_argument("--labels", default="auto", choices=("auto", "2023", "2021"))
    p.add_argument("--panoptic", action="store_true")
    args = p.parse_args(argv)
    table = score_files(args.pred_dir, args.ref_dir, args.challenge, args.labels, args.panoptic)
    from medlit.datasets.io.files import atomic_write

    atomic_write(args.output, lambda path: table.to_csv(path, index=False))
    means = table.drop(columns="case_id").mean()
    print(f"{len(table)} cases ({args.challenge}); means:")
    for name, value in means.items():
        print(f"  {name:<24} {value:.4f}")
    print(f"per case: {args.output}")
    return table


if __name__ == "__main__":
    exit_process(run_main(main))
