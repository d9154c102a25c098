"""Resuming a run: the checkpoint ``--ckpt_path`` names (``last``: the latest unfinished
run of the same config) and the MLflow run the resumed training logs into."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from medlit.checkpoints import load_checkpoint, run_id_of
from medlit.errors import ConfigError
from medlit.tracking.logger import MLflowTracker

log = logging.getLogger("medlit")


def resume_from(asked: str, trainer: Any, fingerprints: list[str]) -> str:
    """The checkpoint to continue from; the run's tracker is pointed at the MLflow run it
    belongs to (the resumed run logs into the same run id).

    ``fingerprints``: the config hashes this config is known by, newest scheme first
    (:func:`medlit.cli.config_hashes`): a run started by an older medlit is found too."""
    tracker = next((lg for lg in trainer.loggers if isinstance(lg, MLflowTracker)), None)
    if asked == "last":
        if tracker is None:
            raise ConfigError("--ckpt_path=last finds runs through MLflow; give a file path")
        path, run_id = last_unfinished(
            tracker, Path(tracker.save_dir or trainer.default_root_dir), fingerprints
        )
    else:
        path = Path(asked)
        run_id = run_id_of(load_checkpoint(path))
    if tracker is not None and run_id:
        tracker.reopen(run_id)
        log.info("resuming MLflow run %s from %s", run_id, path)
    return str(path)


def last_unfinished(
    tracker: MLflowTracker, root: Path, fingerprints: list[str]
) -> tuple[Path, str]:
    """``(last.ckpt, run id)`` of the newest run of this config that did not finish and
    left a ``last.ckpt`` under ``root/<experiment id>/<run id>/checkpoints``."""
    runs = sorted(
        {
            r.info.run_id: r for f in dict.fromkeys(fingerprints) for r in tracker.runs_of_config(f)
        }.values(),
        key=lambda r: r.info.start_time,
        reverse=True,
    )
    for run in runs:
        last = root / run.info.experiment_id / run.info.run_id / "checkpoints" / "last.ckpt"
        if run.info.status != "FINISHED" and last.is_file():
            return last, run.info.run_id
    raise ConfigError(
        f"--ckpt_path=last: experiment '{tracker.experiment_name}' at {tracker.tracking_uri} "
        f"has no unfinished run of this config with a last.ckpt ({len(runs)} runs of this "
        "config, all finished or without one); give the checkpoint's path instead"
    )
