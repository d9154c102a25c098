"""Preprocessed-case cache: decode once, then memory-map uncompressed arrays every epoch.

Layout under ``directory``::

    sources/<case>.json            size + mtime of each source file, and their content hash
    <params-hash>/<case>-<content-hash>/<name>.npy + meta.json

* The entry's name combines a SHA-256 of the source files' bytes (taken when the entry
  is built) with a hash of the preprocessing parameters, so a changed file or parameter
  rebuilds exactly the cases it touches.
* A warm start only ``stat``s the sources and compares size and mtime with
  ``sources/<case>.json``: no hashing, no decoding.
* Entries are written to a private temporary folder and renamed into place; rename is
  atomic, so two processes building the same case at once both end with one intact
  entry (the loser discards its copy), and a failed build (an invalid case, a full
  disk) leaves nothing behind. A build killed mid-way (SIGKILL, power loss) leaves only
  its temporary folder, named with its process id: it is never read, and the next
  build of the case removes it once that process is gone.
* ``verify`` (``medlit.check --deep``) re-hashes the sources of an entry, re-builds it
  and compares every array and the metadata, so damage to the cache itself or a source
  changed behind an unchanged size and mtime is found.

No library does this for us: MONAI's PersistentDataset pickles tensors keyed by the
file *name* (a changed file is silently served stale) and cannot memory-map.
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import math
import os
import shutil
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from torch.utils.data import Dataset

from medlit.datasets.io.files import usual_mode
from medlit.errors import CacheWriteError

log = logging.getLogger(__name__)

BuildFn = Callable[[], tuple[dict[str, np.ndarray], dict[str, Any]]]


@dataclass
class CacheEntry:
    """One preprocessed case: memory-mapped arrays plus its JSON metadata."""

    path: Path
    arrays: dict[str, np.ndarray]
    meta: dict[str, Any]
    built: bool = False  # True when this call decoded and preprocessed the sources

    def nbytes(self) -> int:
        return sum(f.stat().st_size for f in self.path.iterdir())


def _hash_files(paths: Sequence[Path], chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    for p in paths:
        h.update(p.name.encode())
        with open(p, "rb") as f:
            while block := f.read(chunk):
                h.update(block)
    return h.hexdigest()


def _stats(paths: Sequence[Path]) -> list[list]:
    """Each source's name, size and mtime: not its path, so a dataset moved (with its
    mtimes, as ``cp -a``, ``rsync -a`` or another node's mount keep them) is not re-read.
    Records of older releases (by resolved path) differ, so those files are hashed once."""
    out = []
    for p in paths:
        st = p.stat()
        out.append([p.name, st.st_size, st.st_mtime_ns])
    return out


def entry_problem(entry: Path) -> str | None:
    """What is wrong with a cache entry, found without reading its arrays, or None: no or
    unreadable ``meta.json``, a listed array missing (``arrays.json``; entries written
    before it have none), or an ``.npy`` whose size differs from what its own header
    says (truncated, or grown). Reading a few hundred header bytes per array costs
    microseconds; a damaged entry would otherwise fail later, deep in a data loader,
    without naming the case (``mmap length is greater than file size``)."""
    try:
        json.loads((entry / "meta.json").read_text())
    except FileNotFoundError:
        return "incomplete: meta.json is missing"
    except (OSError, ValueError) as e:
        return f"meta.json is unreadable ({type(e).__name__}: {e})"
    try:
        listed = json.loads((entry / "arrays.json").read_text())
    except (OSError, ValueError):
        listed = []
    if missing := [n for n in listed if not (entry / f"{n}.npy").is_file()]:
        return f"arrays {missing} are missing"
    for path in sorted(entry.glob("*.npy")):
        try:
            with open(path, "rb") as f:
                version = np.lib.format.read_magic(f)
                if version == (1, 0):
                    shape, _, dtype = np.lib.format.read_array_header_1_0(f)
                elif version == (2, 0):
                    shape, _, dtype = np.lib.format.read_array_header_2_0(f)
                else:
                    continue  # a format this check does not know; np.load decides
                expected = f.tell() + math.prod(shape) * dtype.itemsize
                size = os.fstat(f.fileno()).st_size
        except (OSError, ValueError) as e:
            return f"{path.name} is unreadable ({type(e).__name__}: {e})"
        if not dtype.hasobject and size != expected:
            return f"{path.name} holds {size} bytes, its header declares {expected}"
    return None


def _atomic_write_json(path: Path, obj: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".tmp-{os.getpid()}-", suffix=".json", dir=path.parent)
    usual_mode(tmp)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(obj, f, indent=1)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


def _remove_dead_builds(group: Path, case: str) -> None:
    """Temporary folders of ``case`` left by builds whose process is gone (killed mid-way)."""
    for tmp in group.glob(f".tmp-{case}-*"):
        pid = tmp.name[len(f".tmp-{case}-") :].split("-", 1)[0]
        if pid.isdigit() and not _alive(int(pid)):
            shutil.rmtree(tmp, ignore_errors=True)


# Metadata keys that entries built by earlier releases lack (and work without): a deep
# check does not call such an entry damaged.
LATER_META = frozenset({"fg_slices"})


class VolumeCache:
    """A content-addressed cache of preprocessed cases.

    Args:
        directory: where the cache lives (created when missing).
        params: every preprocessing parameter that changes the stored arrays; part of the key.
    """

    def __init__(self, directory: str | Path, params: dict[str, Any]) -> None:
        self.directory = Path(directory).expanduser()
        blob = json.dumps(params, sort_keys=True, default=str).encode()
        self.params_hash = hashlib.sha256(blob).hexdigest()[:12]
        self.params = params

    def _content_hash(self, case: str, sources: Sequence[Path]) -> tuple[str, bool]:
        """Content hash of the sources; reused without reading them when size+mtime agree."""
        index = self.directory / "sources" / f"{case}.json"
        stats = _stats(sources)
        if index.exists():
            try:
                known = json.loads(index.read_text())
                if known.get("stats") == stats:
                    return known["hash"], False
            except (OSError, ValueError, KeyError):
                pass  # a damaged index only costs a re-hash
        return _hash_files(sources), True

    def get(self, case: str, sources: Sequence[Path], build: BuildFn) -> CacheEntry:
        """Return the cached entry of ``case``, building it with ``build()`` when needed.

        ``build`` returns ``(arrays, meta)``; it runs only when the sources or the
        parameters changed, and any exception it raises leaves no entry behind.
        """
        sources = [Path(s) for s in sources]
        if missing := [s for s in sources if not s.is_file()]:
            build()  # the builder's own checks name the case and the problem
            raise FileNotFoundError(f"{case}: source file {missing[0]} does not exist")
        content_hash, rehashed = self._content_hash(case, sources)
        group = self.directory / self.params_hash
        final = group / f"{case}-{content_hash[:16]}"
        built = not (final / "meta.json").exists()
        if not built and (problem := entry_problem(final)):
            log.warning("case %s: cache entry %s %s: removed and rebuilt", case, final, problem)
            shutil.rmtree(final, ignore_errors=True)
            built = True
        if built:
            arrays, meta = build()
            try:
                self._write(group, case, final, arrays, meta)
            except OSError as e:
                raise CacheWriteError(
                    f"case {case}: cannot write its cache entry under {group} "
                    f"({e.strerror or e}); nothing was kept. Free space there, or set "
                    "data.cache_dir (or MEDLIT_CACHE_DIR) to a disk with room"
                ) from e
            # Entries of this case built from older versions of its files are stale now.
            for stale in group.glob(f"{case}-*"):
                if stale != final and stale.name.rsplit("-", 1)[0] == case:
                    shutil.rmtree(stale, ignore_errors=True)
        if rehashed:
            _atomic_write_json(
                self.directory / "sources" / f"{case}.json",
                {
                    "hash": content_hash,
                    "stats": _stats(sources),
                    "paths": [str(p.resolve()) for p in sources],  # where last seen
                },
            )
        entry = self.load(final)
        entry.built = built
        return entry

    def _write(
        self, group: Path, case: str, final: Path, arrays: dict[str, np.ndarray], meta: dict
    ) -> None:
        group.mkdir(parents=True, exist_ok=True)
        _atomic_write_json(group / "params.json", self.params)
        _remove_dead_builds(group, case)
        tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{case}-{os.getpid()}-", dir=group))
        try:
            for name, array in arrays.items():
                np.save(tmp / f"{name}.npy", np.ascontiguousarray(array))
            (tmp / "arrays.json").write_text(json.dumps(sorted(arrays)))
            # meta.json last: an entry without it is never read (see ``get``).
            (tmp / "meta.json").write_text(json.dumps(meta, indent=1))
            usual_mode(tmp, folder=True)  # mkdtemp makes it 0700
            if final.is_dir() and not (final / "meta.json").exists():
                # Entries only appear whole (by rename), so one without meta.json was
                # damaged after it was written: it would block the rename forever.
                shutil.rmtree(final, ignore_errors=True)
            try:
                os.rename(tmp, final)
            except OSError as e:
                if (
                    e.errno not in (errno.EEXIST, errno.ENOTEMPTY)
                    or not (final / "meta.json").exists()
                ):
                    raise
                # Another process finished the same entry first: keep theirs.
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    def cached(self, case: str, sources: Sequence[Path] | None = None) -> Path | None:
        """The entry of ``case`` that a run would read now (its sources, by default where
        they were last seen, unchanged by size and mtime), complete or damaged, or None."""
        index = self.directory / "sources" / f"{case}.json"
        try:
            known = json.loads(index.read_text())
            sources = [Path(p) for p in (sources or known["paths"])]
            if known["stats"] != _stats(sources):
                return None
            entry = self.directory / self.params_hash / f"{case}-{known['hash'][:16]}"
        except (OSError, ValueError, KeyError):
            return None
        return entry if entry.is_dir() else None

    def verify(self, case: str, sources: Sequence[Path], build: BuildFn) -> str | None:
        """Re-check the cached entry of ``case`` against its sources: their content hash,
        then every array and the metadata rebuilt from them. Returns what differs (and
        removes the entry, so the next run rebuilds it), or None when it is intact or
        not cached."""
        entry = self.cached(case, sources)
        if entry is None:
            return None
        problem = entry_problem(entry)
        content = _hash_files([Path(s) for s in sources])
        if problem:
            pass
        elif not entry.name.endswith(content[:16]):
            problem = "its source files changed since it was cached (same size and mtime)"
        else:
            try:
                meta = json.loads((entry / "meta.json").read_text())
                stored = {p.stem: np.load(p) for p in sorted(entry.glob("*.npy"))}
            except (OSError, ValueError, EOFError) as e:  # truncated .npy, bad JSON
                problem = f"unreadable ({type(e).__name__}: {e})"
            else:
                arrays, fresh = build()
                if sorted(arrays) != sorted(stored):
                    problem = f"holds arrays {sorted(stored)}, expected {sorted(arrays)}"
                elif bad := [
                    k
                    for k in arrays
                    if arrays[k].shape != stored[k].shape
                    or arrays[k].dtype != stored[k].dtype
                    or not np.array_equal(arrays[k], stored[k], equal_nan=True)
                ]:
                    problem = f"arrays {bad} differ from the ones rebuilt from the sources"
                elif {
                    k: v
                    for k, v in json.loads(json.dumps(fresh)).items()
                    if k in meta or k not in LATER_META
                } != meta:
                    problem = "its metadata differs from the one rebuilt from the sources"
        if problem:
            shutil.rmtree(entry, ignore_errors=True)
            (self.directory / "sources" / f"{case}.json").unlink(missing_ok=True)
        return problem

    @staticmethod
    def load(path: Path) -> CacheEntry:
        meta = json.loads((path / "meta.json").read_text())
        arrays = {p.stem: np.load(p, mmap_mode="r") for p in sorted(path.glob("*.npy"))}
        # (``get`` checked the entry with ``entry_problem`` first.)
        return CacheEntry(path, arrays, meta)


class OnTheFly(Dataset):
    """Items made when they are read, not cached: prediction inputs, each seen once.

    ``load(source)`` checks and preprocesses one source exactly as the cache would; in data
    loader workers this runs in parallel with the model.
    """

    def __init__(self, sources: Sequence[Any], load: Callable[[Any], dict]) -> None:
        self.sources = list(sources)
        self.load = load

    def __len__(self) -> int:
        return len(self.sources)

    def __getitem__(self, index: int) -> dict:
        return self.load(self.sources[index])
