"""The preprocessing cache: used on warm starts, invalidated by changed files or parameters,
safe when two processes build it at once."""

from __future__ import annotations

import multiprocessing as mp
import os
import time
from pathlib import Path

import numpy as np
import pytest

import medlit.datasets.brats as brats
from medlit.datamodules import BraTSDataModule
from medlit.datasets.volume_io import read_volume, write_volume


@pytest.fixture
def reads(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Every volume decode (and gzip stream check) of the BraTS reader, by file name."""
    calls: list[str] = []
    real_read, real_gzip = brats.read_volume, brats.gzip_stream_problem

    def read(path):
        calls.append(Path(path).name)
        return real_read(path)

    def gz(path):
        calls.append("gzip:" + Path(path).name)
        return real_gzip(path)

    monkeypatch.setattr(brats, "read_volume", read)
    monkeypatch.setattr(brats, "gzip_stream_problem", gz)
    return calls


def _prepare(root: Path, **kwargs) -> BraTSDataModule:
    dm = BraTSDataModule(root=str(root), val_fraction=0.25, test_fraction=0.25, **kwargs)
    dm.prepare_data()
    return dm


def test_warm_start_reads_no_image(brats_root: Path, reads: list[str]) -> None:
    t0 = time.perf_counter()
    _prepare(brats_root)
    cold = time.perf_counter() - t0
    assert len([c for c in reads if not c.startswith("gzip:")]) == 8 * 5
    reads.clear()
    t0 = time.perf_counter()
    dm = _prepare(brats_root)
    dm.setup("fit")
    warm = time.perf_counter() - t0
    assert reads == []  # nothing decoded, no gzip stream read
    assert warm < cold
    sample = dm.datasets["train"][0]
    assert sample["image"].shape == (4, 128, 128) and sample["mask"].shape == (3, 128, 128)


def test_changed_file_rebuilds_only_its_case(brats_root: Path, reads: list[str]) -> None:
    _prepare(brats_root)
    case = sorted(p for p in brats_root.iterdir() if p.is_dir())[1]
    path = case / f"{case.name}_t2.nii.gz"
    array, geom = read_volume(path)
    write_volume(array + 1, geom, path)
    reads.clear()
    dm = _prepare(brats_root)
    assert sorted(r for r in reads if not r.startswith("gzip:")) == sorted(
        f"{case.name}_{m}.nii.gz" for m in ("t1", "t1ce", "t2", "flair", "seg")
    )
    entry = dm._entries(
        [c for s in ("train", "val", "test") for c in dm.cases[s] if c.case_id == case.name]
    )[0]
    # Exactly one entry per case remains: the stale one was removed.
    assert len(list(entry.path.parent.glob(f"{case.name}-*"))) == 1


def test_touched_but_identical_file_is_not_decoded(brats_root: Path, reads: list[str]) -> None:
    _prepare(brats_root)
    path = next(brats_root.glob("*/*_flair.nii.gz"))
    os.utime(path, ns=(time.time_ns(), time.time_ns() + 10**9))
    reads.clear()
    _prepare(brats_root)  # re-hashes the case (mtime changed) but finds the same content
    assert [r for r in reads if not r.startswith("gzip:")] == []


def test_changed_parameter_rebuilds(brats_root: Path, reads: list[str]) -> None:
    _prepare(brats_root)
    reads.clear()
    dm = _prepare(brats_root, modalities=["t1ce", "flair"])
    assert len([r for r in reads if not r.startswith("gzip:")]) == 8 * 3
    dm.setup("validate")
    assert dm.datasets["val"][0]["image"].shape[0] == 2


def _build(root: str, cache: str) -> list[str]:
    os.environ["MEDLIT_CACHE_DIR"] = cache
    dm = _prepare(Path(root))
    return sorted(str(e.path) for e in dm._entries(dm.cases["train"]))


def test_two_processes_building_at_once_leave_one_intact_cache(
    brats_root: Path, _private_cache: Path
) -> None:
    ctx = mp.get_context("spawn")
    with ctx.Pool(2) as pool:
        a, b = pool.starmap(_build, [(str(brats_root), str(_private_cache))] * 2)
    assert a == b
    assert not list(_private_cache.rglob(".tmp*"))
    entries = [p for p in _private_cache.glob("*/*/*") if p.is_dir()]
    assert len(entries) == 8
    dm = _prepare(brats_root)
    for entry in dm._entries(dm.cases["train"]):
        assert np.isfinite(entry.arrays["image"].astype(np.float32)).all()
        assert entry.arrays["seg"].shape == entry.arrays["image"].shape[1:]
