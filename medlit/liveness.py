"""Whether the process that owns a run or a trial is still alive: on the same host by pid
and the kernel's start time of that pid (a later process may reuse the number), across
hosts by a heartbeat that stops when the owner does."""

from __future__ import annotations

import json
import os
import socket
import time
from pathlib import Path
from typing import Any

HEARTBEAT_EVERY = 60.0  # seconds between a run's heartbeats (while it logs metrics)
# Another host's run is taken for dead after this long without a heartbeat: generous,
# since a long validation logs nothing until it ends.
HEARTBEAT_GRACE = 30 * 60.0

HOST = socket.gethostname()


def process_start(pid: int) -> str | None:
    """The kernel's start time of ``pid`` (clock ticks since boot), which tells a live
    process from a later one that reused its pid; None when there is no such process."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[19]  # field 22, counted after "pid (comm)"


def alive(pid: int, start: str | None) -> bool:
    if not Path("/proc").is_dir():  # no procfs: fall back to a signal probe
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return True
    now = process_start(pid)
    return now is not None and (start is None or now == start)


def me() -> str:
    """This process as an owner record (JSON): host, pid and the pid's start time."""
    pid = os.getpid()
    return json.dumps({"host": HOST, "pid": pid, "start": process_start(pid)})


def owner_alive(owner: str | None, heartbeat: str | None, grace: float) -> dict[str, Any] | None:
    """The owner record when that owner may still be running: on this host its process
    is alive; on another, its last heartbeat is less than ``grace`` seconds old. None:
    no owner recorded, or the owner is gone."""
    try:
        record = json.loads(owner) if owner else None
    except ValueError:
        return None
    if not isinstance(record, dict):
        return None
    if record.get("host") == HOST:
        return record if alive(int(record.get("pid", -1)), record.get("start")) else None
    try:
        age = time.time() - float(heartbeat or 0)
    except ValueError:
        return None
    return {**record, "age": age} if age < grace else None
