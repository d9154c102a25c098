"""Callbacks medlit adds to every run."""

from __future__ import annotations

import logging
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch
from pytorch_lightning import Callback, LightningModule, Trainer
from pytorch_lightning.callbacks import ModelCheckpoint
from pytorch_lightning.loggers import MLFlowLogger

from medlit.errors import NonFiniteLossError

log = logging.getLogger("medlit")


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


class LastCheckpoint(ModelCheckpoint):
    """``last.ckpt`` after every validation (or epoch): the full training state
    (weights, optimizers, schedulers, loops, callbacks, RNG) that
    ``medlit.fit CONFIG --ckpt_path=last`` continues from. It is kept beside the run's
    checkpoints and never uploaded as the run's model (that is the best checkpoint), and
    removed once the run has finished (:meth:`run_finished`)."""

    def __init__(self) -> None:
        super().__init__(save_last=True, save_top_k=0)

    # Lightning (2.6) writes last.ckpt only in a step where a top-k checkpoint was saved,
    # and this callback keeps no top-k: write it at every validation / epoch end.
    def on_validation_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if not self._should_skip_saving_checkpoint(trainer) and not (
            self._should_save_on_train_epoch_end(trainer)
        ):
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))

    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if not self._should_skip_saving_checkpoint(
            trainer
        ) and self._should_save_on_train_epoch_end(trainer):
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))

    @classmethod
    def run_finished(cls, trainer: Trainer, keep: bool = False) -> list[Path]:
        """Remove the ``last.ckpt`` this run wrote, once the run has finished (its fit, and
        its test when it has one, completed: the tracker marks it FINISHED), unless
        ``keep`` (``--keep_last_checkpoint``); returns the files removed.

        Only resuming reads it, and ``--ckpt_path=last`` never continues a finished run:
        it was three times the best checkpoint's size (optimizer moments) left on disk
        for nothing. Called by ``medlit.fit`` only after a run completed, never after an
        interruption, a failure, a requeue or a pruned sweep trial, whose last.ckpt is
        what continues them; the trainer's state is checked again here."""
        if keep or not trainer.is_global_zero or not trainer.state.finished or trainer.interrupted:
            return []
        removed = []
        for callback in trainer.callbacks:
            if isinstance(callback, cls) and callback.last_model_path:
                last = Path(callback.last_model_path)
                if last.is_file():
                    last.unlink()
                    removed.append(last)
        if removed:
            log.info(
                "the run has finished: removed %s (only resuming reads it; "
                "--keep_last_checkpoint=true keeps it)",
                ", ".join(map(str, removed)),
            )
        return removed


def _rng_states() -> dict[str, Any]:
    """RNG states as plain types and tensors, so that ``weights_only=True`` loads them."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    version, internal, gauss_next = random.getstate()
    states: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, gauss],
        "python": [version, list(internal), gauss_next],
    }
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def _set_rng_states(states: dict[str, Any]) -> None:
    torch.set_rng_state(states["torch"])
    kind, keys, pos, has_gauss, gauss = states["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    version, internal, gauss_next = states["python"]
    random.setstate((version, tuple(internal), gauss_next))
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


class ResumeState(Callback):
    """What Lightning's checkpoints leave out for an exact resume: the global RNG states
    (NumPy's drives medlit's patch sampling) and the MLflow run to log into.

    The states are taken when the checkpoint is written (at the end of an epoch's
    validation) and put back when the checkpoint is restored. Nothing draws random
    numbers between that point and the next training epoch's first batch in either run
    (Lightning isolates the sanity check's RNG), and that first batch is fetched when
    the resumed run builds its training iterator, before ``on_train_epoch_start``: so
    the resumed run draws the same patches and augmentations as the uninterrupted one
    (in a deterministic run, the same numbers).
    """

    def state_dict(self) -> dict[str, Any]:
        return {"rng": _rng_states()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if "rng" in state_dict:
            _set_rng_states(state_dict["rng"])

    def on_save_checkpoint(
        self, trainer: Trainer, pl_module: LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        # Lightning's MLflow logger (medlit's tracker is one): the run to continue.
        tracker = next((lg for lg in trainer.loggers if isinstance(lg, MLFlowLogger)), None)
        if tracker is not None:
            checkpoint["medlit"] = {"mlflow_run_id": tracker.run_id}


def _format(dim: int) -> torch.memory_format:
    """The channels-last memory format of a 4D (NHWC) or 5D (NDHWC) tensor."""
    return torch.channels_last if dim == 4 else torch.channels_last_3d


class Speedups(Callback):
    """``channels_last`` memory format and ``torch.compile`` for the task's networks
    (the top-level ``channels_last:`` / ``compile:`` config switches).

    Lightning has neither switch (its ``precision`` covers ``bf16-mixed``). Each network
    (a direct child module with parameters: the timm/SMP/YOLO model, a GAN's generator and
    discriminator) is compiled in place with ``nn.Module.compile``, so parameter names,
    checkpoints and ``weights_only`` loading are unchanged, and every call of the network,
    in training, whole-volume evaluation and prediction alike, runs the compiled code.

    Args:
        channels_last: convert the networks and 4D training images to NHWC; faster
            convolutions with tensor cores under mixed precision.
        compile: ``torch.compile`` each network (the first steps pay the compilation).
        compile_mode: ``torch.compile`` mode (``default``, ``reduce-overhead``,
            ``max-autotune``).
    """

    def __init__(
        self, channels_last: bool = False, compile: bool = False, compile_mode: str | None = None
    ) -> None:
        self.channels_last = channels_last
        self.compile = compile
        self.compile_mode = compile_mode
        self.compiled: list[str] = []

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if self.channels_last:  # 3D networks' 5D weights take the 3D variant (NDHWC)
            for param in pl_module.parameters():
                if param.dim() in (4, 5):
                    param.data = param.data.contiguous(memory_format=_format(param.dim()))
        if self.compile and not self.compiled:
            for name, child in pl_module.named_children():
                if any(True for _ in child.parameters()):
                    child.compile(mode=self.compile_mode)
                    self.compiled.append(name)

    def on_train_batch_start(
        self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if self.channels_last and isinstance(batch, dict):
            for key in ("image", "target_image"):
                value = batch.get(key)
                if isinstance(value, torch.Tensor) and value.dim() in (4, 5):
                    batch[key] = value.contiguous(memory_format=_format(value.dim()))
