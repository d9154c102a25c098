"""The MLflow runs of a ``medlit.cv`` cross-validation, read back: its folds'
checkpoints (``--cv_run`` ensembles), the postprocessing it chose, and an ensemble's
evaluation recorded under its parent run. Apart from :mod:`medlit.cv`, which makes the
runs, so that ``medlit.predict`` and ``medlit.evaluate`` read them without importing the
runner (which runs ``medlit.evaluate``)."""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import mlflow
import numpy as np

from medlit.errors import ConfigError
from medlit.postprocessing import Postprocessing
from medlit.tracking.store import sqlite_dir

ROLE, FOLD, KEY = "medlit.cv.role", "fold", "medlit.cv.key"


def checkpoint_folder(uri: str, config: dict[str, Any], run: mlflow.entities.Run) -> Path:
    """A run's checkpoint folder (``<store>/<experiment id>/<run id>/checkpoints``)."""
    trainer = config.get("trainer") or {}
    roots = [sqlite_dir(uri), Path(trainer.get("default_root_dir") or ".")]
    for root in filter(None, roots):
        folder = Path(root) / run.info.experiment_id / run.info.run_id / "checkpoints"
        if folder.is_dir():
            return folder
    return Path(roots[0] or ".") / run.info.experiment_id / run.info.run_id / "checkpoints"


def fold_checkpoint(folder: Path, which: str, fold: int, run_id: str) -> Path:
    """A fold's final (``last``) or best-on-validation (``best``) checkpoint."""
    if which == "last":
        ckpt = folder / "last.ckpt"
    else:
        ckpt = max(folder.glob("best-*.ckpt"), default=folder / "best-*.ckpt")
    if not ckpt.is_file():
        raise ConfigError(f"fold {fold}: no {which} checkpoint in {folder} (run {run_id})")
    return ckpt


def fold_checkpoints(args: list[str], run_id: str) -> list[Path]:
    """The checkpoints of every fold of the cross-validation whose parent run is
    ``run_id`` (found in the tracking store of the experiment ``args``), in fold order:
    each fold's final checkpoint, or its best one when the cross-validation chose its
    out-of-fold predictions with ``--cv_checkpoint best``. Refused, saying which, while
    a fold has not finished."""
    from medlit.tuning.worker import Tracking, resolve, tracking_of

    config, _ = resolve(args)
    uri, experiment = tracking_of(config)
    tracking = Tracking(uri, experiment)
    parent = tracking.call("get run", tracking.client.get_run, run_id)
    tags = parent.data.tags if parent is not None else {}
    if tags.get(ROLE) != "parent":
        raise ConfigError(
            f"--cv_run {run_id}: not the parent run of a medlit.cv cross-validation in "
            f"the tracking store {uri} (the parent's id is printed at the end of medlit.cv)"
        )
    k = int(tags.get("medlit.cv.num_folds", 0))
    which = parent.data.params.get("cv.checkpoint", "last")
    where = f"tags.`{KEY}` = '{tags[KEY]}' and tags.`{ROLE}` = 'fold'"
    runs = tracking.call(
        "search runs",
        tracking.client.search_runs,
        [parent.info.experiment_id],
        where,
        order_by=["attributes.start_time DESC"],
    )
    finished: dict[int, mlflow.entities.Run] = {}
    for r in runs or []:
        fold = int(r.data.tags.get(FOLD, -1))
        if r.info.status == "FINISHED" and fold not in finished:
            finished[fold] = r
    if missing := [f for f in range(k) if f not in finished]:
        raise ConfigError(
            f"--cv_run {run_id}: fold(s) {', '.join(map(str, missing))} of {k} have not "
            "finished training; run the same medlit.cv command again to finish them"
        )
    return [
        fold_checkpoint(
            checkpoint_folder(uri, config, finished[f]), which, f, finished[f].info.run_id
        )
        for f in range(k)
    ]


def chosen_postprocessing(args: list[str], run_id: str) -> Postprocessing | None:
    """The postprocessing the cross-validation ``run_id`` chose (``postprocessing.json``
    on its parent run), or None when it chose none or has not chosen yet."""
    from medlit.tuning.worker import Tracking, resolve, tracking_of

    config, _ = resolve(args)
    uri, experiment = tracking_of(config)
    Tracking(uri, experiment)  # the store, checked and named when it cannot be reached
    with tempfile.TemporaryDirectory() as tmp:
        try:
            path = mlflow.artifacts.download_artifacts(
                run_id=run_id, artifact_path="postprocessing.json", dst_path=tmp, tracking_uri=uri
            )
        except Exception:  # noqa: BLE001 - no such artifact: nothing was chosen
            return None
        chosen = Postprocessing.read(Path(path))
    return None if chosen.empty else chosen


def record_ensemble(
    args: list[str], parent_id: str, trackers: list[Any], split: str, metrics: dict[str, float]
) -> None:
    """An ensemble's evaluation (``medlit.evaluate --cv_run``) under its cross-validation:
    the evaluation run a child of the parent (tag ``medlit.cv.role=ensemble``), its
    metrics on the parent as ``ensemble/<split>/<metric>``."""
    from medlit.tuning.worker import Tracking, resolve, tracking_of

    config, _ = resolve(args)
    tracking = Tracking(*tracking_of(config))
    parent = tracking.call("get run", tracking.client.get_run, parent_id)
    key = parent.data.tags.get(KEY, "") if parent is not None else ""
    for t in trackers:
        t.set_tags({"mlflow.parentRunId": parent_id, ROLE: "ensemble", KEY: key})
    for name, value in metrics.items():
        stage, _, metric = name.partition("/")
        if stage == split and np.isfinite(value):
            tracking.call(
                "metric",
                tracking.client.log_metric,
                parent_id,
                f"ensemble/{split}/{metric}",
                float(value),
            )
