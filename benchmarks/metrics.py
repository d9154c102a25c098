"""Metrics: BraTS Dice + HD95 of WT/TC/ET on whole volumes, medlit against the official
scorer (``brats-evaluation``), MONAI and medpy: values and time per case.

Each repeat scores one reference/prediction pair: the reference is a generated case's
segmentation (2023 label values, which the scorer's GLI config expects), the prediction a
plausible perturbation of it (shifted, edema grown, enhancing rim turned necrotic, sparse
false-positive voxels), as in medlit's own scorer test. The official scorer reads the two
NIfTI files itself, so medlit is timed from the same files there (SimpleITK reading
included); against MONAI and medpy all three start from the same boolean region arrays.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import torch
from scipy import ndimage

from benchmarks.common import Context, Row, Section, interleave, median, spread, timed

REGIONS = ("WT", "TC", "ET")
NAMES = {
    "official": "the official scorer",
    "official (same work)": "the official scorer, same work",
    "monai": "MONAI",
    "medpy": "medpy",
}


def _pair(ctx: Context, index: int) -> tuple[Path, Path]:
    """Reference and prediction NIfTI files of one generated case (seeded by ``index``)."""
    from medlit.datasets.io.volume import read_volume, write_volume

    folder = ctx.workdir / "metrics" / f"pair{index}"
    ref_path, pred_path = folder / "ref.nii.gz", folder / "pred.nii.gz"
    if pred_path.exists():
        return ref_path, pred_path
    cases = sorted(p for p in Path(ctx.data["brats_root"]).iterdir() if p.is_dir())
    case = cases[index % len(cases)]
    seg, geometry = read_volume(case / f"{case.name}_seg.nii.gz")
    seg[seg == 4] = 3
    if not (seg == 3).any():  # a case without enhancing tumour: keep every region defined
        seg[seg == 1] = 3
    rng = np.random.default_rng(index)
    pred = np.roll(seg, tuple(rng.integers(-2, 3, 3)), axis=(0, 1, 2))
    pred[ndimage.binary_dilation(pred == 2) & (pred == 0)] = 2
    et = pred == 3
    pred[et & ~ndimage.binary_erosion(et)] = 1
    pred[rng.random(seg.shape) < 0.0005] = 2
    write_volume(seg, geometry, ref_path)
    write_volume(pred, geometry, pred_path)
    return ref_path, pred_path


def _regions(path: Path) -> tuple[np.ndarray, tuple[float, ...], tuple[int, ...]]:
    from medlit.datasets.brats.source import label_targets
    from medlit.datasets.io.volume import read_volume

    labels, geometry = read_volume(path)
    return label_targets(labels, 3, "regions").astype(bool), geometry.spacing_zyx, labels.shape


def medlit_from_files(ref: Path, pred: Path) -> dict[str, float]:
    from medlit.metrics.segmentation import region_metrics, volume_diagonal

    r, spacing, shape = _regions(ref)
    p, _, _ = _regions(pred)
    return region_metrics(p, r, REGIONS, spacing, volume_diagonal(shape, spacing))


def medlit_arrays(p: np.ndarray, r: np.ndarray, spacing, diagonal: float) -> dict[str, float]:
    from medlit.metrics.segmentation import region_metrics

    return region_metrics(p, r, REGIONS, spacing, diagonal)


def official(ref: Path, pred: Path, evaluator) -> dict[str, float]:
    import brats_evaluation

    result = brats_evaluation.evaluate_single_exam(str(pred), str(ref), "case", evaluator)
    return {
        f"{m}_{name}": float(result[name.lower()][key])
        for name in REGIONS
        for m, key in (("dice", "global_bin_dsc"), ("hd95", "global_bin_hd95"))
    }


def monai(p: np.ndarray, r: np.ndarray, spacing) -> dict[str, float]:
    from monai.metrics import compute_dice, compute_hausdorff_distance

    pt, rt = torch.from_numpy(p[None]), torch.from_numpy(r[None])  # (1, 3, z, y, x) one-hot
    dice = compute_dice(pt, rt, include_background=True)[0]
    hd = compute_hausdorff_distance(
        pt, rt, include_background=True, percentile=95, spacing=list(spacing)
    )[0]
    return {
        **{f"dice_{n}": float(dice[k]) for k, n in enumerate(REGIONS)},
        **{f"hd95_{n}": float(hd[k]) for k, n in enumerate(REGIONS)},
    }


def medpy(p: np.ndarray, r: np.ndarray, spacing) -> dict[str, float]:
    from medpy.metric.binary import dc, hd95

    out = {}
    for k, n in enumerate(REGIONS):
        out[f"dice_{n}"] = float(dc(p[k], r[k]))
        out[f"hd95_{n}"] = float(hd95(p[k], r[k], voxelspacing=spacing))
    return out


def _has_medpy() -> bool:
    try:
        import medpy.metric  # noqa: F401
    except ImportError:
        return False
    return True


def _evaluator():
    import brats_evaluation
    from panoptica import Panoptica_Evaluator

    with warnings.catch_warnings():  # the GLI config's overlapping label groups are intended
        warnings.simplefilter("ignore")
        return Panoptica_Evaluator.load_from_config(brats_evaluation.config_path("gli"))


def _same_work_evaluator():
    """The official scorer's evaluator doing medlit's work: the three regions (its GLI
    config scores six label groups) and global Dice + HD95 (it also computes NSD, and
    per-lesion metrics after matching connected components). Its label groups, edge cases
    and matching otherwise as in the config (``medlit.metrics.brats_panoptic``)."""
    from panoptica import Metric

    from medlit.metrics.brats_panoptic import evaluator

    ev = evaluator()
    ev.instance_metrics = [Metric.DSC]  # what the matcher needs
    ev.global_metrics = [Metric.DSC, Metric.HD95]
    return ev


def run(ctx: Context, log=print) -> Section:
    from medlit.metrics.segmentation import volume_diagonal

    pairs = [_pair(ctx, r) for r in range(ctx.repeats)]
    arrays = []
    for ref, pred in pairs:
        r, spacing, shape = _regions(ref)
        p, _, _ = _regions(pred)
        arrays.append((p, r, spacing, volume_diagonal(shape, spacing)))
    evaluator, same_work = _evaluator(), _same_work_evaluator()
    with_medpy = _has_medpy()
    # First, and so also the warm-up of every implementation: the empty-mask conventions.
    empty = _empty_conventions(ctx, evaluator, with_medpy)
    sides = {
        "medlit (files)": lambda i: timed(lambda: medlit_from_files(*pairs[i])),
        "official": lambda i: timed(lambda: official(*pairs[i], evaluator)),
        "official (same work)": lambda i: timed(lambda: official(*pairs[i], same_work)),
        "medlit (arrays)": lambda i: timed(lambda: medlit_arrays(*arrays[i])),
        "monai": lambda i: timed(lambda: monai(*arrays[i][:3])),
    }
    if with_medpy:
        sides["medpy"] = lambda i: timed(lambda: medpy(*arrays[i][:3]))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # MONAI deprecation notes, panoptica's banner
        results = interleave(sides, ctx.repeats, log)
    seconds = {k: [t for t, _ in v] for k, v in results.items()}
    values = {k: [v for _, v in rs] for k, rs in results.items()}
    shape = arrays[0][0].shape[1:]
    section = Section("Metrics", notes_title="HD95 definitions and measured differences")
    what = f"Dice + HD95 of WT/TC/ET per case ({shape[2]}×{shape[1]}×{shape[0]})"
    comparisons = [
        (
            "medlit (files)",
            "official",
            "the official scorer (brats-evaluation, its GLI config: 6 label groups, NSD, "
            "lesion matching), from NIfTI files",
        ),
        (
            "medlit (files)",
            "official (same work)",
            "the official scorer trimmed to the same work (WT/TC/ET, Dice + HD95), from "
            "NIfTI files",
        ),
        (
            "medlit (arrays)",
            "monai",
            "MONAI `compute_dice` + `compute_hausdorff_distance`, in memory",
        ),
    ]
    if with_medpy:
        comparisons.append(("medlit (arrays)", "medpy", "medpy `dc` + `hd95`, in memory"))
    for ours, other, label in comparisons:
        ratio = median(seconds[other]) / median(seconds[ours])
        section.rows.append(
            Row(
                f"{what}: medlit vs {label}",
                f"{median(seconds[ours]):.2f} s/case",
                f"{median(seconds[other]):.2f} s/case",
                ratio,
                "speed-up ≥ 1.0x",
                ratio >= 1.0,
            )
        )
    keys = [f"{m}_{n}" for n in REGIONS for m in ("dice", "hd95")]
    ours, theirs = values["medlit (files)"], values["official"]
    equal = sum(abs(o[k] - t[k]) <= 1e-6 for o, t in zip(ours, theirs, strict=True) for k in keys)
    total = len(keys) * len(ours)
    section.rows.append(
        Row(
            f"{what}: values equal to the official scorer's (within 1e-6)",
            f"{equal} of {total}",
            f"{total} of {total}",
            equal / total,
            "share equal = 1.0",
            equal == total,
        )
    )
    section.details += [
        "| implementation | s/case: median (min-max, n) |",
        "| --- | --- |",
        *(f"| {k} | {spread(v)} |" for k, v in seconds.items()),
    ]
    if not with_medpy:
        section.details.append(
            "\nmedpy is not installed, so its row was not measured: it is not in the `bench` "
            "extra, as PyPI has no wheel of it and its source build compiles C++ "
            "(`pip install medpy` adds it)."
        )
    medpy_equal = with_medpy and all(
        abs(m[k] - o[k]) <= 1e-6
        for m, o in zip(values["medpy"], values["official"], strict=True)
        for k in keys
    )
    section.notes = [
        *_definitions(with_medpy, medpy_equal),
        "",
        "Measured HD95 (mm) of the same pairs:",
        "",
        *_hd95_differences(values, with_medpy),
        "",
        *empty,
    ]
    if equal < total:
        section.misses.append(
            f"**Metric values ({equal} of {total} equal to the official scorer's).** See the "
            "HD95 table: a value that differs needs a test in tests/metrics first."
        )
    for ours_key, other, _ in comparisons:
        ratio = median(seconds[other]) / median(seconds[ours_key])
        if ratio < 1.0:
            section.misses.append(
                f"**Metrics vs {NAMES[other]} ({ratio:.2f}x).** medlit's time is Dice plus "
                "HD95 per region (`region_metrics` in `medlit/metrics/segmentation.py`): "
                "the surfaces by one erosion over each mask's bounding box, then each surface "
                "voxel's nearest point on the other surface by k-d tree. Profile "
                "`region_metrics` on one case to see which part grew; the surfaces' size "
                "(false positives scattered over the volume) drives both."
            )
    return section


def _definitions(with_medpy: bool, medpy_equal: bool) -> list[str]:
    return [
        "All four take a region's surface as the voxels removed by one binary erosion with "
        "the 6-neighbour (face-connected) structuring element, and measure distances in mm "
        "with the voxel spacing. They differ in what the 95th percentile is taken of:",
        "",
        "- **official** (`brats-evaluation`, through panoptica) and **medlit**: the distances "
        "from every surface voxel of each mask to the other mask's surface, both directions "
        "pooled into one set; the 95th percentile of that set.",
        "- **MONAI** (`compute_hausdorff_distance(percentile=95)`): the 95th percentile of "
        "each direction separately, then the larger of the two. It is at least the pooled "
        "value, and far above it when one mask has outliers the other lacks (false-positive "
        "voxels far from the tumour).",
        "- **medpy** (`hd95`): the pooled set, like the official scorer"
        + (
            f", and its values {'equal' if medpy_equal else 'do not all equal'} the official "
            "ones on these pairs"
            if with_medpy
            else ""
        )
        + "; its distance transforms run on the whole volume rather than on a crop.",
    ]


def _empty_conventions(ctx: Context, evaluator, with_medpy: bool) -> list[str]:
    """HD95 of a region that is empty in one or both masks, as each implementation
    returns it (measured on a small volume: a reference without enhancing tumour)."""
    from medlit.datasets.io.volume import Geometry, write_volume
    from medlit.metrics.segmentation import volume_diagonal

    shape, spacing = (20, 24, 24), (1.0, 1.0, 1.0)
    ref = np.zeros(shape, np.uint8)
    ref[5:15, 6:18, 6:18] = 2
    ref[8:12, 9:15, 9:15] = 1
    preds = {"one empty (prediction has ET, reference none)": ref.copy(), "both empty": ref.copy()}
    preds["one empty (prediction has ET, reference none)"][9:11, 10:12, 10:12] = 3
    geometry = Geometry((0.0, 0.0, 0.0), spacing, (1.0, 0, 0, 0, 1.0, 0, 0, 0, 1.0))
    folder = ctx.workdir / "metrics" / "empty"
    lines = [
        "HD95 of enhancing tumour when the reference has none (a volume of "
        f"{shape[2]}×{shape[1]}×{shape[0]} at 1 mm, diagonal "
        f"{volume_diagonal(shape, spacing):.2f} mm):",
        "",
        "| case | official | medlit | MONAI" + (" | medpy |" if with_medpy else " |"),
        "| --- | --- | --- | ---" + (" | --- |" if with_medpy else " |"),
    ]
    for case, pred in preds.items():
        write_volume(ref, geometry, folder / "ref.nii.gz")
        write_volume(pred, geometry, folder / "pred.nii.gz")
        r, sp, _ = _regions(folder / "ref.nii.gz")
        p, _, _ = _regions(folder / "pred.nii.gz")
        calls = [
            (official, (folder / "ref.nii.gz", folder / "pred.nii.gz", evaluator)),
            (medlit_arrays, (p, r, sp, volume_diagonal(shape, sp))),
            (monai, (p, r, sp)),
            *([(medpy, (p, r, sp))] if with_medpy else []),
        ]
        cells = [_hd95_et(fn, *args) for fn, args in calls]
        lines.append(f"| {case} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "medlit returns what the BraTS ranking scores for an empty region: the volume's "
        "diagonal when exactly one mask is empty, 0 when both are (Dice 0 and 1).",
    ]
    return lines


def _hd95_et(fn, *args) -> str:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return f"{fn(*args)['hd95_ET']:.2f}"
    except Exception as e:  # noqa: BLE001 - for an empty mask, the convention *is* the exception
        return f"raises {type(e).__name__}"


def _hd95_differences(values: dict[str, list[dict[str, float]]], with_medpy: bool) -> list[str]:
    """The measured HD95 of every implementation, per pair and region."""
    sides = ["official", "medlit (files)", "monai", *(["medpy"] if with_medpy else [])]
    lines = [
        "| pair | region | " + " | ".join(sides) + " | MONAI - official |",
        "| --- | --- | " + " | ".join("---" for _ in sides) + " | --- |",
    ]
    for i in range(len(values["official"])):
        for n in REGIONS:
            row = [values[s][i][f"hd95_{n}"] for s in sides]
            diff = values["monai"][i][f"hd95_{n}"] - values["official"][i][f"hd95_{n}"]
            lines.append(
                f"| {i} | {n} | " + " | ".join(f"{v:.4f}" for v in row) + f" | {diff:+.4f} |"
            )
    dice_gap = max(
        abs(values[s][i][f"dice_{n}"] - values["official"][i][f"dice_{n}"])
        for s in sides
        for i in range(len(values["official"]))
        for n in REGIONS
    )
    lines.append(
        f"\nDice agrees everywhere: the largest difference from the official value over all "
        f"implementations, pairs and regions is {dice_gap:.1e}."
    )
    return lines
