"""Callbacks medlit adds to every run."""

from __future__ import annotations

from typing import Any

import torch
from pytorch_lightning import Callback, LightningModule, Trainer

from medlit.errors import NonFiniteLossError


class FiniteLossGuard(Callback):
    """Stop the run at the first NaN/Inf training loss, with a message that says so.

    Lightning has no per-step loss check any more (``terminate_on_nan`` was removed;
    ``detect_anomaly`` is a slow autograd debugger), and EarlyStopping's ``check_finite``
    only sees the monitored validation metric, epochs too late. All ranks agree on the
    decision, so DDP stops together instead of hanging.
    """

    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        loss = outputs.get("loss") if isinstance(outputs, dict) else outputs
        if not isinstance(loss, torch.Tensor):
            return
        bad = trainer.strategy.reduce_boolean_decision(
            not bool(torch.isfinite(loss).all()), all=False
        )
        if bad:
            lrs = [g["lr"] for opt in trainer.optimizers for g in opt.param_groups]
            raise NonFiniteLossError(
                f"training loss is {loss.detach().float().item()} at epoch {trainer.current_epoch}, "
                f"batch {batch_idx} (global step {trainer.global_step}); the run is stopped. Usual "
                f"causes: a learning rate too high (now {lrs}), non-finite input intensities, or "
                "fp16 overflow (try trainer.precision: bf16-mixed)."
            )
