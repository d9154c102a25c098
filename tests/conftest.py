"""Shared fixtures: tiny generated datasets, a private cache and tracking store per test,
and what the session builds once and shares across its workers (tests/helpers/shared.py):
trained models, a tracking store, the two-worker sweep, one PostgreSQL database.

The suite runs on 2 pytest-xdist workers (``addopts``). Each worker, and every process it
starts, uses one torch thread: two workers with torch's default threads on 2 cores run
several times slower, not twice as fast. The slow tests are started first, so that no
long test is left for the end of the run."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.data.brats.data import make_brats
from tests.helpers.shared import Trained, free_port, once, session_folder

# MLflow 3's server starts a job runner (about nine processes that each import MLflow, for
# its GenAI jobs) unless told not to: ~30 s of CPU per server start, for nothing the tests
# use. Every server the tests start inherits this.
os.environ.setdefault("MLFLOW_SERVER_ENABLE_JOB_EXECUTION", "false")

if os.environ.get("PYTEST_XDIST_WORKER"):
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        os.environ[var] = "1"
    import torch

    torch.set_num_threads(1)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Slow tests first (a stable sort: the order within each group is kept)."""
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)


def pytest_sessionfinish(session: pytest.Session) -> None:
    """Drop the session's PostgreSQL database (test_sweep's ``postgres_url``) in the
    process that outlives every worker: a worker that finishes early must not drop it
    under another that still reads it."""
    if os.environ.get("PYTEST_XDIST_WORKER"):
        return
    # The session's temp-path factory: pytest keeps it on the config (no public handle).
    record = session_folder(session.config._tmp_path_factory) / "shared" / "postgres.json"
    if not record.exists() or not (db := json.loads(record.read_text())).get("url"):
        return
    import psycopg

    with psycopg.connect(db["admin"], connect_timeout=5, autocommit=True) as admin:
        admin.execute(f"DROP DATABASE IF EXISTS {db['name']} WITH (FORCE)")


