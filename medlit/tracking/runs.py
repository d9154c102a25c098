"""``python -m medlit.tracking runs``: a store's runs as a terminal table.

The MLflow UI shows every run, but it needs a server and a browser, and its table shows
each run's last value of a metric, not its best epoch. This table shows, per experiment,
each run's name, status (a RUNNING run whose process is gone says ``DEAD``), start and
duration, the params that differ between the listed runs (of the ~100 a run logs), the
monitored validation metric's best value over its history and the test metrics.

A run's monitored metric and mode come from its ``medlit.monitor``/``medlit.mode`` tags
(:class:`medlit.curves.LearningCurves` writes them), else from the metadata Lightning's
MLFlowLogger logs beside the best checkpoint, else ``val/loss`` (min) when it was logged.
"""

from __future__ import annotations

import contextlib
import math
import os
import re
import shutil
import tempfile
import textwrap
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, Literal

import yaml

from medlit.errors import ConfigError
from medlit.liveness import HEARTBEAT_GRACE, me, owner_alive

Mode = Literal["min", "max"]
# Name parts of metrics where lower is better, for a sorted metric that is no run's
# monitor (its mode is not recorded): losses, errors, distances, Fréchet distances.
LOWER_IS_BETTER = {"loss", "error", "err", "hd95", "distance", "fd", "fid", "kid", "mae", "mse"}
GAP = 2  # spaces between columns
MISSING = "-"
PROGRESS_BAR = "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"


@dataclass
class Column:
    """One column of the table. ``priority``: the narrowest terminals drop the
    lowest-priority columns first (a run's name and status last)."""

    header: str
    cells: list[str]
    priority: int
    numeric: bool = False
    cap: int | None = None  # widest its values grow (longer ones are cut); not the header


@dataclass
class Table:
    newest: int  # start time of the experiment's newest run (ms): newest table first
    lines: list[str]
    metrics: set[str]  # every metric its runs logged (to name them for a wrong --sort)
    sorted: bool  # some run had the sorted metric


@dataclass
class RunRow:
    run: Any
    status: str
    params: dict[str, str]
    values: dict[str, float] = field(default_factory=dict)  # column header -> value


def parse_sort(text: str | None) -> tuple[str, Mode | None] | None:
    """``--sort`` -> (metric, direction): ``METRIC`` best first (direction from the run's
    mode, or from the name), ``+METRIC`` ascending, ``-METRIC`` descending."""
    if not text:
        return None
    if text[0] in "+-":
        return text[1:], ("min" if text[0] == "+" else "max")
    return text, None


def guess_mode(metric: str) -> Mode:
    """Lower is better for losses, errors and distances; higher for anything else."""
    parts = set(re.split(r"[/_.\-]", metric.lower()))
    return "min" if parts & LOWER_IS_BETTER else "max"


def open_client(uri: str) -> Any:
    """An MlflowClient on ``uri``; a ``sqlite:///`` store that does not exist is an error
    (MLflow would create an empty one, and the table would just be empty)."""
    from mlflow import MlflowClient

    if uri.startswith("sqlite:///") and not Path(uri.removeprefix("sqlite:///")).is_file():
        raise ConfigError(
            f"no tracking store at {uri.removeprefix('sqlite:///')}: train a run first, or "
            "pass --tracking_uri (e.g. sqlite:///path/to/mlruns/mlflow.db)"
        )
    return MlflowClient(uri)


def pick_experiments(client: Any, name: str | None) -> list[Any]:
    """All active experiments, or the one named (or numbered) ``name``."""
    experiments = client.search_experiments()
    if name is None:
        return experiments
    chosen = [e for e in experiments if name in (e.name, e.experiment_id)]
    if not chosen:
        names = ", ".join(sorted(e.name for e in experiments)) or "none"
        raise ConfigError(f"no experiment {name!r} in the store; its experiments: {names}")
    return chosen


def search(client: Any, experiment_id: str, limit: int | None) -> list[Any]:
    """The experiment's runs, newest first; at most ``limit`` (None: all, in pages)."""
    runs: list[Any] = []
    token = None
    while True:
        page = client.search_runs(
            [experiment_id],
            max_results=min(limit, 1000) if limit else 1000,
            order_by=["attributes.start_time DESC"],
            page_token=token,
        )
        runs.extend(page)
        token = page.token
        if not token or (limit and len(runs) >= limit):
            return runs[:limit] if limit else runs


