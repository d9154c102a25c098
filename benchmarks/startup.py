"""Start-up at full dataset size: the warm ``prepare_data`` + ``setup("fit")`` of each data
module at 10 %, 30 % and 100 % of its real release's size, with tiny files, so that what
is timed is the metadata work (discovery, checks of what changed, tables, the cache's
records, the split and the datasets), not decoding.

Full sizes: LUNA16 888 scans with candidates_V2's 754,975 rows (and the annotations'
1,186 nodules), BraTS 2021's 1,251 cases, ISIC 2019's 25,331 images. Each size is built
cold once (not timed), then started warm ``repeats`` times (the median). The growth
exponent is the slope of log(time above the start of a dataset of 10 items) against
log(items), fitted over the three sizes: 1 is linear, 2 quadratic.
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd

from benchmarks.common import Context, Row, Section, median

FULL = {"LUNA16": 888, "BraTS": 1251, "ISIC 2019": 25331}
CANDIDATES, NODULES = 754_975, 1_186
FRACTIONS = (0.1, 0.3, 1.0)
BASELINE = 10  # items of the "empty" start, which the exponent is fitted above
TARGET_EXPONENT, TARGET_SECONDS = 1.1, 15.0


def _write_luna16(root: Path, n: int, seed: int) -> None:
    """``n`` tiny scans (8 × 32 × 32) in the official layout, candidates_V2 with the full
    release's rows per scan, every row inside its scan."""
    import SimpleITK as sitk

    from medlit.datasets.io.volume import Geometry
    from medlit.datasets.luna16.phantom import write_luna16
    from medlit.datasets.luna16.source import discover_scans

    write_luna16(root, n, seed=seed, shape_range=((8, 8), (32, 32), (32, 32)), lung_masks=False)
    rng = np.random.default_rng(seed)
    rows, per_scan = [], round(CANDIDATES / FULL["LUNA16"])
    for uid, scan in sorted(discover_scans(root).items()):
        image = sitk.ReadImage(str(scan.mhd))
        index = rng.uniform(0, 1, (per_scan, 3)) * (np.asarray(image.GetSize()[::-1]) - 1)
        world = Geometry.of(image).index_to_world(index)
        rows.append(
            pd.DataFrame(
                {
                    "seriesuid": uid,
                    "coordX": world[:, 0],
                    "coordY": world[:, 1],
                    "coordZ": world[:, 2],
                    "class": (rng.uniform(size=per_scan) < NODULES / CANDIDATES).astype(int),
                }
            )
        )
    pd.concat(rows).to_csv(root / "candidates_V2.csv", index=False, float_format="%.3f")


def _writers(seed: int) -> dict[str, Callable[[Path, int], None]]:
    from medlit.datasets.brats.phantom import write_brats
    from medlit.datasets.isic.phantom import write_isic

    return {
        "LUNA16": lambda root, n: _write_luna16(root, n, seed),
        "BraTS": lambda root, n: write_brats(root, n, shape=(8, 16, 16), spacing=15.0, seed=seed),
        "ISIC 2019": lambda root, n: write_isic(
            root, "2019", lesions=n, size=(16, 16), images_per_lesion=(1, 1), seed=seed
        ),
    }


def _start(name: str, root: Path, cache: Path) -> float:
    """Seconds of one start: the data module built, ``prepare_data`` and ``setup("fit")``."""
    from medlit.datamodules import BraTSDataModule, ISICDataModule, LUNA16DataModule

    loader = {"batch_size": 2, "num_workers": 0}
    t0 = time.perf_counter()
    if name == "LUNA16":
        dm = LUNA16DataModule(root=str(root), cache_dir=str(cache), spacing=None, loader=loader)
    elif name == "BraTS":
        dm = BraTSDataModule(root=str(root), cache_dir=str(cache), loader=loader)
    else:
        dm = ISICDataModule(root=str(root), cache_dir=str(cache), loader=loader)
    dm.prepare_data()
    dm.setup("fit")
    return time.perf_counter() - t0


def exponent(items: list[int], seconds: list[float], base: float) -> float:
    """Slope of log(seconds - base) over log(items), least squares."""
    above = [max(s - base, 1e-6) for s in seconds]
    return float(np.polyfit(np.log(items), np.log(above), 1)[0])


def run(ctx: Context, log: Callable[[str], None]) -> Section:
    tiny = ctx.sizes.name == "tiny"
    full = {k: (v // 20 if tiny else v) for k, v in FULL.items()}
    section = Section("Start-up at full dataset size (warm prepare_data + setup)")
    table = [
        "| dataset | items | warm start (s) | above the 10-item start (s) |",
        "| --- | --- | --- | --- |",
    ]
    for name, write in _writers(seed=7).items():
        sizes = [BASELINE, *(max(BASELINE + 1, round(f * full[name])) for f in FRACTIONS)]
        times = []
        for n in sizes:
            folder = ctx.workdir / "startup" / f"{name.split()[0].lower()}-{n}"
            root, cache = folder / "data", folder / "cache"
            if not root.exists():
                write(root, n)
            t = time.perf_counter()
            _start(name, root, cache)  # cold: builds the cache (not timed)
            log(f"  {name} {n} items: cold start {time.perf_counter() - t:.1f} s")
            times.append(median([_start(name, root, cache) for _ in range(ctx.repeats)]))
            log(f"  {name} {n} items: warm start {times[-1]:.2f} s")
            shutil.rmtree(cache, ignore_errors=True)
            shutil.rmtree(root, ignore_errors=True)
        k = exponent(sizes[1:], times[1:], times[0])
        for n, t in zip(sizes, times, strict=True):
            table.append(f"| {name} | {n:,} | {t:.2f} | {t - times[0]:.2f} |")
        met = k <= TARGET_EXPONENT and times[-1] < TARGET_SECONDS
        section.rows.append(
            Row(
                f"Start-up growth, {name} ({sizes[-1]:,} items, warm): exponent of the time "
                "above a 10-item start",
                f"{times[-1]:.2f} s at full size; exponent {k:.2f}",
                "linear growth (exponent 1)",
                k,
                f"<= {TARGET_EXPONENT} and < {TARGET_SECONDS:.0f} s",
                met,
            )
        )
        if not met:
            section.misses.append(
                f"{name}: exponent {k:.2f}, {times[-1]:.1f} s warm at {sizes[-1]:,} items "
                f"(targets <= {TARGET_EXPONENT}, < {TARGET_SECONDS:.0f} s)."
            )
    section.notes.append(
        "Tiny files (LUNA16 8 × 32 × 32 scans with 850 candidates each, BraTS 8 × 16 × 16, "
        "ISIC 16 × 16 px), so the times are metadata work; a warm start is the median of "
        f"{ctx.repeats} after a cold one built the cache. The exponent's ratio column is the "
        "exponent itself (lower is better)."
    )
    section.details += ["", *table]
    return section
