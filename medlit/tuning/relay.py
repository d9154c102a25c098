"""What a sweep worker prints while its trial trains, so that a sweep is not minutes of
silence: the trial's values and log file when it starts, one line per validation while
it runs, and its result. Every line starts with ``trial N``: with ``--workers 2`` the
lines of two trials interleave on one terminal.

The per-validation lines are relayed from the trial's log: ``medlit.fit`` prints one line
starting with ``epoch `` after each validation whenever the progress bar is off or stdout
is not a terminal, as in every trial (its stdout is the log file). Why the log and not
the values ``TrialReporter`` already sends to Optuna: that line says more (the training
loss, the best so far, the seconds an epoch took), its format lives in one place, and
reading a local file costs nothing, where polling the storage would add a query a second
per worker to a PostgreSQL server that every worker shares.
"""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

EPOCH = b"epoch "
LONGEST = 1 << 16  # bytes of an unfinished line kept (a progress bar's \r-joined redraws)


class LineRelay:
    """Fed the bytes appended to a log, prints each complete line that starts with
    ``epoch ``, prefixed with ``prefix``."""

    def __init__(self, prefix: str) -> None:
        self.prefix = prefix
        self.pending = b""

    def feed(self, data: bytes) -> None:
        *lines, self.pending = (self.pending + data).split(b"\n")
        self.pending = self.pending[-LONGEST:]
        for line in lines:
            line = line.rstrip(b"\r").rsplit(b"\r", 1)[-1]  # the last redraw of a \r line
            if line.startswith(EPOCH):
                print(f"{self.prefix}  {line.decode(errors='replace')}", flush=True)


def follow(proc: subprocess.Popen, log: Path, prefix: str, every: float = 1.0) -> int:
    """Wait for ``proc``, relaying its log's epoch lines every ``every`` seconds; its exit
    status. A KeyboardInterrupt reaches the caller, which stops the trial."""
    relay = LineRelay(prefix)
    with open(log, "rb") as f:
        while True:
            try:
                rc = proc.wait(timeout=every)
            except subprocess.TimeoutExpired:
                relay.feed(f.read())
                continue
            relay.feed(f.read() + b"\n")  # a last line the process did not end
            return rc


def short(v: Any) -> str:
    """A parameter value for a table or a status line (4 significant digits)."""
    if v is None:
        return ""
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def started(label: str, values: dict[str, Any], log: Path) -> None:
    print(f"{label} started, log {log}", flush=True)
    trial = label.split(" (")[0]  # without "(retry of K)"
    print(f"{trial}  " + "  ".join(f"{k} {short(v)}" for k, v in values.items()), flush=True)


def epoch_of(result: dict[str, Any], value: float, max_epochs: int | None) -> str:
    """``epoch N/M``: the 1-based epoch whose validation gave ``value``, as the epoch
    lines count, of the trial's ``trainer.max_epochs``."""
    history = result["history"]
    epoch = next((e for e, v in history if v == value), history[-1][0] if history else 0)
    return f"epoch {epoch + 1}/{max_epochs or '?'}"


def ended(label: str, state: str, seconds: float, detail: str = "") -> None:
    print(f"{label} {state}{'  ' + detail if detail else ''}  {seconds:.0f} s", flush=True)
