"""Files written whole or not at all, and the marker of medlit's demo data."""

from __future__ import annotations

import os
import stat
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


def umask() -> int:
    """The process's umask (Linux reads it from /proc, without changing it even for a
    moment; elsewhere it is set and restored)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def usual_mode(path: str | Path, folder: bool = False) -> None:
    """Give a file made by ``mkstemp`` (0600) or a folder made by ``mkdtemp`` (0700) the
    mode an ordinary ``open``/``mkdir`` would have (0644/0755 under the usual umask), so
    that other users, or a container's unprivileged user, can read outputs and caches."""
    os.chmod(path, (0o777 if folder else 0o666) & ~umask())


def atomic_write(path: str | Path, write: Callable[[Path], object]) -> None:
    """Call ``write(tmp)`` on a hidden temporary name beside ``path``, then rename it into
    place: readers see the old file or the whole new one, never a half-written one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".tmp-{path.stem}-", suffix=path.suffix, dir=path.parent)
    os.close(fd)
    tmp = Path(name)
    usual_mode(tmp)
    try:
        write(tmp)
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)


_KINDS = (
    (stat.S_ISDIR, "a folder"),
    (stat.S_ISFIFO, "a FIFO (named pipe)"),
    (stat.S_ISCHR, "a character device"),
    (stat.S_ISBLK, "a block device"),
    (stat.S_ISSOCK, "a socket"),
)


def file_problem(path: str | Path) -> str | None:
    """Why ``path`` cannot be read as a data file, found without opening it, or None.

    Opening a FIFO blocks until something writes to it, and a device can stream forever,
    so every data file is checked to be a regular file first (``os.stat`` follows links:
    a symlinked file or root is fine)."""
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        return "file is missing"
    except OSError as e:
        return f"cannot be read ({e.strerror or e})"
    except ValueError:  # a NUL byte in the name (a damaged header names it)
        return "is not a valid file name (it holds a NUL byte)"
    if stat.S_ISREG(mode):
        return None
    kind = next((what for test, what in _KINDS if test(mode)), "not a regular file")
    return f"is {kind}, not a regular file"