@contextlib.contextmanager
def quiet_downloads() -> Iterator[None]:
    """No MLflow download progress bar (one per run, on stderr, around the table)."""
    before = os.environ.get(PROGRESS_BAR)
    os.environ[PROGRESS_BAR] = "false"
    try:
        yield
    finally:
        if before is None:
            del os.environ[PROGRESS_BAR]
        else:
            os.environ[PROGRESS_BAR] = before


def monitor_of(client: Any, run: Any) -> tuple[str, Mode] | None:
    """The metric that picked the run's best checkpoint, and its mode."""
    tags = run.data.tags
    if tags.get("medlit.monitor"):
        return tags["medlit.monitor"], "min" if tags.get("medlit.mode") == "min" else "max"
    # Lightning's MLFlowLogger logs <best checkpoint stem>/metadata.yaml with the
    # ModelCheckpoint's monitor and mode (runs from before the tags).
    try:
        folders = [a.path for a in client.list_artifacts(run.info.run_id) if a.is_dir]
        for folder in (f for f in folders if f.startswith("best")):
            with tempfile.TemporaryDirectory() as tmp, quiet_downloads():
                path = client.download_artifacts(run.info.run_id, f"{folder}/metadata.yaml", tmp)
                checkpoint = (yaml.safe_load(Path(path).read_text()) or {}).get("Checkpoint", {})
            if checkpoint.get("monitor"):
                return checkpoint["monitor"], "min" if checkpoint.get("mode") == "min" else "max"
    except Exception:  # noqa: BLE001 - no artifacts, or an unreadable one: try the next clue
        pass
    return ("val/loss", "min") if "val/loss" in run.data.metrics else None


def best_value(client: Any, run_id: str, metric: str, mode: Mode) -> float | None:
    """The best of ``metric`` over the run's history (each validation), NaN ignored."""
    values = [m.value for m in client.get_metric_history(run_id, metric)]
    values = [v for v in values if not math.isnan(v)]
    if not values:
        return None
    return min(values) if mode == "min" else max(values)


def status_of(run: Any) -> str:
    """MLflow's status; ``DEAD`` for a RUNNING run whose owner process is gone (killed
    with SIGKILL, out of memory, its node lost), which MLflow never learns of."""
    status = run.info.status
    owner = run.data.tags.get("medlit.owner")
    if status != "RUNNING" or not owner or owner == me():
        return status
    alive = owner_alive(owner, run.data.tags.get("medlit.heartbeat"), HEARTBEAT_GRACE)
    return status if alive else "DEAD"


def duration(run: Any, status: str) -> str:
    info = run.info
    if info.end_time:
        seconds = (info.end_time - info.start_time) / 1000
    elif status == "RUNNING":
        seconds = time.time() - info.start_time / 1000
    elif beat := run.data.tags.get("medlit.heartbeat"):  # DEAD: until its last heartbeat
        seconds = float(beat) - info.start_time / 1000
    else:
        return MISSING
    seconds = max(int(seconds), 0)
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    if seconds < 86400:
        return f"{seconds // 3600}h{seconds // 60 % 60:02d}m"
    return f"{seconds // 86400}d{seconds // 3600 % 24:02d}h"


def short_names(keys: Sequence[str]) -> dict[str, str]:
    """Each dotted param name's shortest unique tail, ``init_args`` left out
    (``model.init_args.lr`` -> ``lr``; ``data.init_args.batch_size`` and
    ``model.init_args.batch_size`` stay apart as ``data.batch_size``/``model.batch_size``)."""
    parts = {k: [p for p in k.split(".") if p != "init_args"] or [k] for k in keys}
    out = {}
    for key, own in parts.items():
        for n in range(1, len(own) + 1):
            tail = own[-n:]
            if not any(other[-n:] == tail for k, other in parts.items() if k != key):
                break
        out[key] = ".".join(tail)
    return out


def fit_header(name: str, width: int = 24) -> str:
    """A dotted name in ``width`` characters: its leading parts cut to their initial
    first (``sweep.data.foreground_fraction`` -> ``s.d.foreground_fraction``), since
    the last part says what the param is; then cut on the left."""
    parts = name.split(".")
    for i in range(len(parts) - 1):
        if len(".".join(parts)) <= width:
            break
        parts[i] = parts[i][0]
    name = ".".join(parts)
    return name if len(name) <= width else "…" + name[len(name) - width + 1 :]


