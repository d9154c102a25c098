"""Train, then test the best checkpoint, of one experiment.

    python -m medlit.fit experiments/demo/brats_unet.yaml [--model.lr=3e-4 ...]

The data are checked and cached *before* a tracking run is opened, so a broken dataset
stops the command with the case and file named and leaves no MLflow run behind.
"""

from __future__ import annotations

import logging
import re
import shlex
import signal
import sys
from pathlib import Path

from pytorch_lightning import Trainer
from pytorch_lightning.callbacks import ModelCheckpoint
from pytorch_lightning.plugins.environments import SLURMEnvironment
from pytorch_lightning.utilities.exceptions import SIGTERMException

from medlit.callbacks import LastCheckpoint
from medlit.cli import build, check_schedule, prepare
from medlit.errors import ConfigError, exit_process, run_main
from medlit.overview import maybe_overview
from medlit.progress import EpochLine
from medlit.tracking import MLflowTracker
from medlit.tracking.resume import resume_from
from medlit.tuning.trial import TrialReporter, write_result

log = logging.getLogger("medlit")


def summary(
    metrics: dict[str, float],
    trackers: list[MLflowTracker],
    title: str = "Test results (best checkpoint)",
    best: str | None = None,
) -> str:
    """What a run leaves the user with: its test metrics, the best validation value with
    its epoch and checkpoint (``best``), and the run's page in the MLflow UI."""
    lines = ["", title, "-" * 40]
    width = max((len(k) for k in metrics), default=0)
    lines += [f"{k:<{width}}  {v:10.4f}" for k, v in sorted(metrics.items())]
    if best:
        lines.append(best)
    for t in trackers:
        if t.run_id:
            name = t.run(t.run_id)
            shown = f" '{name.info.run_name}'" if name is not None else ""
            lines.append(f"MLflow run{shown} (experiment '{t.experiment_name}', id {t.run_id})")
            if url := t.run_url:
                lines.append(f"  this run:    {url}")
            if url := t.experiment_url:
                lines.append(f"  its runs:    {url}")
            if t.tracking_uri.startswith("sqlite:"):
                lines.append(f"  (serve it first: mlflow ui --backend-store-uri {t.tracking_uri})")
        if t.dropped:
            lines.append(f"  warning: {t.dropped} tracking calls failed and were dropped")
    return "\n".join(lines)


def key_metrics(model: object, tested: dict[str, float], most: int = 5) -> list[str]:
    """The metrics a runs table shows first: the monitored validation metric, its test
    value, then the other test metrics (means and macro averages before the rest)."""
    monitor = getattr(model, "monitor", None)
    out = [monitor] if monitor else []
    if monitor and (test := "test/" + monitor.split("/", 1)[-1]) in tested:
        out.append(test)
    rest = sorted(
        (k for k in tested if k not in out),
        key=lambda k: (not k.endswith(("_mean", "_macro", "accuracy", "cpm")), k),
    )
    return out + rest[: max(0, most - len(out))]


def best_line(trainer: Trainer, best: str | None) -> str | None:
    """``best val/dice_mean 0.8123 at epoch 9/12: <checkpoint>``, from the epoch lines'
    record of the best validation (epochs counted from 1)."""
    line = next((c for c in trainer.callbacks if isinstance(c, EpochLine)), None)
    if line is None or line.best is None or line.best_epoch is None or not line.monitor:
        return None
    total = f"/{trainer.max_epochs}" if trainer.max_epochs and trainer.max_epochs > 0 else ""
    where = f": {best}" if best else ""
    return f"best {line.monitor} {line.best:.4f} at epoch {line.best_epoch + 1}{total}{where}"


def slurm_requeue_checkpoint(trainer: Trainer) -> Path | None:
    """The newest ``hpc_ckpt_N.ckpt`` that Lightning's SLURM auto-requeue handler saved in
    ``default_root_dir``, when this process is a SLURM job; None otherwise. Lightning
    would restore it by itself, behind the tracker's back, into a new MLflow run: medlit
    resumes from it explicitly, into the run that wrote it."""
    if not SLURMEnvironment.detect():
        return None
    found = {
        int(m.group(1)): p
        for p in Path(trainer.default_root_dir).glob("hpc_ckpt_*.ckpt")
        if (m := re.fullmatch(r"hpc_ckpt_(\d+)\.ckpt", p.name))
    }
    return found[max(found)] if found else None


