"""Where a run's tracking store lives, and creating a SQLite store safely."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

from medlit.errors import ConfigError

DEFAULT_TRACKING_URI = "sqlite:///mlruns/mlflow.db"


def sqlite_problem(db: Path) -> str | None:
    """What makes an existing SQLite tracking store unusable, found in milliseconds, or
    None: not a database or damaged (``PRAGMA quick_check``), or not writable (the file
    or its folder, which SQLite needs for its journal)."""
    import sqlite3

    try:
        with contextlib.closing(sqlite3.connect(f"file:{db}?mode=ro", uri=True)) as con:
            result = con.execute("PRAGMA quick_check").fetchone()
    except sqlite3.DatabaseError as e:
        return f"is not a usable SQLite database ({e})"
    if result is None or result[0] != "ok":
        return f"is damaged (SQLite's quick_check: {result[0] if result else 'no answer'})"
    for path, what in ((db, "the file"), (db.parent, "its folder")):
        if not os.access(path, os.W_OK):
            return f"is read-only ({what} {path} cannot be written)"
    return None


def init_store(uri: str) -> None:
    """Check an existing SQLite tracking store, or create its tables under a file lock.
    MLflow creates them on first use with Alembic, and two processes doing that at once
    on a new database (two sweep workers started together) fail with "table ... already
    exists". A damaged or read-only store is a ``ConfigError`` naming the file and the
    fix (it ended in a traceback, or in jsonargparse's "Does not validate against any
    of the Union subtypes" with the cause buried inside)."""
    if (folder := sqlite_dir(uri)) is None:
        return
    import fcntl

    from mlflow import MlflowClient

    db = Path(uri.removeprefix("sqlite:///"))
    if db.exists() and (problem := sqlite_problem(db)):
        raise ConfigError(
            f"tracking store {db} {problem}. Restore it from a backup or move it aside (a "
            "new store is then created there), or set "
            "--trainer.logger.init_args.tracking_uri to another store"
        )
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ConfigError(
            f"tracking store folder {folder}: cannot create it ({e.strerror})"
        ) from None
    with open(db.with_name(db.name + ".init-lock"), "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            MlflowClient(uri).search_experiments(max_results=1)
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def sqlite_dir(uri: str) -> Path | None:
    """The folder of a ``sqlite:///`` store (its artifacts and checkpoints go there), or
    None for a server or another kind of store."""
    return Path(uri.removeprefix("sqlite:///")).parent if uri.startswith("sqlite:///") else None


def artifact_location(uri: str, experiment: str) -> str | None:
    """Where a new experiment of a SQLite store ``uri`` keeps its artifacts: beside the
    store. MLflow puts them under ``./mlruns`` of the current directory wherever the
    database is, so a run started elsewhere (``cd /tmp`` with an absolute
    ``sqlite:////data/mlruns/mlflow.db``, a test, a sweep from another folder) scattered
    its files there, lost with that folder. None (MLflow's own ``mlruns/<id>``) where that
    already is the store's folder, as for the default ``sqlite:///mlruns/mlflow.db``, and
    for servers, which choose their own."""
    import hashlib
    import re

    if (folder := sqlite_dir(uri)) is None:
        return None
    folder = folder.resolve()
    if folder == Path("mlruns").resolve():
        return None
    # Experiment names are unique in a store but may hold any character: a readable
    # slug, and a digest of the whole name so that two names slugged alike stay apart.
    slug = re.sub(r"[^A-Za-z0-9._-]+", "_", experiment)[:60].strip("._") or "experiment"
    digest = hashlib.sha256(experiment.encode()).hexdigest()[:8]
    # A plain path, as MLflow's own default root is: run.info.artifact_uri stays a path.
    return str(folder / "artifacts" / f"{slug}-{digest}")


# MLflow 3's UI (3.17) opens an experiment on its GenAI pages (traces, an empty overview)
# and keeps that choice per browser: a link with ``workflowType=machine_learning`` opens
# the model-training pages. The experiment tag is what the UI reads for the same choice
# when its global switch is off (and what its own "experiment type" setting writes).
EXPERIMENT_KIND = ("mlflow.experimentKind", "custom_model_development")
UI_ADDRESS = "http://127.0.0.1:5000"  # where `mlflow ui` serves a local store by default
# The runs table shows no metric column until the user picks them; a "shared view" (an
# experiment tag the UI's own "share view" writes, named by ``viewStateShareKey`` in the
# link) opens it with the run's key metrics as columns.
VIEW_KEY = "medlit"
VIEW_TAG = f"mlflow.sharedViewState.{VIEW_KEY}"
MAX_VIEW_COLUMNS = 8


def mark_training_experiment(client: object, experiment_id: str) -> None:
    """Tag an experiment as model training (:data:`EXPERIMENT_KIND`) unless its kind is
    already set (a user's choice in the UI stays)."""
    key, value = EXPERIMENT_KIND
    experiment = client.get_experiment(experiment_id)  # type: ignore[attr-defined]
    if key not in (experiment.tags or {}):
        client.set_experiment_tag(experiment_id, key, value)  # type: ignore[attr-defined]


def share_view(client: object, experiment_id: str, metrics: list[str]) -> None:
    """Add ``metrics`` (first the most important) to the columns of the experiment's
    shared runs-table view (:data:`VIEW_TAG`), keeping those of earlier runs first, at most
    :data:`MAX_VIEW_COLUMNS`."""
    import json

    experiment = client.get_experiment(experiment_id)  # type: ignore[attr-defined]
    try:
        view = json.loads((experiment.tags or {}).get(VIEW_TAG, "{}"))
    except ValueError:
        view = {}
    columns = [c for c in view.get("selectedColumns", []) if isinstance(c, str)]
    for name in metrics:
        column = f"metrics.`{name}`"
        if column not in columns:
            columns.append(column)
    view["selectedColumns"] = columns[:MAX_VIEW_COLUMNS]
    client.set_experiment_tag(experiment_id, VIEW_TAG, json.dumps(view))  # type: ignore[attr-defined]


def _base(uri: str) -> str:
    return uri.rstrip("/") if uri.startswith(("http://", "https://")) else UI_ADDRESS


def run_url(uri: str, experiment_id: str | None, run_id: str | None) -> str | None:
    """The address of a run's page in the MLflow UI: on the server for an ``http(s)``
    store, on ``mlflow ui``'s default address for a local one."""
    if not experiment_id or not run_id:
        return None
    return f"{_base(uri)}/#/experiments/{experiment_id}/runs/{run_id}?workflowType=machine_learning"


def experiment_url(uri: str, experiment_id: str | None) -> str | None:
    """The address of an experiment's runs table, with its key metrics as columns."""
    if not experiment_id:
        return None
    return (
        f"{_base(uri)}/#/experiments/{experiment_id}/runs"
        f"?workflowType=machine_learning&viewStateShareKey={VIEW_KEY}"
    )
