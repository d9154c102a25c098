"""What every comparison shares: sizes, results, timing, memory sampling, the environment."""

from __future__ import annotations

import importlib.metadata
import os
import platform
import statistics
import subprocess
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil

REPO = Path(__file__).resolve().parent.parent


# nnU-Net v2's environment (bash benchmarks/peers/nnunet.sh), the 3D comparisons' peer.
NNUNET_PYTHON = REPO / ".venv-nnunet" / "bin" / "python"


def nnunet_env(folder: Path, threads: int, augment_workers: int = 1) -> dict[str, str]:
    """The environment of an nnU-Net process: its raw / preprocessed / results folders
    under ``folder`` (unset, nnU-Net warns on import), ``threads`` OpenMP threads and
    ``augment_workers`` data-augmentation processes (``nnUNet_n_proc_DA``; at least 1:
    nnU-Net's planner also gives it to ``torch.set_num_threads``)."""
    return {
        **os.environ,
        **{f"nnUNet_{k}": str(folder / k) for k in ("raw", "preprocessed", "results")},
        "nnUNet_n_proc_DA": str(augment_workers),
        "OMP_NUM_THREADS": str(threads),
    }


def with_benchmarks() -> dict[str, str]:
    """This environment, with the repository on ``PYTHONPATH``: a ``medlit.fit`` or
    ``medlit.sweep`` process started from another folder can load the benchmarks' own
    callbacks (``benchmarks.gpu.StepClock``, ``benchmarks.tracking.FitClock``)."""
    return {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
    }


THREAD_VARIABLES = (
    "OMP_NUM_THREADS",
    "OPENBLAS_NUM_THREADS",
    "MKL_NUM_THREADS",
    "ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS",
)


def pin_threads(threads: int) -> None:
    """Every library thread pool a side may use, at ``threads``: torch's, OpenCV's
    (albumentations), SimpleITK's and ITK's (MONAI's ITK reader), BLAS (threadpoolctl),
    and the variables that processes started from here read first."""
    import torch

    for name in THREAD_VARIABLES:
        os.environ[name] = str(threads)
    torch.set_num_threads(threads)
    try:
        import cv2

        cv2.setNumThreads(threads)
    except ImportError:
        pass
    import SimpleITK as sitk

    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(threads)
    try:
        import itk

        itk.MultiThreaderBase.SetGlobalDefaultNumberOfThreads(threads)
    except (ImportError, AttributeError):
        pass
    try:
        from threadpoolctl import threadpool_limits

        threadpool_limits(threads)
    except ImportError:
        pass


@dataclass(frozen=True)
class Sizes:
    """Workload of one run. ``full`` is sized for ~10 min on 2 slow CPU cores; ``tiny`` only
    checks that every comparison runs (its numbers mean nothing)."""

    name: str
    # BraTS: cases written at shape (z, y, x) and spacing (mm); 240x240x155 at 1 mm is real.
    brats_cases: int
    brats_shape: tuple[int, int, int]
    brats_spacing: float
    # data pipeline: slices per batch, patch side, loader workers, timed batches per side
    batch_size: int
    patch_size: int
    num_workers: int
    batches: dict[str, int]
    # framework overhead: the demo's model; slices per batch, patch side, steps
    train_batch: int
    train_patch: int
    warmup_steps: int
    steps_per_repeat: int
    # whole-volume inference: slices per forward pass
    inference_batch: int
    # LUNA16: scans per repeat and their (min, max) shape per axis z, y, x
    luna_scans: int
    luna_shape: tuple[tuple[int, int], tuple[int, int], tuple[int, int]]


FULL = Sizes(
    name="full",
    brats_cases=3,
    brats_shape=(155, 240, 240),
    brats_spacing=1.0,
    batch_size=8,
    patch_size=128,
    num_workers=2,
    # Multiples of the workers: each worker builds whole batches, so they arrive in pairs.
    batches={
        "medlit": 60,
        "medlit-main": 60,
        "monai": 16,
        "monai-thread": 12,
        "monai-thread2": 16,
        "nibabel": 2,
    },
    train_batch=8,
    train_patch=96,
    warmup_steps=3,
    steps_per_repeat=6,
    inference_batch=16,
    luna_scans=2,
    luna_shape=((100, 120), (256, 256), (256, 256)),
)

TINY = Sizes(
    name="tiny",
    brats_cases=3,
    brats_shape=(24, 48, 48),
    brats_spacing=1.0,
    batch_size=4,
    patch_size=32,
    num_workers=1,
    batches={
        "medlit": 2,
        "medlit-main": 2,
        "monai": 2,
        "monai-thread": 2,
        "monai-thread2": 2,
        "nibabel": 2,
    },
    train_batch=2,
    train_patch=32,
    warmup_steps=1,
    steps_per_repeat=2,
    inference_batch=8,
    luna_scans=1,
    luna_shape=((8, 8), (32, 32), (32, 32)),
)

# The demo's network (experiments/demo/brats_unet.yaml), random init: no weights are fetched.
MODEL = {
    "arch": "unet",
    "encoder": "resnet18",
    "in_channels": 4,
    "num_classes": 3,
    "model_kwargs": {"decoder_channels": [128, 64, 32, 16, 8]},
}


