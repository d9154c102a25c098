"""Where a run's tracking store lives, and creating a SQLite store safely."""

from __future__ import annotations

from pathlib import Path

DEFAULT_TRACKING_URI = "sqlite:///mlruns/mlflow.db"


def init_store(uri: str) -> None:
    """Create a SQLite tracking store's tables under a file lock. MLflow creates them on
    first use with Alembic, and two processes doing that at once on a new database (two
    sweep workers started together) fail with "table ... already exists"."""
    if (folder := sqlite_dir(uri)) is None:
        return
    import fcntl

    from mlflow import MlflowClient

    folder.mkdir(parents=True, exist_ok=True)
    db = Path(uri.removeprefix("sqlite:///"))
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
