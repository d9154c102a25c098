"""Tracking and sweep costs: what MLflow logging adds to a training step, and what one
``medlit.sweep`` trial costs beyond its training.

Logging: medlit's ``MLflowTracker`` (retries, outage buffering, the heartbeat tag) against
Lightning's own ``MLFlowLogger``, each logging the same metrics dict into its own SQLite
store (medlit's default store kind) in this process, call for call in turn.

Sweep trial: a three-trial grid sweep of a tiny BraTS configuration (one epoch of a few
steps). Each trial's wall time is Optuna's (from the worker asking for the trial to it
telling the result); a callback in the trial's own process stamps when the process was
created and when ``trainer.fit`` started and ended, which splits that time into: the
worker's side before the process (MLflow child run, trial log), the process's start-up
(interpreter, imports, config, data checks, trainer), training, and the end (teardown,
result, the trial log uploaded, the run closed).
"""

from __future__ import annotations

import atexit
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import yaml
from pytorch_lightning import Callback, LightningModule, Trainer

from benchmarks.common import (
    Context,
    Row,
    Section,
    interleave,
    median,
    spread,
    with_benchmarks,
)

# What the demo logs each logging step: the losses, the learning rate and the epoch.
METRICS = {"train/loss": 0.5, "train/dice_loss": 0.3, "train/ce_loss": 0.2, "lr-AdamW": 1e-3}
CALLS = {"full": 200, "tiny": 10}
TRIALS = {"full": 3, "tiny": 2}
LOG_EVERY = 20  # the demos' trainer.log_every_n_steps
TARGET_TRIAL_S = 10.0


class FitClock(Callback):
    """Writes to ``folder/<pid>.json`` the epoch times at which ``trainer.fit`` started and
    ended and, at interpreter exit (``atexit``: after medlit.fit returned and its run
    was closed), the exit."""

    def __init__(self, folder: str) -> None:
        self.path = Path(folder) / f"{os.getpid()}.json"
        self.stamps: dict[str, float] = {}

    def _write(self, **stamps: float) -> None:
        self.stamps.update(stamps)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.path.write_text(json.dumps(self.stamps))

    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._write(fit_start=time.time())

    def on_fit_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._write(fit_end=time.time())
        atexit.register(lambda: self._write(exit=time.time()))


def _logging(ctx: Context, log) -> dict[str, list[float]]:
    """Milliseconds per ``log_metrics`` call, per repeat, for each logger."""
    from pytorch_lightning.loggers import MLFlowLogger

    from medlit.tracking import MLflowTracker

    folder = ctx.workdir / "tracking-logging"
    loggers = {
        "medlit MLflowTracker": MLflowTracker(
            experiment_name="bench",
            tracking_uri=f"sqlite:///{folder / 'medlit' / 'mlflow.db'}",
            log_model=False,
        ),
        "Lightning MLFlowLogger": MLFlowLogger(
            experiment_name="bench",
            tracking_uri=f"sqlite:///{folder / 'lightning' / 'mlflow.db'}",
        ),
    }
    (folder / "lightning").mkdir(parents=True, exist_ok=True)
    calls = CALLS[ctx.sizes.name]
    step = {"n": 0}

    def side(logger):
        def once(repeat: int) -> float:
            start = time.perf_counter()
            for _ in range(calls):
                step["n"] += 1
                logger.log_metrics(METRICS, step=step["n"])
            return 1e3 * (time.perf_counter() - start) / calls

        return once

    for logger in loggers.values():  # the run is created on first use: not timed
        logger.log_metrics(METRICS, step=0)
    ms = interleave({k: side(v) for k, v in loggers.items()}, ctx.repeats, log)
    for logger in loggers.values():
        logger.finalize("success")
    return ms


