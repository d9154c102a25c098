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
