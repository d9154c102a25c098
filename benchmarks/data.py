"""The benchmark data, written by medlit's own synthetic writers in the official layouts:
BraTS 2021 ``.nii.gz`` cases and LUNA16 ``.mhd``/``.raw`` scans."""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path
from typing import Any

from benchmarks.common import Context
from medlit.datamodules import BraTSDataModule
from medlit.datasets.brats.phantom import write_brats
from medlit.datasets.io.files import MARKER, is_synthetic
from medlit.datasets.luna16.phantom import write_luna16


def brats_module(ctx: Context, **overrides: Any) -> BraTSDataModule:
    """medlit's BraTS data module over the benchmark cases; every case trains unless
    ``overrides`` say otherwise (``split.val_fraction`` > 0 holds one case out)."""
    s = ctx.sizes
    args: dict[str, Any] = {
        "root": str(ctx.data["brats_root"]),
        "cache_dir": str(ctx.data["cache_dir"]),
        "split": {"val_fraction": 0.0, "test_fraction": 0.0},
        "patch_size": s.patch_size,
        "loader": {"batch_size": s.batch_size, "num_workers": s.num_workers},
        "foreground_fraction": 1 / 3,
    }
    return BraTSDataModule(**{**args, **overrides})


def prepare(ctx: Context, log=print) -> None:
    """Write the BraTS cases (reused when ``workdir`` already holds them) and build medlit's
    cache once, as the first run of an experiment does; its time goes to the details."""
    s = ctx.sizes
    root = ctx.workdir / "BraTS2021"
    ctx.data.update(brats_root=root, cache_dir=ctx.workdir / "medlit-cache")
    if is_synthetic(root) and _written_as(root) != (
        s.brats_cases,
        list(s.brats_shape),
        s.brats_spacing,
    ):
        shutil.rmtree(root)  # a reused --workdir with other sizes
        shutil.rmtree(ctx.data["cache_dir"], ignore_errors=True)
    if not is_synthetic(root):
        start = time.perf_counter()
        write_brats(root, s.brats_cases, shape=s.brats_shape, spacing=s.brats_spacing, seed=0)
        log(
            f"wrote {s.brats_cases} BraTS cases {s.brats_shape} in "
            f"{time.perf_counter() - start:.1f} s"
        )
    ctx.data["brats_cache_reused"] = ctx.data["cache_dir"].exists()
    start = time.perf_counter()
    brats_module(ctx).prepare_data()
    ctx.data["brats_prepare_s"] = time.perf_counter() - start


def _written_as(root: Path) -> tuple:
    info = json.loads((root / MARKER).read_text())
    return info.get("cases"), info.get("shape_zyx"), info.get("spacing_mm")


def luna16_root(ctx: Context) -> Path:
    """LUNA16 scans (no lung masks: both sides then decode exactly one volume per scan)."""
    s = ctx.sizes
    root = ctx.workdir / "LUNA16"
    wanted = {"scans": s.luna_scans, "shape_range_zyx": [list(r) for r in s.luna_shape]}
    if is_synthetic(root) and any(
        json.loads((root / MARKER).read_text()).get(k) != v for k, v in wanted.items()
    ):
        shutil.rmtree(root)  # a reused --workdir with other sizes
    if not is_synthetic(root):
        write_luna16(
            root, s.luna_scans, seed=7, n_subsets=1, shape_range=s.luna_shape, lung_masks=False
        )
    return root