def _sweep_files(ctx: Context, folder: Path) -> Path:
    """The tiny experiment and its sweep; returns the sweep file."""
    trials = TRIALS[ctx.sizes.name]
    data = {
        "root": str(ctx.data["brats_root"]),
        "cache_dir": str(ctx.data["cache_dir"]),
        "split": {"val_fraction": 0.34, "test_fraction": 0.0},
        "patch_size": 32,
        "loader": {"batch_size": 4, "num_workers": 0},
        "samples_per_epoch": 16,
    }
    experiment = {
        "seed_everything": 0,
        "trainer": {
            "max_epochs": 1,
            "accelerator": "cpu",
            "devices": 1,
            "enable_progress_bar": False,
            "enable_model_summary": False,
            "limit_val_batches": 1,
            "num_sanity_val_steps": 0,
            "default_root_dir": str(folder / "runs"),
            "logger": {
                "class_path": "medlit.tracking.MLflowTracker",
                "init_args": {
                    "experiment_name": "bench-sweep",
                    "tracking_uri": f"sqlite:///{folder / 'mlruns' / 'mlflow.db'}",
                },
            },
            "callbacks": [
                {
                    "class_path": "benchmarks.tracking.FitClock",
                    "init_args": {"folder": str(folder / "clock")},
                }
            ],
        },
        "model": {
            "class_path": "medlit.tasks.SegmentationTask",
            "init_args": {
                "arch": "unet",
                "encoder": "tu-test_resnet",
                "in_channels": 4,
                "num_classes": 3,
                "model_kwargs": {"decoder_channels": [32, 16, 16, 8, 8]},
                "target": "regions",
                "region_names": ["WT", "TC", "ET"],
                "loss": "dice_ce",
                "lr": 0.002,
                "log_images": False,
                "inference_batch_size": 16,
            },
        },
        "data": {"class_path": "medlit.datamodules.BraTSDataModule", "init_args": data},
    }
    (folder / "experiment.yaml").write_text(yaml.safe_dump(experiment, sort_keys=False))
    sweep = {
        "experiment": str(folder / "experiment.yaml"),
        "objective": {"metric": "val/dice_mean", "direction": "maximize"},
        "search_space": {
            "model.lr": {"type": "categorical", "choices": [0.001, 0.002, 0.004][:trials]}
        },
        "n_trials": trials,
        "sampler": {"name": "grid"},
        "pruner": {"name": "none"},
        "storage": str(folder / "optuna.journal"),
        "output_dir": str(folder / "sweep"),
    }
    path = folder / "bench.yaml"
    path.write_text(yaml.safe_dump(sweep, sort_keys=False))
    return path


def _sweep(ctx: Context, repeat: int) -> list[dict[str, float]]:
    """One sweep from an empty storage; each trial's split of its wall time (seconds)."""
    import shutil

    import optuna

    from medlit.tuning.storage import make_storage

    folder = ctx.workdir / "tracking-sweep" / str(repeat)
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    sweep = _sweep_files(ctx, folder)
    done = subprocess.run(
        [sys.executable, "-m", "medlit.sweep", str(sweep)],
        cwd=folder,
        env=with_benchmarks(),
        capture_output=True,
        text=True,
    )
    if done.returncode != 0:
        raise RuntimeError(f"medlit.sweep failed:\n{done.stdout[-2000:]}\n{done.stderr[-3000:]}")
    study = optuna.load_study(
        study_name=sweep.stem, storage=make_storage(str(folder / "optuna.journal"))
    )
    clocks = sorted(
        (json.loads(p.read_text()) for p in (folder / "clock").glob("*.json")),
        key=lambda c: c["fit_start"],
    )
    trials = sorted(study.trials, key=lambda t: t.datetime_start)
    if len(clocks) != len(trials) or any(t.state.name != "COMPLETE" for t in trials):
        raise RuntimeError(
            f"sweep: {len(trials)} trials, {len(clocks)} clocks: {done.stdout[-2000:]}"
        )
    split = []
    for trial, clock in zip(trials, clocks, strict=True):
        start, end = trial.datetime_start.timestamp(), trial.datetime_complete.timestamp()
        split.append(
            {
                "asked to trainer.fit (MLflow child run, process, imports, checks, trainer)": (
                    clock["fit_start"] - start
                ),
                "training (trainer.fit)": clock["fit_end"] - clock["fit_start"],
                "trainer.fit to exit (checkpoint kept, run closed)": clock["exit"]
                - clock["fit_end"],
                "exit to told (process exit, trial log uploaded, Optuna)": end - clock["exit"],
                "trial": end - start,
            }
        )
    shutil.rmtree(folder / "runs", ignore_errors=True)
    return split


