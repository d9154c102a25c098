"""Files a run attaches to itself (tables, figures, submissions, predictions), and the
logger method that takes them.

Lightning's ``Logger`` has no artifact method, so medlit's logger
(:class:`medlit.tracking.MLflowTracker`) declares one, :meth:`ArtifactLogger.log_folder`.
Tasks and entry points call :func:`log_file` / :func:`log_folder` with the trainer: the
files go to the first logger that takes artifacts, or, with none (``logger: false``,
TensorBoard, ...), into the trainer's log folder, so a run without MLflow keeps its
outputs. Nothing here knows MLflow: a task never imports the tracking package.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Protocol, runtime_checkable

from pytorch_lightning import Trainer


@runtime_checkable
class ArtifactLogger(Protocol):
    """A logger that attaches files to its run."""

    def log_folder(self, name: str, write: Callable[[Path], None]) -> None:
        """Fill a new folder with ``write(folder)`` and attach its files to the run under
        ``name`` ("" for the top level). A failed ``write`` leaves nothing behind."""


def log_folder(trainer: Trainer, name: str, write: Callable[[Path], None]) -> None:
    """``write(folder)`` the files of ``name`` and attach them to the run (rank 0 only;
    nothing under ``fast_dev_run``, which disables loggers and checkpoints)."""
    if not trainer.is_global_zero or trainer.fast_dev_run:
        return
    logger = next((lg for lg in trainer.loggers if isinstance(lg, ArtifactLogger)), None)
    if logger is not None:
        logger.log_folder(name, write)
        return
    folder = Path(trainer.log_dir or trainer.default_root_dir) / name
    folder.mkdir(parents=True, exist_ok=True)
    write(folder)


def log_file(trainer: Trainer, name: str, write: Callable[[Path], None]) -> None:
    """Write one artifact file ``name`` (may contain folders) with ``write(path)``."""
    parent, filename = Path(name).parent, Path(name).name
    log_folder(
        trainer, "" if parent == Path(".") else str(parent), lambda folder: write(folder / filename)
    )
