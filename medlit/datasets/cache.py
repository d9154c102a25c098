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
  entry (the loser discards its copy), and a failed build leaves nothing behind.

No library does this for us: MONAI's PersistentDataset pickles tensors keyed by the
file *name* (a changed file is silently served stale) and cannot memory-map.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from torch.utils.data import Dataset

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


def _stats(paths: Sequence[Path]) -> dict[str, list[int]]:
    out = {}
    for p in paths:
        st = p.stat()
        out[str(p.resolve())] = [st.st_size, st.st_mtime_ns]
    return out


def _atomic_write_json(path: Path, obj: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".json", dir=path.parent)
    with os.fdopen(fd, "w") as f:
        json.dump(obj, f, indent=1)
    os.replace(tmp, path)


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
        if built:
            group.mkdir(parents=True, exist_ok=True)
            (group / "params.json").write_text(json.dumps(self.params, sort_keys=True, default=str))
            arrays, meta = build()
            tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{case}-", dir=group))
            try:
                for name, array in arrays.items():
                    np.save(tmp / f"{name}.npy", np.ascontiguousarray(array))
                (tmp / "meta.json").write_text(json.dumps(meta, indent=1))
                try:
                    os.rename(tmp, final)
                except OSError:
                    if not (final / "meta.json").exists():
                        raise
                    # Another process finished the same entry first: keep theirs.
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
            # Entries of this case built from older versions of its files are stale now.
            for stale in group.glob(f"{case}-*"):
                if stale != final and stale.name.rsplit("-", 1)[0] == case:
                    shutil.rmtree(stale, ignore_errors=True)
        if rehashed:
            _atomic_write_json(
                self.directory / "sources" / f"{case}.json",
                {"hash": content_hash, "stats": _stats(sources)},
            )
        entry = self.load(final)
        entry.built = built
        return entry

    @staticmethod
    def load(path: Path) -> CacheEntry:
        meta = json.loads((path / "meta.json").read_text())
        arrays = {p.stem: np.load(p, mmap_mode="r") for p in sorted(path.glob("*.npy"))}
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
