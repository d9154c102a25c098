"""A run's learning curves as one PNG, like Ultralytics' ``results.png``: the training and
validation losses per epoch and the monitored metric, its best epoch marked.

MLflow's UI draws one metric at a time, against the global step, and only while its
server runs; this picture is an artifact of the run, readable anywhere. Lightning has
no such callback. :class:`LearningCurves` keeps the epoch values in its checkpoint state,
so a resumed run's picture covers every epoch, not only those since the resume.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator
from pytorch_lightning import Callback, LightningModule, Trainer
from pytorch_lightning.trainer.states import TrainerFn

from medlit.artifacts import log_file
from medlit.tasks.base import BaseTask
from medlit.tracking.logger import MLflowTracker

log = logging.getLogger(__name__)
Mode = Literal["min", "max"]


def epoch_values(metrics: Mapping[str, Any], prefix: str, losses_only: bool) -> dict[str, float]:
    """The epoch values of ``{prefix}*`` (``{prefix}*loss*`` with ``losses_only``) in
    Lightning's callback metrics: a value logged per step and per epoch appears as
    ``name``, ``name_step`` and ``name_epoch``; the epoch value is kept, under ``name``."""
    out: dict[str, float] = {}
    for key, value in metrics.items():
        if not key.startswith(prefix) or key.endswith("_step"):
            continue
        if losses_only and "loss" not in key:
            continue
        name = key.removesuffix("_epoch")
        if name != key or name not in out:
            out[name] = float(value)
    return out


def is_loss(key: str) -> bool:
    """A curve of the losses panel: every ``train/`` value (medlit's tasks log only loss
    terms there: a GAN's ``train/d_loss``, ``train/g_adv`` and ``train/l1``, a detector's
    box, class and DFL losses) and the validation losses."""
    return key.startswith("train/") or (key.startswith("val/") and "loss" in key)


def best_epoch(history: Sequence[Mapping[str, float]], monitor: str, mode: Mode) -> int | None:
    """The epoch of the monitor's best finite value (the first one on a tie, as
    ModelCheckpoint keeps it), or None when it has none."""
    scored = [
        (row[monitor], int(row["epoch"]))
        for row in history
        if monitor in row and math.isfinite(row[monitor])
    ]
    if not scored:
        return None
    pick = min if mode == "min" else max
    best = pick(value for value, _ in scored)
    return next(epoch for value, epoch in scored if value == best)


def plot_curves(
    history: Sequence[Mapping[str, float]],
    monitor: str | None,
    mode: Mode,
    path: str | Path,
) -> None:
    """Write the curves of ``history`` (one mapping per epoch: ``epoch`` and the values
    of that epoch) to the PNG ``path``: the losses on the left (training solid,
    validation dashed), the monitored metric on the right, the best epoch marked on both.
    Matplotlib's Agg canvas draws it (no display, no pyplot state); its fonts are
    bundled, none is fetched."""
    rows = sorted(history, key=lambda r: r["epoch"])
    losses = sorted({k for r in rows for k in r if is_loss(k)})
    has_monitor = monitor is not None and any(monitor in r for r in rows)
    best = best_epoch(rows, monitor, mode) if monitor is not None else None
    fig = Figure(figsize=(11 if has_monitor else 6, 4), layout="constrained")
    axes = fig.subplots(1, 2 if has_monitor else 1, squeeze=False)[0]

    def series(key: str) -> tuple[list[int], list[float]]:
        points = [(int(r["epoch"]), r[key]) for r in rows if key in r and math.isfinite(r[key])]
        return [e for e, _ in points], [v for _, v in points]

    for key in losses:
        style = "--" if key.startswith("val/") else "-"
        axes[0].plot(*series(key), style, marker="o", markersize=3, label=key)
    axes[0].set_title("losses" if losses else "no losses logged")
    if losses:
        axes[0].legend(fontsize="small")
    if has_monitor:
        assert monitor is not None
        axes[1].plot(*series(monitor), "-", marker="o", markersize=3, color="tab:green")
        title = f"{monitor} ({mode})"
        if best is not None:
            value = next(r[monitor] for r in rows if int(r["epoch"]) == best)
            axes[1].plot([best], [value], "*", markersize=14, color="tab:red", label="best")
            title += f"\nbest {value:.4g} at epoch {best}"
        axes[1].set_title(title)
    for ax in axes:
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        if best is not None:
            ax.axvline(best, color="tab:red", linestyle=":", linewidth=1)
    fig.savefig(path, dpi=100)


class LearningCurves(Callback):
    """Collect each epoch's losses (:func:`is_loss`) and monitored metric, and log ``filename`` (a PNG of
    them, :func:`plot_curves`) to the run when training ends, or stops on an error or a
    signal.

    Validation values are read at ``on_validation_end``, where the task's epoch-end
    metrics (logged in ``on_validation_epoch_end``, after callbacks' hooks of that name)
    are in; training values at ``on_train_epoch_end``. Rank zero alone collects and
    writes. The monitor and mode are the task's (:class:`~medlit.tasks.base.BaseTask`);
    they are also tagged on an MLflow run (``medlit.monitor``, ``medlit.mode``) so that
    ``python -m medlit.tracking runs`` shows each run's best value.

    Args:
        filename: artifact name of the picture.
        monitor: metric to plot beside the losses; default the task's ``monitor``.
        mode: whether its best is its ``min`` or ``max``; default the task's ``mode``.
    """

    def __init__(
        self,
        filename: str = "learning_curves.png",
        monitor: str | None = None,
        mode: Mode | None = None,
    ) -> None:
        self.filename = filename
        self.monitor = monitor
        self.mode: Mode = mode or "min"
        self._mode_given = mode is not None
        self.history: list[dict[str, float]] = []  # one row per epoch, in epoch order

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if isinstance(pl_module, BaseTask):
            self.monitor = self.monitor or pl_module.monitor
            self.mode = self.mode if self._mode_given else pl_module.mode

    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if not trainer.is_global_zero or self.monitor is None:
            return
        for tracker in (lg for lg in trainer.loggers if isinstance(lg, MLflowTracker)):
            tracker.set_tags({"medlit.monitor": self.monitor, "medlit.mode": self.mode})

    def _record(self, epoch: int, values: dict[str, float]) -> None:
        row = next((r for r in self.history if r["epoch"] == epoch), None)
        if row is None:  # a resumed mid-epoch checkpoint repeats its epoch: one row still
            row = {"epoch": epoch}
            self.history.append(row)
            self.history.sort(key=lambda r: r["epoch"])
        row.update(values)

    def _stage_values(self, trainer: Trainer, prefix: str) -> dict[str, float]:
        values = epoch_values(trainer.callback_metrics, prefix, losses_only=prefix == "val/")
        # The monitor in the hook of its own stage: a validation value read at a training
        # epoch's end would be the last validation's, under a later epoch.
        value = trainer.callback_metrics.get(self.monitor) if self.monitor else None
        if value is not None and self.monitor.startswith(prefix):
            values[self.monitor] = float(value)
        return values

    def on_validation_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        # Not the sanity check (no epoch), nor trainer.validate() after fit (no training).
        fitting = trainer.state.fn == TrainerFn.FITTING
        if trainer.sanity_checking or not fitting or not trainer.is_global_zero:
            return
        self._record(trainer.current_epoch, self._stage_values(trainer, "val/"))

    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if not trainer.is_global_zero:
            return
        self._record(trainer.current_epoch, self._stage_values(trainer, "train/"))

    def write(self, trainer: Trainer) -> None:
        """Log the picture of the epochs so far (a resumed run's replaces it)."""
        if self.history:
            history = [dict(r) for r in self.history]
            log_file(
                trainer, self.filename, lambda p: plot_curves(history, self.monitor, self.mode, p)
            )

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self.write(trainer)

    def on_exception(
        self, trainer: Trainer, pl_module: LightningModule, exception: BaseException
    ) -> None:
        # A run stopped by a signal or an error still shows its curves so far; a failure
        # here must not hide the exception that stopped the run.
        if trainer.state.fn != TrainerFn.FITTING:
            return
        try:
            self.write(trainer)
        except Exception as e:  # noqa: BLE001
            log.warning("learning curves not written: %s: %s", type(e).__name__, e)

    def state_dict(self) -> dict[str, Any]:
        # Plain floats and ints, so that a checkpoint loads with weights_only=True.
        return {"history": [dict(r) for r in self.history]}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.history = [dict(r) for r in state_dict.get("history", [])]
