"""``python -m benchmarks [--tiny] [--repeats N] [--only NAME,...] [--output PATH]``.

``--only quality`` runs every README demo unchanged instead (about an hour on 2 CPU cores)
and writes ``docs/quality.md``; it is not part of the default run."""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

from benchmarks import data
from benchmarks.common import FULL, REPO, THREAD_VARIABLES, TINY, Context, environment, pin_threads
from benchmarks.report import render

# name -> module; each module's run(ctx, log) returns a Section. Order = table order.
COMPARISONS = (
    "pipeline",
    "loader3d",
    "overhead",
    "inference",
    "inference3d",
    "metrics",
    "luna16",
    "startup",
    "tracking",
    "yolo",
)
# Selected by name only: the README demos at full size (benchmarks/quality.py), and GPU
# training throughput (benchmarks/gpu.py), which needs a CUDA device.
QUALITY = "quality"
GPU = "gpu"


def parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__)
    parser.add_argument(
        "--tiny",
        "--quick",
        action="store_true",
        help="tiny sizes, one repeat: checks that everything runs (the numbers mean nothing)",
    )
    parser.add_argument("--repeats", type=int, help="interleaved repeats (default 3; tiny 1)")
    parser.add_argument(
        "--only",
        help=f"comma-separated comparisons to run, of: {', '.join(COMPARISONS)}; or "
        f"{QUALITY!r}: every README demo unchanged, reported in --quality-output; or {GPU!r}: "
        "GPU training throughput (bf16-mixed, channels_last), reported in --gpu-output",
    )
    parser.add_argument(
        "--output", type=Path, default=REPO / "docs" / "benchmarks.md", help="the Markdown report"
    )
    parser.add_argument(
        "--quality-output",
        type=Path,
        default=REPO / "docs" / "quality.md",
        help="the demos' quality report (with --only quality)",
    )
    parser.add_argument(
        "--gpu-output",
        type=Path,
        default=REPO / "docs" / "benchmarks-gpu.md",
        help="the GPU report (with --only gpu)",
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch intra-op threads of every side (default 1: on a shared machine, more "
        "threads than idle cores make step times erratic)",
    )
    parser.add_argument(
        "--workdir",
        type=Path,
        help="keep the generated data and caches here and reuse them (default: a temporary "
        "folder, removed at the end)",
    )
    args = parser.parse_args(argv)
    args.only = args.only.split(",") if args.only else list(COMPARISONS)
    if unknown := [n for n in args.only if n not in (*COMPARISONS, QUALITY, GPU)]:
        parser.error(
            f"--only: unknown comparisons {unknown}; choose from {[*COMPARISONS, QUALITY, GPU]}"
        )
    return args


def main(argv: list[str] | None = None) -> Path:
    """Run what ``argv`` selects; returns the report written last."""
    args = parse(argv)
    start = time.perf_counter()

    def log(message: str) -> None:
        print(f"[{time.perf_counter() - start:6.0f} s] {message}", file=sys.stderr, flush=True)

    written = []
    if comparisons := [n for n in COMPARISONS if n in args.only]:
        written.append(compare(args, comparisons, log, args.output))
    if GPU in args.only:
        written.append(compare(args, [GPU], log, args.gpu_output))
    if QUALITY in args.only:
        written.append(quality(args, log))
    return written[-1]


def _workdir(args: argparse.Namespace) -> Path:
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="medlit-bench-"))
    workdir.mkdir(parents=True, exist_ok=True)
    return workdir.resolve()


def quality(args: argparse.Namespace, log: Callable[[str], None]) -> Path:
    """Every README demo at full size, each in a process of its own."""
    from benchmarks import quality as q

    workdir = _workdir(args)
    try:
        q.run(
            workdir / "quality", args.quality_output, log, f"python -m benchmarks --only {QUALITY}"
        )
    finally:
        if args.workdir is None:
            shutil.rmtree(workdir, ignore_errors=True)
    log(f"wrote {args.quality_output}")
    return args.quality_output


def compare(
    args: argparse.Namespace, names: list[str], log: Callable[[str], None], output: Path
) -> Path:
    """The comparisons ``names``, side by side with the alternatives."""
    start = time.perf_counter()
    sizes = TINY if args.tiny else FULL
    repeats = args.repeats or (1 if args.tiny else 3)
    workdir = _workdir(args)
    ctx = Context(workdir, sizes, repeats, args.threads)
    # The same for every side, here and in the processes the pipeline comparison starts;
    # restored at the end (the smoke test calls main() inside pytest).
    threads = torch.get_num_threads()
    saved = {name: os.environ.get(name) for name in THREAD_VARIABLES}
    import cv2
    import SimpleITK as sitk

    pools = (cv2.getNumThreads(), sitk.ProcessObject.GetGlobalDefaultNumberOfThreads())
    pin_threads(args.threads)
    # medlit and Lightning log at INFO; the benchmark's own progress lines are enough here.
    logging.basicConfig(level=logging.WARNING)
    load_start = os.getloadavg()
    try:
        log(f"{sizes.name} sizes, {repeats} repeats, working in {workdir}")
        if names != [GPU]:  # the GPU module trains on the demos' own data
            data.prepare(ctx, log)
        sections = []
        for name in names:
            log(f"{name} ...")
            module = importlib.import_module(f"benchmarks.{name}")
            sections.append(module.run(ctx, log))
        seconds = time.perf_counter() - start
        command = "python -m benchmarks" + (" --tiny" if args.tiny else "")
        if args.repeats:
            command += f" --repeats {args.repeats}"
        if args.threads != 1:
            command += f" --threads {args.threads}"
        if names != list(COMPARISONS):
            command += f" --only {','.join(names)}"
        report = render(
            sections, environment(), ctx, seconds, (load_start, os.getloadavg()), command
        )
    finally:
        torch.set_num_threads(threads)
        cv2.setNumThreads(pools[0])
        sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(pools[1])
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
        if args.workdir is None:
            shutil.rmtree(workdir, ignore_errors=True)
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(report)
    log(f"wrote {output}")
    return output


if __name__ == "__main__":
    main()
