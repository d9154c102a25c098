"""Shared fixtures: tiny generated datasets, a private cache and tracking store per test."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from tests.data.brats.data import make_brats


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


@pytest.fixture
def tracking_uri(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path}/mlruns/mlflow.db"