@pytest.fixture(autouse=True)
def _private_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Every test gets its own preprocessing cache (never the user's ~/.cache/medlit)."""
    cache = tmp_path / "cache"
    monkeypatch.setenv("MEDLIT_CACHE_DIR", str(cache))
    return cache


@pytest.fixture(scope="session")
def _brats_pristine(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("brats") / "BraTS2021"
    make_brats(root, "2021", cases=8, seed=3)
    return root


@pytest.fixture
def brats_root(_brats_pristine: Path, tmp_path: Path) -> Path:
    """A fresh, writable copy of a tiny 2021-layout dataset (8 cases, 16×32×32)."""
    root = tmp_path / "BraTS2021"
    shutil.copytree(_brats_pristine, root)
    return root


@pytest.fixture(scope="session")
def empty_store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An MLflow SQLite store with its tables created and nothing in them, made once per
    session: creating the tables (MLflow's schema migrations) costs about a second of CPU
    per store, and most tests track into a store of their own."""

    def build(folder: Path) -> dict:
        import mlflow

        mlflow.MlflowClient(f"sqlite:///{folder}/mlflow.db").search_experiments()
        return {"db": str(folder / "mlflow.db")}

    return Path(once(tmp_path_factory, "empty_store", build)["db"])


@pytest.fixture
def tracking_uri(tmp_path: Path, empty_store: Path) -> str:
    """The test's own tracking store: a copy of ``empty_store``."""
    db = tmp_path / "mlruns" / "mlflow.db"
    db.parent.mkdir(parents=True)
    shutil.copyfile(empty_store, db)
    return f"sqlite:///{db}"


@pytest.fixture(scope="session")
def shared_store(tmp_path_factory: pytest.TempPathFactory, empty_store: Path) -> str:
    """The session's shared SQLite tracking store, which ``mlflow_ui`` serves: runs that
    several tests read go there, each under an experiment of its own. A copy of
    ``empty_store`` made under the shared lock, so that two workers' first writers never
    race to create its tables."""

    def build(folder: Path) -> dict:
        shutil.copyfile(empty_store, folder / "mlflow.db")
        return {"uri": f"sqlite:///{folder}/mlflow.db"}

    return once(tmp_path_factory, "mlruns", build)["uri"]


@pytest.fixture(scope="session")
def brats_unet(tmp_path_factory: pytest.TempPathFactory, shared_store: str) -> Trained:
    """The tiny BraTS U-Net (test_fit's ``tiny``), trained for 2 epochs once per session,
    its held-out predictions written to ``folder/predictions``; its run is the only one of
    experiment ``trained-brats-unet`` in the shared store."""
    from tests.test_fit import tiny

    def build(folder: Path) -> dict:
        root = folder / "BraTS2021"
        make_brats(root, "2021", cases=8, seed=3)
        args = tiny(
            root,
            shared_store,
            "--trainer.max_epochs=2",
            "--model.lr=0.003",
            f"--model.predictions_dir={folder / 'predictions'}",
            "--trainer.logger.init_args.experiment_name=trained-brats-unet",
        )
        return Trained.fit(folder, root, args, shared_store)

    return Trained.load(once(tmp_path_factory, "brats_unet", build))


@pytest.fixture(scope="session")
def brats_unet3d(tmp_path_factory: pytest.TempPathFactory) -> Trained:
    """The tiny 3D DynUNet (test_fit_3d's ``tiny3d``: 16×32×32 patches, one deep-supervision
    head), trained for 2 epochs once per session on the 8 phantoms of ``brats_unet``'s
    seed, its held-out predictions written to ``folder/predictions``; in a store of its
    own."""
    from tests.test_fit_3d import tiny3d

    def build(folder: Path) -> dict:
        root = folder / "BraTS2021"
        make_brats(root, "2021", cases=8, seed=3)
        uri = f"sqlite:///{folder}/mlruns/mlflow.db"
        args = tiny3d(
            root,
            uri,
            "--trainer.max_epochs=2",
            f"--model.predictions_dir={folder / 'predictions'}",
            "--trainer.logger.init_args.experiment_name=trained-brats-unet3d",
        )
        return Trained.fit(folder, root, args, uri)

    return Trained.load(once(tmp_path_factory, "brats_unet3d", build))


@pytest.fixture(scope="session")
def luna16_yolo(tmp_path_factory: pytest.TempPathFactory) -> Trained:
    """The tiny LUNA16 detector (test_fit_luna16's, 10 scans of 64×64×24-32), trained for
    1 epoch once per session, tracked in a store of its own."""
    from tests.data.luna16.data import make_luna16
    from tests.test_fit_luna16 import tiny_detector

    def build(folder: Path) -> dict:
        root = folder / "LUNA16"
        make_luna16(root, scans=10, seed=0)
        uri = f"sqlite:///{folder}/mlruns/mlflow.db"
        args = [
            *tiny_detector(root, uri),
            "--trainer.max_epochs=1",
            "--trainer.logger.init_args.experiment_name=trained-luna16-yolo",
        ]
        return Trained.fit(folder, root, args, uri)

    return Trained.load(once(tmp_path_factory, "luna16_yolo", build))


def _answers(url: str) -> bool:
    try:
        urllib.request.urlopen(url, timeout=2)
        return True
    except OSError:
        return False


@pytest.fixture(scope="session")
def mlflow_ui(shared_store: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The README's ``mlflow ui --backend-store-uri sqlite:///...`` on the shared store,
    one per worker that runs a UI test (xdist's ``loadgroup`` cannot pin tests to one
    worker under pytest 9.2, whose node ids are read-only): its base URL."""
    port = free_port()
    server = subprocess.Popen(
        [
            *(sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", shared_store),
            *("--host", "127.0.0.1", "--port", str(port)),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        cwd=tmp_path_factory.mktemp("mlflow_ui"),
    )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 120
        while not _answers(f"{base}/health"):
            if time.time() > deadline or server.poll() is not None:
                raise AssertionError("mlflow ui did not come up")
            time.sleep(0.5)
        yield base
    finally:
        server.terminate()
        server.wait(timeout=30)