def _imports() -> float:
    """Seconds for a fresh interpreter to import what a trial's process imports first."""
    start = time.perf_counter()
    subprocess.run(
        [sys.executable, "-c", "import medlit.fit, medlit.tasks, medlit.datamodules"], check=True
    )
    return time.perf_counter() - start


def run(ctx: Context, log=print) -> Section:
    section = Section("Tracking and sweep costs")
    ms = _logging(ctx, log)
    medlit_ms, lightning_ms = (median(v) for v in ms.values())
    ratio = lightning_ms / medlit_ms
    section.rows.append(
        Row(
            f"MLflow logging, one call of {len(METRICS)} metrics (SQLite store): medlit's "
            "MLflowTracker vs Lightning's MLFlowLogger",
            f"{medlit_ms:.2f} ms/call",
            f"{lightning_ms:.2f} ms/call",
            ratio,
            "speed-up ≥ 0.9x",
            ratio >= 0.9,
        )
    )
    trials: list[dict[str, float]] = []
    for r in range(ctx.repeats):
        trials += _sweep(ctx, r)
        log(f"  sweep {r + 1}/{ctx.repeats}: {TRIALS[ctx.sizes.name]} trials")
    parts = list(trials[0])
    beyond = [t["trial"] - t["training (trainer.fit)"] for t in trials]
    train_s = median([t["training (trainer.fit)"] for t in trials])
    section.rows.append(
        Row(
            "One `medlit.sweep` trial beyond its training (process, imports, checks, MLflow "
            "child run, Optuna): seconds outside `trainer.fit`",
            f"{median(beyond):.1f} s per trial",
            f"training: {train_s:.1f} s",
            median(beyond),
            f"< {TARGET_TRIAL_S:.0f} s",
            median(beyond) < TARGET_TRIAL_S,
        )
    )
    imports = _imports()
    calls = CALLS[ctx.sizes.name]
    section.details += [
        f"Logging: {calls} calls per repeat and logger, {ctx.repeats} repeats in turn, each "
        f"logger on its own SQLite store; metrics {', '.join(METRICS)}. With the demos' "
        f"`log_every_n_steps: {LOG_EVERY}` that is {medlit_ms / LOG_EVERY:.2f} ms per "
        "training step.",
        "",
        "| logger | ms per call: median (min-max, n) |",
        "| --- | --- |",
        *(f"| {k} | {spread(v)} |" for k, v in ms.items()),
        "",
        f"Sweep: {ctx.repeats} sweeps of {TRIALS[ctx.sizes.name]} trials (grid over `model.lr`), each from an "
        "empty Optuna journal and MLflow store; BraTS cases of the pipeline rows, 32 px "
        "patches, `tu-test_resnet` U-Net, one epoch of 4 steps and one validation batch "
        "(one whole case: most of the training time). The imports are most of a trial's "
        "start-up: a bare interpreter importing `medlit.fit`, its tasks and data modules "
        f"took {imports:.1f} s, measured once on its own.",
        "",
        "| part of a trial | seconds: median (min-max, n) |",
        "| --- | --- |",
        *(f"| {p} | {spread([t[p] for t in trials])} |" for p in parts),
    ]
    if median(beyond) >= TARGET_TRIAL_S:
        section.misses.append(
            f"**Sweep trial ({median(beyond):.1f} s beyond training).** Each trial is a fresh "
            "process (crash isolation, a clean CUDA context): the interpreter, torch, "
            "Lightning and MLflow imports and the data checks are paid again every trial."
        )
    return section