def short_value(value: str) -> str:
    """A class path's class name (``medlit.tasks.SegmentationTask`` -> ``SegmentationTask``:
    cut from the right it would keep only the package), a float to 4 digits (a sweep's
    learning rates have 17)."""
    if re.fullmatch(r"[a-z_][\w.]*\.[A-Z]\w*", value):
        return value.rsplit(".", 1)[1]
    if re.fullmatch(r"-?\d*\.\d+(e-?\d+)?|-?\d+e-?\d+", value):
        return f"{float(value):.4g}"
    return value


def number(value: float | None) -> str:
    return MISSING if value is None else f"{value:.4g}"


def truncate(text: str, width: int) -> str:
    return text if len(text) <= width else text[: max(width - 1, 0)] + "…"


def layout(columns: list[Column], width: int) -> tuple[list[Column], list[int], list[Column]]:
    """The columns that fit in ``width`` characters, their widths, and those left out:
    capped columns shrink to their cap, then the lowest-priority columns go (the
    rightmost first among equals)."""
    kept = list(columns)
    dropped: list[Column] = []

    def natural(c: Column) -> int:  # the header in full; values cut at the cap
        w = max(len(s) for s in c.cells) if c.cells else 0
        return max(len(c.header), min(w, c.cap) if c.cap else w)

    while True:
        widths = [natural(c) for c in kept]
        if sum(widths) + GAP * (len(kept) - 1) <= width or len(kept) <= 1:
            return kept, widths, sorted(dropped, key=columns.index)
        worst = min(range(len(kept)), key=lambda i: (kept[i].priority, -i))
        dropped.append(kept.pop(worst))


def render(columns: list[Column], width: int) -> list[str]:
    kept, widths, dropped = layout(columns, width)
    if len(kept) == 1 and widths[0] > width:  # a terminal narrower than one column
        widths[0] = width
    lines = []
    for row in range(-1, len(kept[0].cells) if kept else 0):
        cells = []
        for c, w in zip(kept, widths, strict=True):
            text = truncate(c.header if row < 0 else c.cells[row], w)
            cells.append(text.rjust(w) if c.numeric and row >= 0 else text.ljust(w))
        lines.append((" " * GAP).join(cells).rstrip())
    if dropped:
        names = ", ".join(c.header for c in dropped[:8])
        if len(dropped) > 8:
            names += f" and {len(dropped) - 8} more"
        lines.append(
            textwrap.fill(f"(not shown in {width} columns: {names}; set COLUMNS wider)", width)
        )
    return lines


def metric_values(
    client: Any, rows: list[RunRow], sort: tuple[str, Mode | None] | None
) -> tuple[list[tuple[str, int]], str | None, Mode]:
    """Fill each row's ``values``: the monitored metrics' best over the history, the test
    metrics (logged once), and a sorted metric that is neither (best in the sort's
    direction). Returns the metric columns as (header, priority), the sort column's
    header and the sort direction."""
    monitors: Counter[tuple[str, Mode]] = Counter()
    for row in rows:
        if (found := monitor_of(client, row.run)) is not None:
            monitors[found] += 1
    wanted = [(f"{mode} {metric}", metric, mode) for (metric, mode), _ in monitors.most_common()]
    key, direction = None, "max"
    if sort is not None:
        metric, direction = sort
        direction = direction or dict(monitors).get(metric) or guess_mode(metric)
        key = metric if metric.startswith("test/") else f"{direction} {metric}"
        if key not in (h for h, _, _ in wanted) and not metric.startswith("test/"):
            wanted.append((key, metric, direction))
    for header, metric, mode in wanted:
        for row in rows:
            if metric in row.run.data.metrics:
                row.values[header] = best_value(client, row.run.info.run_id, metric, mode)
    tests = sorted({k for row in rows for k in row.run.data.metrics if k.startswith("test/")})
    for metric in tests:
        for row in rows:
            row.values[metric] = row.run.data.metrics.get(metric)
    # The sort column right after the monitor, then test metrics of the monitor's name
    # (test/dice_mean beside val/dice_mean), then the others.
    monitored = {metric.split("/", 1)[-1] for metric, _ in monitors}
    columns = [(h, 85 if h == key else 80) for h, _, _ in wanted]
    columns += [(t, 85) for t in tests if t == key]
    columns += [(t, 70) for t in tests if t != key and t.split("/", 1)[-1] in monitored]
    columns += [(t, 40) for t in tests if t != key and t.split("/", 1)[-1] not in monitored]
    return columns, key, direction


