"""Train, then test the best checkpoint, of one experiment.

    python -m medlit.fit experiments/demo/brats_unet.yaml [--model.lr=3e-4 ...]

The data are checked and cached *before* a tracking run is opened, so a broken dataset
stops the command with the case and file named and leaves no MLflow run behind.
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path
from typing import Any

from pytorch_lightning.callbacks import ModelCheckpoint

from medlit.cli import MedlitCLI, config_hash, run_main
from medlit.errors import ConfigError
from medlit.tracking import MLflowTracker
from medlit.tuning.trial import TrialReporter, write_result

log = logging.getLogger("medlit")


def _normalise_args(argv: list[str]) -> list[str]:
    """``CONFIG [overrides]`` -> ``--config CONFIG [overrides]`` (LightningCLI's spelling)."""
    if argv and not argv[0].startswith("-"):
        return ["--config", argv[0], *argv[1:]]
    return argv


def _check_compatible(model: Any, datamodule: Any) -> None:
    channels = getattr(datamodule, "num_channels", None)
    expected = getattr(model, "hparams", {}).get("in_channels")
    if channels is not None and expected is not None and channels != expected:
        raise ConfigError(
            f"model.in_channels={expected} but the data module yields {channels} channels "
            f"({type(datamodule).__name__}: modalities × (2·context_slices + 1)); set "
            f"--model.in_channels={channels}"
        )


def load_checkpoint(path: Path) -> dict[str, Any]:
    """A checkpoint loaded with ``weights_only=True`` (tensors and plain values only), or a
    ``ConfigError`` naming the file."""
    import torch

    if not path.is_file():
        raise ConfigError(f"--ckpt_path {path}: no such checkpoint file")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - not a checkpoint medlit can load safely
        raise ConfigError(
            f"--ckpt_path {path}: not a checkpoint that loads with weights_only=True "
            f"({type(e).__name__}: {str(e).splitlines()[0][:200]})"
        ) from None


def resume_from(asked: str, trainer: Any, fingerprint: str) -> str:
    """The checkpoint to continue from, and the MLflow run it belongs to, which the run's
    tracker is pointed at (the resumed run logs into the same run id)."""
    tracker = next((lg for lg in trainer.loggers if isinstance(lg, MLflowTracker)), None)
    if asked == "last":
        if tracker is None:
            raise ConfigError("--ckpt_path=last finds runs through MLflow; give a file path")
        path, run_id = _last_unfinished(tracker, trainer, fingerprint)
    else:
        path = Path(asked)
        run_id = (load_checkpoint(path).get("medlit") or {}).get("mlflow_run_id")
    if tracker is not None and run_id:
        tracker._run_id = run_id
        tracker._safely("reopen run", lambda: tracker.experiment.update_run(run_id, "RUNNING"))
        log.info("resuming MLflow run %s from %s", run_id, path)
    return str(path)


def _last_unfinished(tracker: MLflowTracker, trainer: Any, fingerprint: str) -> tuple[Path, str]:
    client = tracker._mlflow_client
    exp = client.get_experiment_by_name(tracker._experiment_name)
    runs = (
        client.search_runs(
            [exp.experiment_id],
            filter_string=f"tags.`medlit.config_hash` = '{fingerprint}'",
            order_by=["attributes.start_time DESC"],
        )
        if exp is not None
        else []
    )
    root = Path(tracker.save_dir or trainer.default_root_dir)
    for run in runs:
        last = root / run.info.experiment_id / run.info.run_id / "checkpoints" / "last.ckpt"
        if run.info.status != "FINISHED" and last.is_file():
            return last, run.info.run_id
    raise ConfigError(
        f"--ckpt_path=last: experiment '{tracker._experiment_name}' at {tracker._tracking_uri} "
        f"has no unfinished run of this config with a last.ckpt ({len(runs)} runs of this "
        "config, all finished or without one); give the checkpoint's path instead"
    )


def summary(
    metrics: dict[str, float],
    trackers: list[MLflowTracker],
    title: str = "Test results (best checkpoint)",
) -> str:
    lines = ["", title, "-" * 40]
    width = max((len(k) for k in metrics), default=0)
    lines += [f"{k:<{width}}  {v:10.4f}" for k, v in sorted(metrics.items())]
    for t in trackers:
        if t.run_id:
            lines.append(
                f"MLflow run {t.run_id} (experiment '{t._experiment_name}') at {t._tracking_uri}"
            )
            if t._tracking_uri.startswith("sqlite:"):
                lines.append(f"  view: mlflow ui --backend-store-uri {t._tracking_uri}")
        if t.dropped:
            lines.append(f"  warning: {t.dropped} tracking calls failed and were dropped")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, float]:
    """Run one experiment; returns the test metrics of the best checkpoint."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    cli = MedlitCLI(args=_normalise_args(list(sys.argv[1:] if argv is None else argv)))
    model, datamodule, trainer = cli.model, cli.datamodule, cli.trainer
    _check_compatible(model, datamodule)
    # Check and cache every case before a run is opened. Under torchrun/SLURM every rank
    # runs this file: only each node's first process prepares (as Lightning does), the
    # others wait for it at Lightning's own prepare_data barrier inside fit.
    if int(os.environ.get("LOCAL_RANK", 0)) == 0:
        datamodule.prepare_data()
    resume = None
    if (asked := cli.config.get("ckpt_path")) is not None:
        resume = resume_from(asked, trainer, config_hash(cli.config.as_dict()))
    # Every checkpoint medlit writes holds tensors and plain values only.
    trainer.fit(model, datamodule=datamodule, ckpt_path=resume, weights_only=True)
    reporter = next((c for c in trainer.callbacks if isinstance(c, TrialReporter)), None)
    if reporter is not None:  # one trial of a sweep: hand the objective to the worker
        if trainer.is_global_zero:
            write_result(reporter.ctx["result_file"], reporter.result())
        if not reporter.ctx.get("test") or reporter.pruned:
            return {}
    ckpt = trainer.checkpoint_callback
    best = (
        ckpt.best_model_path if isinstance(ckpt, ModelCheckpoint) and ckpt.best_model_path else None
    )
    if best is None:
        log.warning("no best checkpoint (fast_dev_run or no validation): testing the last weights")
    results = trainer.test(
        model, datamodule=datamodule, ckpt_path=best, verbose=False, weights_only=True
    )
    metrics = {k: float(v) for k, v in (results[0] if results else {}).items()}
    trackers = [lg for lg in trainer.loggers if isinstance(lg, MLflowTracker)]
    if trainer.is_global_zero:
        print(summary(metrics, trackers))
    return metrics


if __name__ == "__main__":
    sys.exit(run_main(main))