@dataclass
class Row:
    """One line of the results table. ``ratio`` is defined by the row's ``target``."""

    comparison: str
    medlit: str
    other: str
    ratio: float
    target: str
    met: bool


@dataclass
class Section:
    """What one comparison reports: its table rows, details (Markdown lines) and, for each
    missed target, what limits it and what would move it."""

    name: str
    rows: list[Row] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # shown right under the results table
    notes_title: str = "notes"
    details: list[str] = field(default_factory=list)
    misses: list[str] = field(default_factory=list)


@dataclass
class Context:
    """Where a run works and how big it is."""

    workdir: Path
    sizes: Sizes
    repeats: int
    threads: int
    data: dict[str, Any] = field(default_factory=dict)  # filled by benchmarks.data


def median(values: Sequence[float]) -> float:
    return float(statistics.median(values))


def spread(values: Sequence[float], fmt: str = "{:.3g}") -> str:
    """``median (min-max, n)`` for the details tables."""
    return f"{fmt.format(median(values))} ({fmt.format(min(values))}-{fmt.format(max(values))}, n={len(values)})"


def interleave(
    sides: dict[str, Callable[[int], Any]],
    repeats: int,
    log: Callable[[str], None] = print,
    warmup: bool = False,
) -> dict[str, list[Any]]:
    """Run every side once per repeat, the order rotated each repeat, so that slow spells
    of a shared machine hit every side alike. ``sides[name](repeat)`` returns one result.
    ``warmup`` first runs each side once untimed (lazy imports, first-call set-up)."""
    names = list(sides)
    out: dict[str, list[Any]] = {n: [] for n in names}
    if warmup:
        for name in names:
            seconds, _ = timed(lambda name=name: sides[name](0))
            log(f"  warm-up {name}: {seconds:.1f} s")
    for r in range(repeats):
        k = r % len(names)
        for name in names[k:] + names[:k]:
            start = time.perf_counter()
            out[name].append(sides[name](r))
            log(f"  repeat {r + 1}/{repeats} {name}: {time.perf_counter() - start:.1f} s")
    return out


def timed(fn: Callable[[], Any]) -> tuple[float, Any]:
    """(seconds, result) of ``fn()``."""
    start = time.perf_counter()
    result = fn()
    return time.perf_counter() - start, result


class PeakMemory:
    """Peak memory of this process, its children (DataLoader workers) and the processes
    ``also`` (pids), sampled in a background thread.

    PSS (proportional set size) counts a page shared by k processes as 1/k in each, so its
    sum over every process that maps a page counts it once: memory-mapped cache files,
    copy-on-write pages shared with loader workers, and the libraries a forked process
    shares with the process it was forked from, which belongs in ``also`` (otherwise each
    new worker would move part of that process's share into the sum). Summed RSS counts
    shared pages once per process and overstates a multi-worker loader; both are kept.
    psutil reads /proc/<pid>/smaps_rollup, about a millisecond a process.
    """

    def __init__(self, also: Sequence[int] = (), interval: float = 0.05) -> None:
        self.also = list(also)
        self.interval = interval
        self.peak_pss = self.peak_rss = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def current(self) -> tuple[int, int]:
        """(PSS, RSS) in bytes, summed over the processes measured."""
        me = psutil.Process()
        pss = rss = 0
        for p in [me, *me.children(recursive=True), *map(psutil.Process, self.also)]:
            try:
                info = p.memory_full_info()
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                continue  # a worker that just exited
            pss += info.pss
            rss += info.rss
        return pss, rss

    def _sample(self) -> None:
        pss, rss = self.current()
        self.peak_pss, self.peak_rss = max(self.peak_pss, pss), max(self.peak_rss, rss)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self._sample()

    def __enter__(self) -> PeakMemory:
        self._sample()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self._sample()


def _version(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _git(*args: str) -> str:
    try:
        return subprocess.run(
            ["git", *args], cwd=REPO, capture_output=True, text=True, check=True
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return ""


def environment() -> dict[str, str]:
    """Machine and versions for the report header."""
    import torch

    commit = _git("rev-parse", "--short", "HEAD") or "unknown"
    if _git("status", "--porcelain", "--untracked-files=no"):
        commit += " (with uncommitted changes)"
    cuda = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "not available"
    return {
        "machine": f"{_cpu_model()}, {os.cpu_count()} cores, "
        f"{psutil.virtual_memory().total / 2**30:.1f} GiB RAM, {platform.system()}",
        "CUDA": cuda,
        "Python": platform.python_version(),
        "torch": _version("torch"),
        "PyTorch Lightning": _version("pytorch-lightning"),
        "medlit": f"{_version('medlit')}, git {commit}",
        "MONAI": _version("monai"),
        "torchio": _version("torchio"),
        "ITK (MONAI's .mhd reader)": _version("itk-io"),
        "medpy": _version("medpy"),
        "brats-evaluation (official scorer)": _version("BraTS-evaluation"),
        "SimpleITK": _version("SimpleITK"),
        "nibabel": _version("nibabel"),
        "albumentations": _version("albumentations"),
        "segmentation-models-pytorch": _version("segmentation-models-pytorch"),
        "numpy / scipy": f"{_version('numpy')} / {_version('scipy')}",
    }
