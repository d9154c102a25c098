"""Files written whole or not at all, and the marker of medlit's demo data."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path

# Written into the root of every demo (phantom) dataset; a run on such a root is tagged
# data=synthetic.
MARKER = ".medlit-synthetic.json"


def is_synthetic(root: str | Path) -> bool:
    """True when ``root`` holds medlit's demo data (a phantom writer put :data:`MARKER`
    there); the run is then tagged data=synthetic."""
    return (Path(root) / MARKER).exists()


def atomic_write(path: str | Path, write: Callable[[Path], object]) -> None:
    """Call ``write(tmp)`` on a hidden temporary name beside ``path``, then rename it into
    place: readers see the old file or the whole new one, never a half-written one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".tmp-{path.stem}-", suffix=path.suffix, dir=path.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        write(tmp)
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)