def experiment_table(
    client: Any, experiment: Any, sort: tuple[str, Mode | None] | None, limit: int, width: int
) -> Table | None:
    """One experiment's table, or None when it has no runs."""
    runs = search(client, experiment.experiment_id, None if sort else limit or None)
    if not runs:
        return None
    rows = [RunRow(r, status_of(r), dict(r.data.params)) for r in runs]
    metric_cols, key, direction = metric_values(client, rows, sort)
    present = [r for r in rows if key is not None and r.values.get(key) is not None]
    if key is not None:  # best first; runs without the metric last
        present.sort(key=lambda r: r.values[key], reverse=direction == "max")
        rows = present + [r for r in rows if r.values.get(key) is None]
    total = len(rows)
    rows = rows[:limit] if limit else rows

    # Params that differ between the listed runs that have them: a sweep's parent run
    # logs only the sweep's settings, and would make each of its trials' params differ.
    keys = sorted({k for row in rows for k in row.params})
    differing = [k for k in keys if len({r.params[k] for r in rows if k in r.params}) > 1]
    names = short_names(differing)
    started = [datetime.fromtimestamp(r.run.info.start_time / 1000) for r in rows]
    columns = [
        Column("name", [r.run.info.run_name or r.run.info.run_id[:8] for r in rows], 100, cap=24),
        Column("status", [r.status for r in rows], 90),
        Column("start", [t.strftime("%Y-%m-%d %H:%M") for t in started], 60),
        Column("duration", [duration(r.run, r.status) for r in rows], 50, numeric=True),
        *(
            Column(
                fit_header(names[k]),
                [short_value(r.params.get(k, MISSING)) for r in rows],
                30,
                cap=16,
            )
            for k in differing
        ),
        *(
            Column(h, [number(r.values.get(h)) for r in rows], p, numeric=True)
            for h, p in metric_cols
        ),
    ]
    order = f"by {key}, best first" if key else "newest first"
    noun = "run" if total == 1 else "runs"
    shown = f"{len(rows)} of {total} {noun}" if len(rows) < total else f"{total} {noun}"
    lines = [f"experiment {experiment.name!r} ({shown}, {order})", *render(columns, width)]
    if any(r.status == "DEAD" for r in rows):
        note = (
            "DEAD: MLflow says RUNNING, but the process training it is gone; "
            "python -m medlit.fit CONFIG --ckpt_path=last continues it"
        )
        lines.append(textwrap.fill(note, width))
    metrics = {k for r in runs for k in r.data.metrics}
    return Table(max(r.info.start_time for r in runs), lines, metrics, bool(present))


def runs_report(
    tracking_uri: str,
    experiment: str | None = None,
    sort: str | None = None,
    limit: int = 20,
    width: int | None = None,
) -> str:
    """The table(s) of ``python -m medlit.tracking runs``: one per experiment with runs,
    the experiment with the newest run first. ``width``: the terminal's (``COLUMNS``),
    100 when unknown (a pipe)."""
    width = width or shutil.get_terminal_size((100, 24)).columns
    client = open_client(tracking_uri)
    parsed = parse_sort(sort)
    if parsed is not None and not parsed[0]:
        raise ConfigError(f"--sort {sort!r}: name a metric, e.g. val/dice_mean or -val/loss")
    tables = [
        table
        for exp in pick_experiments(client, experiment)
        if (table := experiment_table(client, exp, parsed, limit, width)) is not None
    ]
    if not tables:
        where = f"experiment {experiment!r}" if experiment else "the store"
        return f"no runs in {where} ({tracking_uri})"
    if parsed is not None and not any(t.sorted for t in tables):
        logged = ", ".join(sorted(set().union(*(t.metrics for t in tables))))
        raise ConfigError(
            f"--sort {sort}: no listed run logged {parsed[0]!r}; they logged: {logged}"
        )
    tables.sort(key=lambda t: -t.newest)
    return "\n\n".join("\n".join(t.lines) for t in tables)
