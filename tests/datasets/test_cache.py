"""The preprocessing cache: used on warm starts, invalidated by changed files or parameters,
safe when two processes build it at once."""

from __future__ import annotations

import logging
import multiprocessing as mp
import os
import re
import time
from pathlib import Path

import numpy as np
import pytest

import medlit.datasets.brats.source as brats
from medlit.datamodules import BraTSDataModule, Split
from medlit.datasets.io.volume import read_volume, write_volume


@pytest.fixture
def reads(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Every volume decode (and file integrity check) of the BraTS reader, by file name."""
    calls: list[str] = []
    real_read, real_gzip = brats.read_volume, brats.nifti_problem

    def read(path):
        calls.append(Path(path).name)
        return real_read(path)

    def gz(path):
        calls.append("gzip:" + Path(path).name)
        return real_gzip(path)

    monkeypatch.setattr(brats, "read_volume", read)
    monkeypatch.setattr(brats, "nifti_problem", gz)
    return calls


def _prepare(root: Path, **kwargs) -> BraTSDataModule:
    dm = BraTSDataModule(
        root=str(root), split=Split(val_fraction=0.25, test_fraction=0.25), **kwargs
    )
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


def test_a_moved_dataset_finds_its_cache_without_reading_a_file(
    brats_root: Path, reads: list[str], tmp_path: Path, _private_cache: Path
) -> None:
    """The cache is named by the dataset's cases and its source records hold names, sizes
    and mtimes: the same release moved (mtimes kept, as ``cp -a`` / ``rsync -a`` / another
    node's mount keep them) is neither decoded nor hashed again. A cache named by the
    root's path (earlier releases) is renamed once."""
    import hashlib
    import shutil

    import medlit.datasets.io.cache as cache_module

    _prepare(brats_root)
    [folder] = _private_cache.glob("brats-*")
    moved = tmp_path / "elsewhere" / "BraTS2021"
    shutil.copytree(brats_root, moved, copy_function=shutil.copy2)  # keeps mtimes
    hashed: list[int] = []
    real_hash = cache_module._hash_files
    cache_module._hash_files = lambda paths, *a: hashed.append(len(paths)) or real_hash(paths, *a)
    try:
        reads.clear()
        dm = _prepare(moved)
    finally:
        cache_module._hash_files = real_hash
    assert [r for r in reads if not r.startswith("gzip:")] == [] and hashed == []
    assert list(_private_cache.glob("brats-*")) == [folder]
    assert {e.path.parent.parent for e in dm._entries(dm.cases["train"])} == {folder}
    # A cache under the old name (the hash of the root's resolved path) is renamed to it.
    old = (
        folder.parent
        / f"brats-2021-{hashlib.sha256(str(moved.resolve()).encode()).hexdigest()[:10]}"
    )
    folder.rename(old)
    reads.clear()
    _prepare(moved)
    assert [r for r in reads if not r.startswith("gzip:")] == []
    assert list(_private_cache.glob("brats-*")) == [folder]


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


def _entries(cache: Path) -> list[Path]:
    """Every folder a run could read as an entry, and every leftover of a build."""
    return sorted(p for p in cache.glob("brats-*/*/*") if p.is_dir())


def test_disk_full_while_writing_leaves_nothing_a_later_run_would_read(
    brats_root: Path, _private_cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import medlit.datasets.io.cache as cache_module
    from medlit.errors import CacheWriteError

    real_save = np.save
    calls = {"n": 0}

    # A case stores image, seg and fg_locations: the 4th array is the second case's first,
    # half written when the disk is full.
    def save(path, array):
        calls["n"] += 1
        if calls["n"] == 4:
            with open(path, "wb") as f:
                f.write(b"\x93NUMPY" + bytes(100))
            raise OSError(28, "No space left on device")
        return real_save(path, array)

    monkeypatch.setattr(cache_module.np, "save", save)
    with pytest.raises(
        CacheWriteError,
        match=r"case BraTS2021_\d+: cannot write its cache entry under .*\(No space left on device\); nothing was kept",
    ):
        _prepare(brats_root)
    # The first case is complete; nothing of the second (neither entry nor temporary).
    built = _entries(_private_cache)
    assert len(built) == 1 and not built[0].name.startswith(".")
    assert (built[0] / "meta.json").exists()
    monkeypatch.setattr(cache_module.np, "save", real_save)
    dm = _prepare(brats_root)  # a later run builds the rest and reads intact entries only
    entries = dm._entries(dm.cases["train"])
    for entry in entries:
        arrays, _ = brats.preprocess_case(
            next(c for c in dm.cases["train"] if c.case_id == entry.meta["case_id"]),
            dm._cache()[1],
        )
        np.testing.assert_array_equal(entry.arrays["image"], arrays["image"])
    assert not [p for p in _entries(_private_cache) if p.name.startswith(".")]


_KILLED_BUILD = """
import os, sys, time
import numpy as np
import medlit.datasets.io.cache as cache
from medlit.datamodules import BraTSDataModule

real = np.save
def save(path, array):
    real(path, array)
    if str(path).endswith("image.npy"):  # the first array is written: wait to be killed
        open(sys.argv[2], "w").close()
        time.sleep(600)
cache.np.save = save
BraTSDataModule(root=sys.argv[1], split={"val_fraction": 0.25, "test_fraction": 0.25}).prepare_data()
"""


def test_a_build_killed_mid_way_is_detected_and_redone(
    brats_root: Path, _private_cache: Path, tmp_path: Path
) -> None:
    import signal
    import subprocess
    import sys

    ready = tmp_path / "ready"
    proc = subprocess.Popen([sys.executable, "-c", _KILLED_BUILD, str(brats_root), str(ready)])
    try:
        deadline = time.time() + 120
        while not ready.exists():
            assert proc.poll() is None and time.time() < deadline, "the build did not start"
            time.sleep(0.1)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait(timeout=30)
    [leftover] = _entries(_private_cache)
    assert leftover.name.startswith(".tmp-") and f"-{proc.pid}-" in leftover.name
    assert not (leftover / "meta.json").exists()  # never read: not an entry
    dm = _prepare(brats_root)
    folders = _entries(_private_cache)
    assert not [p for p in folders if p.name.startswith(".")], folders  # removed
    assert len(folders) == sum(len(dm.cases[s]) for s in ("train", "val", "test"))


def test_deep_check_finds_a_damaged_cache_entry_and_removes_it(
    brats_root: Path, _private_cache: Path, tracking_uri: str, capsys: pytest.CaptureFixture
) -> None:
    from medlit.check import main as check_main
    from tests.test_fit import tiny

    dm = _prepare(brats_root)
    entries = dm._entries(dm.cases["train"])
    damaged = entries[1].path / "image.npy"
    data = bytearray(damaged.read_bytes())
    data[-7] ^= 0x40  # one voxel of the cached array
    damaged.write_bytes(bytes(data))
    truncated = entries[2].path / "seg.npy"
    truncated.write_bytes(truncated.read_bytes()[:-50])
    argv = tiny(brats_root, tracking_uri)
    assert check_main(argv) == 0  # the sources are intact; only --deep reads the cache
    assert check_main([*argv, "--deep"]) == 1
    out = capsys.readouterr().out
    assert re.search(
        rf"ERROR +{entries[1].meta['case_id']}: {entries[1].path}: cache entry: arrays "
        r"\['image'\] differ from the ones rebuilt from the sources; removed",
        out,
    ), out
    assert re.search(
        rf"ERROR +{entries[2].meta['case_id']}: {entries[2].path}: cache entry: seg.npy holds "
        r"\d+ bytes, its header declares \d+; removed",
        out,
    ), out
    assert not entries[1].path.exists() and not entries[2].path.exists()
    assert check_main([*argv, "--deep"]) == 0  # the next run rebuilt nothing wrong
    rebuilt = _prepare(brats_root)._entries(dm.cases["train"])
    assert all(e.path.exists() for e in rebuilt)


def test_a_damaged_entry_is_found_before_use_removed_and_rebuilt(
    brats_root: Path, _private_cache: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A truncated array (it used to end in a bare ``mmap length is greater than file
    size`` in a loader worker) and a deleted meta.json (every later run then failed with
    "cannot write ... free space there"): the next run names the case, removes the entry
    and builds it again."""
    dm = _prepare(brats_root)
    entries = dm._entries(dm.cases["train"])
    truncated = entries[0].path / "image.npy"
    truncated.write_bytes(truncated.read_bytes()[:-4096])
    (entries[1].path / "meta.json").unlink()
    with caplog.at_level(logging.WARNING):
        again = _prepare(brats_root)
    warned = [r.getMessage() for r in caplog.records if "removed and rebuilt" in r.getMessage()]
    assert len(warned) == 1 and entries[0].meta["case_id"] in warned[0], warned
    assert "image.npy holds" in warned[0] and "its header declares" in warned[0]
    rebuilt = again._entries(dm.cases["train"])
    assert [e.path for e in rebuilt] == [e.path for e in entries]
    for before, after in zip(entries[:2], rebuilt[:2], strict=True):
        assert (after.path / "meta.json").is_file()
        assert np.asarray(after.arrays["image"]).shape == before.arrays["image"].shape
    again.setup("fit")
    again.datasets["train"][0]  # reads the rebuilt entries


def test_deep_check_reports_an_entry_without_meta_json(
    brats_root: Path, _private_cache: Path, tracking_uri: str, capsys: pytest.CaptureFixture
) -> None:
    from medlit.check import main as check_main
    from tests.test_fit import tiny

    dm = _prepare(brats_root)
    entry = dm._entries(dm.cases["train"])[1]
    (entry.path / "meta.json").unlink()
    assert check_main([*tiny(brats_root, tracking_uri), "--deep"]) == 1
    out = capsys.readouterr().out
    assert re.search(
        rf"ERROR +{entry.meta['case_id']}: {entry.path}: cache entry: incomplete: meta.json is "
        "missing; removed",
        out,
    ), out
    assert not entry.path.exists()


def test_cache_and_outputs_get_the_umask_s_modes_not_mkstemp_s(
    brats_root: Path, _private_cache: Path, tmp_path: Path
) -> None:
    from medlit.datasets.io.files import atomic_write
    from medlit.datasets.io.volume import Geometry, write_volume

    old = os.umask(0o022)
    try:
        dm = _prepare(brats_root)
        entry = dm._entries(dm.cases["train"])[0]
        atomic_write(tmp_path / "out.csv", lambda p: p.write_text("a\n"))
        geometry = Geometry((0.0, 0.0, 0.0), (1.0, 1.0, 1.0), (1, 0, 0, 0, 1, 0, 0, 0, 1))
        write_volume(np.zeros((2, 2, 2), np.uint8), geometry, tmp_path / "v.nii.gz")
    finally:
        os.umask(old)
    assert oct(entry.path.stat().st_mode & 0o777) == "0o755"
    assert {oct(f.stat().st_mode & 0o777) for f in entry.path.iterdir()} == {"0o644"}
    assert oct((tmp_path / "out.csv").stat().st_mode & 0o777) == "0o644"
    assert oct((tmp_path / "v.nii.gz").stat().st_mode & 0o777) == "0o644"


def test_entries_carry_their_foreground_slices_so_set_up_reads_no_labels(
    brats_root: Path,
) -> None:
    """``meta["fg_slices"]`` (built with the entry) is the slices whose labels hold
    foreground, and the 2.5D training set draws from it without touching ``seg``."""
    from medlit.datasets.brats.torch import SliceDataset

    dm = _prepare(brats_root)
    entries = dm._entries(dm.cases["train"])
    for e in entries:
        seg = np.asarray(e.arrays["seg"])
        assert e.meta["fg_slices"] == np.flatnonzero(seg.reshape(len(seg), -1).any(1)).tolist()
        assert e.meta["fg_slices"]

    class NoLabels(dict):
        def __getitem__(self, key):
            assert key != "seg", "set-up read a label volume"
            return super().__getitem__(key)

    for e in entries:
        e.arrays = NoLabels(e.arrays)
    data = SliceDataset(entries, lambda seg: seg, patch_size=64, context=1)
    assert [f.tolist() for f in data.fg_slices] == [e.meta["fg_slices"] for e in entries]


@pytest.mark.parametrize("patch", [40, 300])  # a crop inside the slice; one padded around it
def test_slices_cropped_before_the_cast_are_the_samples_of_the_whole_slice_cast(
    brats_root: Path, patch: int
) -> None:
    """The training slices read and cast only the crop's window; with the same seed they
    are, to the bit, the samples the earlier code made from the whole slice cast to
    float32 and then cropped (and augmented)."""
    from medlit.datasets.brats.torch import SliceDataset
    from medlit.datasets.seeding import seed_transforms
    from medlit.datasets.slices import stack_slices

    dm = _prepare(brats_root, patch_size=patch)
    dm.setup("fit")
    data = dm.datasets["train"]
    assert isinstance(data, SliceDataset) and data.augment is not None

    def whole_slice_cast(index: int) -> tuple[np.ndarray, np.ndarray]:
        seed_transforms(data.crop_any, data.crop_fg, data.augment)
        k = np.random.randint(len(data.entries))
        entry, fg = data.entries[k], data.fg_slices[k]
        want_fg = len(fg) > 0 and np.random.rand() < data.foreground_fraction
        z = (
            int(np.random.choice(fg))
            if want_fg
            else np.random.randint(entry.arrays["image"].shape[1])
        )
        image = stack_slices(entry.arrays["image"], z, data.context).astype(np.float32)
        crop = data.crop_fg if want_fg else data.crop_any
        out = crop(image=image.transpose(1, 2, 0), mask=np.asarray(entry.arrays["seg"][z]))
        if data.augment is not None:
            out = data.augment(image=out["image"], mask=out["mask"])
        return out["image"].transpose(2, 0, 1), data.target_fn(out["mask"])

    for i in range(24):
        np.random.seed(i)
        item = data[i]
        np.random.seed(i)
        image, mask = whole_slice_cast(i)
        assert item["image"].shape[1:] == (patch, patch)
        np.testing.assert_array_equal(item["image"].numpy(), image)
        np.testing.assert_array_equal(item["mask"].numpy(), mask)
