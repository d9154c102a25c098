"""BaseTask: the pipeline every medlit task shares (hyperparameters, models, losses,
optimiser and scheduler, and per-case evaluation tables that survive DDP)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, ClassVar, Literal

import numpy as np
import pandas as pd
import torch
import torch.distributed as dist
import torch.nn.functional as F
from pytorch_lightning import LightningModule
from pytorch_lightning.callbacks import BasePredictionWriter
from torch.optim.lr_scheduler import CosineAnnealingLR, LinearLR, SequentialLR

from medlit.artifacts import log_file
from medlit.constraints import plain
from medlit.datamodules.base import BaseDataModule
from medlit.datasets.slices import stack_slices
from medlit.errors import ConfigError


def predict_slices(
    volume: torch.Tensor,
    net: Callable[[torch.Tensor], torch.Tensor],
    in_channels: int,
    batch_size: int,
    multiple: int,
    activation: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> torch.Tensor:
    """Run a 2D/2.5D network over a whole (C, Z, Y, X) volume, slice by slice along z.

    ``in_channels`` must be an odd multiple of C (2·context + 1 slices per input); slices
    are padded to a ``multiple`` of the network's downsampling and cropped back. Returns
    (K, Z, Y, X), ``activation`` applied per batch of slices.
    """
    channels = volume.shape[0]
    per_slice = in_channels / channels
    if per_slice != int(per_slice) or int(per_slice) % 2 == 0:
        raise ConfigError(
            f"model.in_channels={in_channels} is not an odd multiple of the {channels} "
            "channels of the volume"
        )
    context = (int(per_slice) - 1) // 2
    depth, height, width = volume.shape[1:]
    pad = (0, -width % multiple, 0, -height % multiple)
    out = []
    for start in range(0, depth, batch_size):
        zs = np.arange(start, min(start + batch_size, depth))
        y = net(F.pad(stack_slices(volume, zs, context), pad))[..., :height, :width]
        out.append(activation(y) if activation is not None else y)
    return torch.cat(out).transpose(0, 1)


def uncertainty_map(
    mean: torch.Tensor, var: torch.Tensor | None, kind: str, regions: bool, dim: int = 0
) -> torch.Tensor:
    """Predictive uncertainty, reducing the channel axis ``dim`` of an ensemble's mean
    probabilities (``var``: the members' variance). ``entropy`` (nats): of the softmax
    classes, -sum p log p; of independent sigmoid ``regions``, the sum of their binary
    entropies (the entropy of the regions' joint distribution). ``variance``: the
    members' variance, averaged over the channels (0 for one model)."""
    if kind == "variance":
        if var is None:
            raise ValueError("the variance needs the members' variance")
        return var.mean(dim)
    p = mean.clamp(1e-12, 1)
    if not regions:
        return -(p * p.log()).sum(dim)
    q = (1 - mean).clamp(1e-12, 1)
    return -(p * p.log() + q * q.log()).sum(dim)


def warmup_cosine(
    optimizer: torch.optim.Optimizer, total: int, warmup: int = 0
) -> torch.optim.lr_scheduler.LRScheduler:
    """Per-epoch learning rate: ``warmup`` epochs rising linearly to the base rate (epoch
    e at (e + 1) / (warmup + 1) of it), then a cosine decay over the remaining epochs to
    1 % of it. torch's own schedulers, chained."""
    eta_min = [0.01 * group["lr"] for group in optimizer.param_groups]
    cosine = CosineAnnealingLR(optimizer, T_max=max(total - warmup, 1), eta_min=min(eta_min))
    if warmup <= 0:
        return cosine
    ramp = LinearLR(optimizer, start_factor=1 / (warmup + 1), end_factor=1.0, total_iters=warmup)
    return SequentialLR(optimizer, [ramp, cosine], milestones=[warmup])


class BaseTask(LightningModule):
    """Subclasses declare a typed ``__init__`` (the config schema) and implement
    ``configure_models``/``configure_losses``; the rest reads ``self.hparams``.

    ``monitor``/``mode`` name the metric that picks the best checkpoint.
    """

    monitor: str = "val/loss"
    mode: Literal["min", "max"] = "min"
    ignore: Sequence[str] = ()
    # A task whose steps leave some parameters without gradients (a GAN's discriminator
    # step never reaches the generator) makes ``strategy: ddp`` look for them.
    ddp_find_unused_parameters: bool = False
    # Renamed constructor arguments, new name -> old (medlit.deprecation).
    renamed_arguments: ClassVar[dict[str, str]] = {}

    def __init__(self) -> None:
        super().__init__()
        # logger=False: TrackConfig logs the whole resolved config (data and trainer too).
        self.save_hyperparameters(ignore=list(self.ignore), logger=False)
        self.configure_models()
        self.configure_losses()

    def configure_models(self) -> None:
        raise NotImplementedError

    # ---- ensembles ---------------------------------------------------------------------
    # A task that averages the probabilities of several models (the folds of a
    # cross-validation) says so; ``medlit.ensemble`` loads the members, and the task's
    # evaluation and prediction go through :meth:`ensemble_mean`.
    ensembles: ClassVar[bool] = False
    # The hyperparameters that give the outputs their meaning: every member must agree.
    output_hparams: ClassVar[tuple[str, ...]] = ("num_classes",)

    def set_ensemble(self, members: Sequence[BaseTask]) -> None:
        """Make this task average ``members`` (itself among them, first) wherever it
        predicts. They stay a plain list, not submodules: the task's own state dict,
        checkpoint and device placement are unchanged (:meth:`ensemble_mean` moves each
        member to this task's device and dtype when it is used)."""
        if not type(self).ensembles:
            raise ConfigError(
                f"{type(self).__name__} does not ensemble several checkpoints; give one --ckpt_path"
            )
        members = list(members)
        if not members or members[0] is not self:
            raise ValueError("the task itself must be the first member of its ensemble")
        self._members = members

    @property
    def members(self) -> list[BaseTask]:
        """The models this task averages: itself alone unless :meth:`set_ensemble`."""
        return getattr(self, "_members", None) or [self]

    def ready_members(self) -> list[BaseTask]:
        """The members, each on this task's device and dtype, in eval mode, attached to
        its trainer (the stage decides what they do: mirroring in test only)."""
        members = self.members
        param = next(self.parameters(), None)
        for m in members[1:]:
            if param is not None:
                m.to(device=param.device, dtype=param.dtype)
            m.eval()
            m.trainer = self._trainer
        return members

    def ensemble_mean(self, predict: Callable[[BaseTask], torch.Tensor]) -> torch.Tensor:
        """The mean of ``predict(member)`` (probabilities, in float32) over the members.
        nnU-Net's ensemble: each member's probabilities are computed whole (its own
        sliding window and mirroring), then averaged."""
        return self.ensemble_moments(predict)[0]

    def ensemble_moments(
        self, predict: Callable[[BaseTask], torch.Tensor], variance: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The mean of ``predict(member)`` over the members and, with ``variance``, their
        variance (population: over the members as they are), both float32."""
        members = self.ready_members()
        if len(members) == 1:
            out = predict(self).float()
            return out, (torch.zeros_like(out) if variance else None)
        total: torch.Tensor | None = None
        squares: torch.Tensor | None = None
        for m in members:
            out = predict(m).float()
            total = out if total is None else total + out
            if variance:
                squares = out.square() if squares is None else squares + out.square()
        assert total is not None
        mean = total / len(members)
        if squares is None:
            return mean, None
        return mean, (squares / len(members) - mean.square()).clamp(min=0)

    # ---- predictive uncertainty (medlit.predict --uncertainty) ------------------------
    # ``entropy``: the entropy (nats) of the mean probabilities; ``variance``: the
    # members' variance of the probabilities, averaged over the channels. None: off.
    uncertainty: str | None = None

    def prediction_writer(self, output: Path) -> BasePredictionWriter:
        """The writer of this task's predictions into ``output`` (``medlit.predict``): one
        of :mod:`medlit.writers`, matching what ``predict_step`` returns."""
        raise ConfigError(f"{type(self).__name__} does not write predictions")

    @property
    def data(self) -> BaseDataModule | None:
        """The trainer's data module when it is a medlit one (the contract of
        :class:`~medlit.datamodules.base.BaseDataModule`); None before a trainer is
        attached or with another kind of data module."""
        dm = self._trainer.datamodule if self._trainer is not None else None
        return dm if isinstance(dm, BaseDataModule) else None

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # Parsed arguments are jsonargparse's range types (medlit.constraints); the
        # checkpoint keeps plain numbers, so that weights_only=True loads it anywhere.
        for key in ("hyper_parameters", "datamodule_hyper_parameters"):
            if key in checkpoint:
                checkpoint[key] = plain(checkpoint[key])

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Drop loss buffers this module does not have: they are derived from the training
        data at ``fit`` (class weights) and play no part in evaluation or prediction. A
        checkpoint written before the schedules became torch's own (a ``LambdaLR`` state)
        gets the state of today's schedule at the same epoch, so that it still resumes."""
        own = self.state_dict()
        state = checkpoint.get("state_dict", {})
        for key in [k for k in state if k.startswith("loss.") and k not in own]:
            del state[key]
        schedulers = checkpoint.get("lr_schedulers") or []
        if any("lr_lambdas" in s for s in schedulers) and self._trainer is not None:
            fresh = self.configure_optimizers()
            rebuilt = fresh[1] if isinstance(fresh, tuple | list) else [fresh["lr_scheduler"]]
            for i, (old, new) in enumerate(zip(schedulers, rebuilt, strict=True)):
                new = new["scheduler"] if isinstance(new, dict) else new
                for _ in range(old["last_epoch"]):
                    new.optimizer.step()  # no gradients: a no-op, that torch wants first
                    new.step()
                schedulers[i] = new.state_dict()

    def configure_losses(self) -> None:
        pass

    def configure_optimizers(self) -> dict[str, Any]:
        """AdamW with linear warm-up then cosine decay (per epoch), unless ``scheduler: none``."""
        h = self.hparams
        optimizer = torch.optim.AdamW(self.parameters(), lr=h["lr"], weight_decay=h["weight_decay"])
        if h.get("scheduler", "cosine") == "none":
            return {"optimizer": optimizer}
        total = max(int(self.trainer.max_epochs or 1), 1)
        warmup = min(int(h.get("warmup_epochs", 0)), total - 1)
        return {
            "optimizer": optimizer,
            "lr_scheduler": {
                "scheduler": warmup_cosine(optimizer, total, warmup),
                "interval": "epoch",
            },
        }

    def log_train_loss(self, loss: torch.Tensor, batch_size: int) -> None:
        self.log(
            "train/loss", loss, on_step=True, on_epoch=True, prog_bar=True, batch_size=batch_size
        )

    # ---- the evaluation template ----------------------------------------------------------
    # Validation and test run the same two steps: each batch is scored (a whole case, or
    # a batch of images) into rows, and at the end of the stage every rank's rows are
    # gathered (each case once) and logged. A task writes the two steps; the hooks are
    # Lightning's, once for every task.

    def evaluate_batch(self, batch: dict[str, Any], stage: str) -> None:
        """Score one validation or test batch (``stage``: ``val`` or ``test``) into rows."""
        raise NotImplementedError

    def finish_stage(self, stage: str) -> None:
        """Gather every rank's rows of ``stage`` (:meth:`gather_rows`) and log them."""
        raise NotImplementedError

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self.evaluate_batch(batch, "val")

    def test_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self.evaluate_batch(batch, "test")

    def on_validation_epoch_end(self) -> None:
        self.finish_stage("val")

    def on_test_epoch_end(self) -> None:
        self.finish_stage("test")

    # ---- per-case evaluation shared by volume-level tasks -----------------------------

    @staticmethod
    def all_ranks(obj: Any) -> list[Any]:
        """``obj`` of every rank, in rank order (``[obj]`` without DDP). Every rank must call it."""
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            parts: list[Any] = [None] * dist.get_world_size()
            dist.all_gather_object(parts, obj)
            return parts
        return [obj]

    def gather_rows(self, rows: list[dict[str, Any]], key: str = "case_id") -> list[dict[str, Any]]:
        """All ranks' per-case rows, each case once.

        A DistributedSampler pads the last round by repeating cases; dropping repeated
        keys makes every case count exactly once, whatever the world size.
        """
        rows = [r for part in self.all_ranks(rows) for r in part]
        unique = {r[key]: r for r in rows}
        return [unique[k] for k in sorted(unique)]

    # Per-case table columns kept in the table only, not logged as means (by prefix).
    table_only: tuple[str, ...] = ()

    def log_case_table(self, stage: str, rows: list[dict[str, Any]]) -> dict[str, float]:
        """Log the mean of every numeric column as ``{stage}/{column}`` (but those of
        ``table_only``) and the table as CSV."""
        if not rows:
            return {}
        table = pd.DataFrame(rows).set_index("case_id")
        means = {
            f"{stage}/{c}": float(np.mean(table[c]))
            for c in table.columns
            if np.issubdtype(table[c].dtype, np.number) and not c.startswith(self.table_only)
        }
        # Every rank holds the same gathered table, so syncing (a mean over ranks) is a no-op
        # that keeps all ranks' logged values, and Lightning's DDP checks, in agreement.
        for name, value in means.items():
            self.log(name, value, sync_dist=True)
        if not self.trainer.sanity_checking:
            log_file(self.trainer, f"{stage}_per_case.csv", lambda p: table.to_csv(p))
        return means
