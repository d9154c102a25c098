"""Work done once per test session and shared by every test that needs it, across
pytest-xdist workers too: the first process to ask builds it under a file lock in the
session's common temporary folder; the others wait on the lock and reuse what it wrote.
Shared results are read-only: a test that changes files copies them first."""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import socket
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import pytest
from filelock import FileLock


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def session_folder(factory: pytest.TempPathFactory) -> Path:
    """The temporary folder every process of this session sees: under xdist each worker
    has its own base temp (``.../pytest-N/popen-gwK``), whose parent is the session's."""
    base = factory.getbasetemp()
    return base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base


@contextlib.contextmanager
def private_cache(folder: Path) -> Iterator[None]:
    """Session-scoped work runs before any test's private cache is set: give it its own."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MEDLIT_CACHE_DIR", str(folder / "cache"))
        yield


def once(factory: pytest.TempPathFactory, name: str, build: Callable[[Path], dict]) -> dict:
    """``build(folder)``'s JSON-able result, computed by one process of the session: its
    files stay in ``folder``. A build that failed half-way is removed and tried again by
    the next process that asks (and fails that test the same way)."""
    shared = session_folder(factory) / "shared"
    shared.mkdir(exist_ok=True)
    folder, done = shared / name, shared / f"{name}.json"
    with FileLock(shared / f"{name}.lock"):
        if not done.exists():
            shutil.rmtree(folder, ignore_errors=True)
            folder.mkdir()
            with private_cache(folder):
                result = build(folder)
            tmp = done.with_suffix(".tmp")
            tmp.write_text(json.dumps(result))
            tmp.replace(done)
    return json.loads(done.read_text())


@dataclass(frozen=True)
class Trained:
    """A tiny model trained by ``medlit.fit`` once per session: the arguments it was
    trained with, its best checkpoint, its tracking store and run, the test metrics
    ``fit`` returned and what it printed."""

    args: list[str]
    root: Path  # the training data (shared: copy before changing)
    folder: Path  # everything the fit wrote
    ckpt: Path
    tracking_uri: str
    experiment: str
    run_id: str
    metrics: dict[str, float]
    stdout: str

    @classmethod
    def fit(cls, folder: Path, root: Path, args: list[str], tracking_uri: str) -> dict[str, Any]:
        """Train with ``args`` (which log to ``tracking_uri``); the JSON for ``once``."""
        import mlflow

        from medlit.fit import main

        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            metrics = main(args)
        experiment = next(
            a.split("=", 1)[1]
            for a in reversed(args)
            if a.startswith("--trainer.logger.init_args.experiment_name=")
        )
        client = mlflow.MlflowClient(tracking_uri)
        [run] = client.search_runs([client.get_experiment_by_name(experiment).experiment_id])
        # Checkpoints are kept beside the run's artifacts, under the store's folder.
        store = Path(tracking_uri.removeprefix("sqlite:///")).parent
        [ckpt] = sorted(store.glob(f"*/{run.info.run_id}/checkpoints/best-*.ckpt"))
        return asdict(
            cls(
                args,
                root,
                folder,
                ckpt,
                tracking_uri,
                experiment,
                run.info.run_id,
                {k: float(v) for k, v in metrics.items()},
                out.getvalue(),
            )
        ) | {"root": str(root), "folder": str(folder), "ckpt": str(ckpt)}

    @classmethod
    def load(cls, record: dict[str, Any]) -> Trained:
        return cls(
            **{
                **record,
                "root": Path(record["root"]),
                "folder": Path(record["folder"]),
                "ckpt": Path(record["ckpt"]),
            }
        )
