"""What the terminal shows while a run trains: one line per epoch with the monitored
validation metric and its best so far, and a progress bar that fits 80 columns.

Lightning's progress bar shows the training loss and ``v_num`` only, never a validation
value, and in a log file (a SLURM job, ``> run.log``) it writes nothing until the end.
:class:`EpochLine` prints after each validation::

    epoch 3/12  train/loss 0.4123  val/loss 0.3812  val/dice_mean 0.6234  best 0.6500 (epoch 2)  11.2 s

Epochs are counted from 1 here, as a person counts them (Lightning's ``epoch`` and the
``best-NNN.ckpt`` names count from 0). Sweep workers relay these lines from each
trial's log (lines starting with ``epoch ``).
"""

from __future__ import annotations

import math
import sys
import time
from typing import Any

from pytorch_lightning import Callback, LightningModule, Trainer
from pytorch_lightning.callbacks import ProgressBar, RichProgressBar, TQDMProgressBar
from pytorch_lightning.utilities.imports import _RICH_AVAILABLE


def interactive() -> bool:
    """Whether stdout is a terminal a progress bar can redraw (not a log file or a pipe)."""
    return bool(getattr(sys.stdout, "isatty", lambda: False)())


def _number(value: float) -> str:
    return f"{value:.4g}" if abs(value) >= 1e4 or (value and abs(value) < 1e-3) else f"{value:.4f}"


class EpochLine(Callback):
    """One line per validation: the epoch, the training and validation losses, the
    monitored metric and its best so far (and at which epoch), and the epoch's time.

    Printed through the progress bar when there is one (so that it does not tear the
    bar), else to stdout. The best value and epoch are checkpoint state, so a resumed run
    goes on counting from the run's real best. ``best`` is also what ``medlit.fit``'s
    final summary reports."""

    def __init__(self) -> None:
        self.best: float | None = None
        self.best_epoch: int | None = None  # counted from 0, as Lightning does
        self.monitor: str | None = None
        self.mode = "min"  # the task's, at setup
        self._started = 0.0

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        self.monitor = getattr(pl_module, "monitor", None)
        self.mode = getattr(pl_module, "mode", "min")

    def on_train_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._started = time.monotonic()

    def _value(self, trainer: Trainer, key: str) -> float | None:
        value = trainer.callback_metrics.get(key)
        if value is None:
            return None
        value = float(value)
        return value if math.isfinite(value) else None

    def on_validation_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if trainer.sanity_checking or trainer.state.fn != "fit":
            return
        epoch = trainer.current_epoch
        value = self._value(trainer, self.monitor) if self.monitor else None
        if value is not None and (
            self.best is None or (value > self.best if self.mode == "max" else value < self.best)
        ):
            self.best, self.best_epoch = value, epoch
        if not trainer.is_global_zero:
            return
        total = f"/{trainer.max_epochs}" if trainer.max_epochs and trainer.max_epochs > 0 else ""
        parts = [f"epoch {epoch + 1}{total}"]
        losses = ["train/loss", "train/loss_epoch", "val/loss"]
        shown = set()
        for key in losses:
            name = key.removesuffix("_epoch")
            if name not in shown and (v := self._value(trainer, key)) is not None:
                parts.append(f"{name} {_number(v)}")
                shown.add(name)
        if self.monitor and self.monitor not in shown:
            parts.append(f"{self.monitor} {_number(value) if value is not None else '-'}")
        if self.best is not None and self.best_epoch is not None:
            parts.append(f"best {_number(self.best)} (epoch {self.best_epoch + 1})")
        if self._started:
            parts.append(f"{time.monotonic() - self._started:.1f} s")
        line = "  ".join(parts)
        bar = trainer.progress_bar_callback
        if isinstance(bar, ProgressBar) and bar.is_enabled:
            bar.print(line)
        else:
            print(line, flush=True)

    def state_dict(self) -> dict[str, Any]:
        return {"best": self.best, "best_epoch": self.best_epoch}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.best = state_dict.get("best")
        self.best_epoch = state_dict.get("best_epoch")


class _Fewer:
    """The bar's metrics, fewer: the step's training loss as ``loss`` (the epoch's
    average is on the epoch line), without ``v_num`` (the MLflow run id's tail, which
    says nothing), so that the bar fits 80 columns instead of wrapping over 4 lines."""

    def get_metrics(self, trainer: Trainer, pl_module: LightningModule) -> dict[str, Any]:
        items = super().get_metrics(trainer, pl_module)  # type: ignore[misc]
        items.pop("v_num", None)
        items.pop("train/loss_epoch", None)
        if "train/loss_step" in items:
            items["loss"] = items.pop("train/loss_step")
        return items


class MedlitRichProgressBar(_Fewer, RichProgressBar):
    """Lightning's rich progress bar with :class:`_Fewer` metrics, its epochs counted
    from 1 as on the epoch lines (Lightning's says "Epoch 0/11" for the first of 12)."""

    def _get_train_description(self, current_epoch: int) -> str:
        total = self.trainer.max_epochs
        text = f"Epoch {current_epoch + 1}" + (f"/{total}" if total and total > 0 else "")
        return f"{text:{len(self.validation_description)}}"


class MedlitTQDMProgressBar(_Fewer, TQDMProgressBar):
    """Lightning's tqdm progress bar with :class:`_Fewer` metrics."""


def progress_bar() -> ProgressBar:
    """The bar Lightning would choose (rich when installed), with fewer metrics."""
    return MedlitRichProgressBar() if _RICH_AVAILABLE else MedlitTQDMProgressBar()
