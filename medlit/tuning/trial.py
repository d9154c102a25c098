"""The trial side of a sweep, inside the ``medlit.fit`` process that trains one trial.

The sweep worker passes the trial to the training process in ``MEDLIT_SWEEP_TRIAL``
(JSON: storage, study, trial id, objective, result file). Every rank of a DDP run reads
the same variable, so every rank trains with the same sampled values; rank 0 alone talks
to the storage and broadcasts the pruning decision.

Why not optuna-integration's ``PyTorchLightningPruningCallback``: it subclasses
``lightning.pytorch.Callback``, not the ``pytorch_lightning`` package medlit is built on,
needs the ``Trial`` object in the same process, and under DDP requires an RDB storage.
This callback is the same few calls (``report``/``should_prune``) for any storage.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

import optuna
from pytorch_lightning import Callback, LightningModule, Trainer

from medlit.errors import ConfigError

ENV = "MEDLIT_SWEEP_TRIAL"


def context() -> dict[str, Any] | None:
    raw = os.environ.get(ENV)
    return json.loads(raw) if raw else None


class TrialReporter(Callback):
    """Report the objective metric after every validation; stop the run when Optuna's
    pruner says so (the trial is then told PRUNED by the worker)."""

    def __init__(self, ctx: dict[str, Any]) -> None:
        self.ctx = ctx
        self.metric: str = ctx["metric"]
        self.maximize = ctx["direction"] == "maximize"
        self.history: list[tuple[int, float]] = []
        self.pruned = False
        self._trial: optuna.trial.Trial | None = None

    def _optuna_trial(self) -> optuna.trial.Trial:
        if self._trial is None:
            from medlit.tuning.space import PrunerConfig, make_pruner
            from medlit.tuning.storage import make_storage

            # The pruner lives in the worker's Study object, not in the storage: build
            # the sweep's own here, or Optuna's default (median) would decide.
            storage = make_storage(self.ctx["storage"])
            pruner = make_pruner(PrunerConfig(**self.ctx["pruner"]))
            study = optuna.load_study(study_name=self.ctx["study"], storage=storage, pruner=pruner)
            self._trial = optuna.trial.Trial(study, self.ctx["trial_id"])
        return self._trial

    def on_validation_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if trainer.sanity_checking:
            return
        value = trainer.callback_metrics.get(self.metric)
        if value is None:  # the same keys are logged on every rank: all raise together
            logged = sorted(k for k in trainer.callback_metrics if not k.startswith("train"))
            raise ConfigError(
                f"sweep objective.metric '{self.metric}' is not logged by "
                f"{type(pl_module).__name__}; validation logs: {', '.join(logged)}"
            )
        value = float(value)
        epoch = trainer.current_epoch
        self.history.append((epoch, value))
        prune = False
        if trainer.is_global_zero and math.isfinite(value):
            trial = self._optuna_trial()
            trial.report(value, step=epoch)
            prune = trial.should_prune()
        if trainer.world_size > 1:
            prune = bool(trainer.strategy.broadcast(prune, src=0))
        if prune:
            self.pruned = True
            trainer.should_stop = True

    def result(self) -> dict[str, Any]:
        values = [v for _, v in self.history if math.isfinite(v)]
        best = (max if self.maximize else min)(values) if values else None
        return {
            "pruned": self.pruned,
            "best": best,
            "last": values[-1] if values else None,
            "history": self.history,
        }


def write_result(path: str | Path, result: dict[str, Any]) -> None:
    from medlit.datasets.io.files import atomic_write

    atomic_write(Path(path), lambda tmp: Path(tmp).write_text(json.dumps(result, indent=1)))