def interrupted_by(exit_: SystemExit) -> str | None:
    """The signal behind Lightning's exit from ``fit``: SIGTERM raises its
    ``SIGTERMException`` (a ``SystemExit`` with status 0, so a preempted job looked
    successful), SIGINT becomes ``sys.exit(1)`` after its ``KeyboardInterrupt``."""
    if isinstance(exit_, SIGTERMException):
        return "SIGTERM"
    if isinstance(exit_.__context__, KeyboardInterrupt):
        return "SIGINT"
    return None


def interrupted(
    signame: str, args: list[str], trainer: Trainer, trackers: list[MLflowTracker]
) -> int:
    """Say how to continue an interrupted run, and the exit status (128 + the signal's
    number: 143 for SIGTERM, 130 for SIGINT). Lightning has finalised the run by then;
    medlit's tracker marks it KILLED, so ``--ckpt_path=last`` continues it."""
    callback = next((c for c in trainer.callbacks if isinstance(c, LastCheckpoint)), None)
    last = Path(callback.dirpath or "") / "last.ckpt" if callback is not None else None
    if trainer.is_global_zero:
        command = shlex.join([sys.executable, "-m", "medlit.fit", *args, "--ckpt_path=last"])
        where = (
            f"from {last}, the end of the last completed epoch (the interrupted epoch is "
            "trained again, exactly as it would have been)"
            if last is not None and last.is_file()
            else "from the start: no epoch had completed"
        )
        runs = ", ".join(f"MLflow run {t.run_id} is marked KILLED" for t in trackers if t.run_id)
        print(
            f"\nmedlit.fit: interrupted by {signame}{'; ' + runs if runs else ''}. Continue "
            f"it {where}:\n  {command}",
            file=sys.stderr,
        )
    return 128 + int(getattr(signal, signame))


def main(argv: list[str] | None = None) -> dict[str, float]:
    """Run one experiment; returns the test metrics of the best checkpoint."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args = sys.argv[1:] if argv is None else list(argv)
    if maybe_overview("medlit.fit", args):  # --help without a config
        return {}
    experiment = build(args)
    model, datamodule, trainer = experiment.model, experiment.datamodule, experiment.trainer
    check_schedule(model, trainer)
    prepare(datamodule)  # every case checked and cached before a run is opened
    resume = None
    asked = experiment.config.get("ckpt_path")
    if asked is None and (requeued := slurm_requeue_checkpoint(trainer)) is not None:
        # The run's last.ckpt (the end of its last epoch) resumes exactly; Lightning's
        # mid-epoch hpc checkpoint does not (one step is trained twice): it is used only
        # when no epoch had ended yet.
        try:
            resume = resume_from("last", trainer, experiment.fingerprints)
        except ConfigError:
            resume = resume_from(str(requeued), trainer, experiment.fingerprints)
        log.info("SLURM job requeued: continuing from %s", resume)
    elif asked is not None:
        resume = resume_from(asked, trainer, experiment.fingerprints)
    # Every checkpoint medlit writes holds tensors and plain values only.
    try:
        trainer.fit(model, datamodule=datamodule, ckpt_path=resume, weights_only=True)
    except SystemExit as e:  # Lightning's ways out on a signal (SIGTERMException, exit(1))
        signame = interrupted_by(e)
        if signame is None:
            raise
        raise SystemExit(
            interrupted(
                signame,
                args,
                trainer,
                [lg for lg in trainer.loggers if isinstance(lg, MLflowTracker)],
            )
        ) from None
    reporter = next((c for c in trainer.callbacks if isinstance(c, TrialReporter)), None)
    if reporter is not None:  # one trial of a sweep: hand the objective to the worker
        if trainer.is_global_zero:
            write_result(reporter.ctx["result_file"], reporter.result())
        if not reporter.ctx.get("test") or reporter.pruned:
            if not reporter.pruned:  # a finished trial; a pruned one stays as it stopped
                LastCheckpoint.run_finished(trainer, experiment.config.get("keep_last_checkpoint"))
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
    for tracker in trackers:  # the runs table opens with the run's key metrics
        tracker.show_metrics(key_metrics(model, metrics))
    if trainer.is_global_zero:
        title = "Test results (best checkpoint)" if best else "Test results (last weights)"
        print(summary(metrics, trackers, title, best_line(trainer, best)))
    LastCheckpoint.run_finished(trainer, experiment.config.get("keep_last_checkpoint"))
    return metrics


if __name__ == "__main__":
    exit_process(run_main(main))
