"""Data pipeline: BraTS 2D training batches from medlit's cached data module, from a
per-sample nibabel reader, and from MONAI's CacheDataset with DataLoader or
ThreadDataLoader: samples/s and peak memory.

Every side runs in a new process of its own (see :class:`SideServer`), so that its
memory is its own; the repeats are interleaved. All sides draw the same samples:
a random case, a slice with foreground one time in three (else any slice), a square patch,
then horizontal flip (p 0.5), affine warp (p 0.5: scale 0.85-1.15, rotation ±15°, shift
±5 %) and per-channel intensity scaling 0.9-1.1 (p 0.3); WT/TC/ET region masks.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

from benchmarks.common import REPO, Context, Row, Section, interleave, median, spread
from benchmarks.pipeline_sides import IMPORTS, SERVER, SIDES


class SideServer:
    """A process that imported some sides' libraries (and nothing of the other sides') and
    forks a new child for every measurement.

    Each child then starts like a fresh process running only that side, without paying
    the imports again (torch, Lightning or MONAI take ~15 s on a loaded 2-core machine,
    which would dominate the suite). Protocol: one ``SIDE<TAB>CONFIG<TAB>OUT`` line in,
    the child's exit code back as one line (``benchmarks.pipeline_sides.serve``).
    """

    def __init__(self, imports: str) -> None:
        self.process = subprocess.Popen(
            [sys.executable, "-m", "benchmarks.pipeline_sides", imports],
            cwd=REPO,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )

    def measure(self, side: str, cfg: dict[str, Any], folder: Path, name: str) -> dict[str, Any]:
        cfg_path, out = folder / f"{name}.config.json", folder / f"{name}.json"
        cfg_path.write_text(json.dumps(cfg))
        out.unlink(missing_ok=True)
        assert self.process.stdin is not None and self.process.stdout is not None
        self.process.stdin.write(f"{side}\t{cfg_path}\t{out}\n")
        self.process.stdin.flush()
        code = self.process.stdout.readline().strip()
        if code != "0" or not out.exists():
            raise RuntimeError(f"pipeline side {side} failed (exit code {code or '?'})")
        return json.loads(out.read_text())

    def close(self) -> None:
        """Kill the server: it is idle between measurements and holds nothing to keep, and
        an orderly interpreter shutdown with torch and MONAI loaded takes seconds."""
        self.process.kill()
        self.process.wait()


def _config(ctx: Context, side: str, repeat: int) -> dict[str, Any]:
    s = ctx.sizes
    d = ctx.data
    batches = s.batches[side]
    return {
        "threads": ctx.threads,
        "batches": batches,
        "samples": (batches + 2) * s.batch_size,
        "datamodule": {
            "root": str(d["brats_root"]),
            "cache_dir": str(d["cache_dir"]),
            "split": {"val_fraction": 0.0, "test_fraction": 0.0},
            "patch_size": s.patch_size,
            "loader": {
                "batch_size": s.batch_size,
                "num_workers": 0 if side == "medlit-main" else s.num_workers,
            },
            "foreground_fraction": 1 / 3,
            "seed": repeat,
        },
    }


def _mb(n: float) -> str:
    return f"{n / 1e6:.0f} MB"


def run(ctx: Context, log=print) -> Section:
    s = ctx.sizes
    folder = ctx.workdir / "pipeline"
    folder.mkdir(exist_ok=True)
    servers = {name: SideServer(name) for name in IMPORTS}
    try:
        results = interleave(
            {
                side: lambda r, side=side: servers[SERVER[side]].measure(
                    side, _config(ctx, side, r), folder, f"{side}-{r}"
                )
                for side in SIDES
            },
            ctx.repeats,
            log,
        )
    finally:
        for server in servers.values():
            server.close()
    rate = {k: median([r["samples_per_s"] for r in v]) for k, v in results.items()}
    extra = {k: median([r["peak_pss"] - r["baseline_pss"] for r in v]) for k, v in results.items()}
    raw = results["medlit"][0]["cached_bytes"]
    section = Section("Data pipeline")
    workers = f"{s.num_workers} worker{'s' if s.num_workers != 1 else ''}"
    what = f"BraTS 2D batches ({s.batch_size}×{s.patch_size}², {workers})"
    targets = {"nibabel": 20.0, "monai": 1.0, "monai-thread": 1.0, "monai-thread2": 1.0}
    for other, target in targets.items():
        ratio = rate["medlit"] / rate[other]
        section.rows.append(
            Row(
                f"{what}: medlit vs {SIDES[other]}",
                f"{rate['medlit']:.1f} samples/s",
                f"{rate[other]:.1f} samples/s",
                ratio,
                f"speed-up ≥ {target:.1f}x",
                ratio >= target,
            )
        )
        if ratio < target:
            section.misses.append(
                f"**Pipeline vs {SIDES[other]} ({ratio:.2f}x, target {target:.1f}x).** Each "
                "medlit sample is a slice read from the mapped cache, then the random crop "
                "and augmentations (albumentations/OpenCV); profile `SliceDataset.__getitem__`."
            )
    mem_ratio = extra["medlit"] / raw
    section.rows.append(
        Row(
            f"BraTS data pipeline memory ({workers}): medlit peak PSS above "
            "start-up vs its raw cached arrays",
            _mb(extra["medlit"]),
            _mb(raw),
            mem_ratio,
            "memory ratio ≤ 1.2x",
            mem_ratio <= 1.2,
        )
    )
    if mem_ratio > 1.2:
        main_ratio = extra["medlit-main"] / raw
        own = extra["medlit"] - extra["medlit-main"]
        section.misses.append(
            f"**Pipeline memory ({mem_ratio:.2f}x the raw cache with {workers}, "
            f"{main_ratio:.2f}x without).** The mapped cache costs what it holds: loading in "
            f"the main process, memory grows by {_mb(extra['medlit-main'])} for {_mb(raw)} of "
            f"arrays. The other {_mb(own)} (~{_mb(own / s.num_workers)} a worker) are "
            "the loader workers' own pages: each is a forked copy of the training process, "
            "and what it writes (reference counts of the Python objects it touches, its "
            "batches in flight) becomes a private copy. That is a fixed cost per worker, so "
            "the ratio falls towards the no-worker value as the data grow: these "
            f"{s.brats_cases} cases cache {_mb(raw)}, BraTS 2021's 1251 cases of this size "
            f"would cache ~{raw / s.brats_cases * 1251 / 1e9:.0f} GB. Fewer workers lower it."
        )
    reused = ctx.data["brats_cache_reused"]
    section.details += [
        f"{s.brats_cases} cases of {s.brats_shape[2]}×{s.brats_shape[1]}×{s.brats_shape[0]} "
        f"voxels at {s.brats_spacing:g} mm (4 modalities + segmentation, `.nii.gz`), "
        f"batches of {s.batch_size} patches of {s.patch_size}², {workers} in the loader "
        "(MONAI's ThreadDataLoader: one thread, its recommended use with CacheDataset, and "
        "as many thread workers as medlit has processes; MONAI with "
        "`set_track_meta(False)`, as its fast-training guide prescribes). "
        + (
            "medlit's cache was reused from `--workdir`. "
            if reused
            else f"medlit built its cache once, before the runs, in "
            f"{ctx.data['brats_prepare_s']:.1f} s (checks, decoding, crop, normalisation, "
            "write). "
        )
        + "Every side then ran in a new process; start-up is building the loader and its "
        "first batch (MONAI: decoding and caching every case). Memory: PSS summed over the "
        "process, its loader workers and the process it was forked from (shared and "
        "memory-mapped pages counted once), peak minus the value just before the loader was "
        "built; RSS summed the same way counts shared pages once per process.",
        "",
        "| side | samples/s: median (min-max, n) | start-up (s) | peak PSS above start "
        "| peak RSS sum above start | cached arrays |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for side, rs in results.items():
        section.details.append(
            f"| {SIDES[side]} | {spread([r['samples_per_s'] for r in rs])} "
            f"| {spread([r['startup_s'] for r in rs])} "
            f"| {_mb(extra[side])} "
            f"| {_mb(median([r['peak_rss'] - r['baseline_rss'] for r in rs]))} "
            f"| {_mb(rs[0]['cached_bytes']) if rs[0]['cached_bytes'] else '-'} |"
        )
    section.details.append(
        "\nmedlit's cache is float16 images and uint8 labels, memory-mapped from disk; MONAI's "
        "CacheDataset holds float32 images, float32 one-hot regions and int64 "
        "foreground/background voxel lists in RAM."
    )
    return section
