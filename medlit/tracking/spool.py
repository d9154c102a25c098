"""The spool: tracking calls a run could not deliver before it ended, kept in a folder
(``calls.jsonl`` and the artifact files), and delivered later by
``python -m medlit.tracking sync``."""

from __future__ import annotations

import errno
import json
import logging
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

from medlit.checkpoints import stored_once
from medlit.datasets.io.files import usual_mode
from medlit.errors import MedlitError
from medlit.tracking.retry import fail_fast_over_http, retrying
from medlit.tracking.store import artifact_location, mark_training_experiment, share_view

log = logging.getLogger(__name__)


def replay(client: Any, run_id: str, record: dict, folder: Path) -> None:
    from mlflow.entities import Metric, Param

    op = record["op"]
    if op == "log_metrics":
        metrics = [Metric(k, v, ts, step) for k, v, ts, step in record["metrics"]]
        for i in range(0, len(metrics), 1000):  # MLflow's batch limit
            client.log_batch(run_id, metrics=metrics[i : i + 1000])
    elif op == "log_params":
        params = [Param(k, v) for k, v in record["params"].items()]
        for i in range(0, len(params), 100):
            client.log_batch(run_id, params=params[i : i + 100])
    elif op == "set_tag":
        client.set_tag(run_id, record["key"], record["value"])
    elif op == "experiment_kind":
        mark_training_experiment(client, client.get_run(run_id).info.experiment_id)
    elif op == "show_metrics":
        share_view(client, client.get_run(run_id).info.experiment_id, record["metrics"])
    elif op == "log_artifacts":
        client.log_artifacts(run_id, str(folder / record["folder"]), record["artifact_path"])
    elif op == "finalize":
        for ckpt in record["checkpoints"]:
            if Path(ckpt).is_file():
                client.log_artifact(run_id, ckpt, Path(ckpt).stem)
                stored_once(client, run_id, Path(ckpt), Path(ckpt).stem)
        client.set_terminated(run_id, record["status"])
    else:
        raise ValueError(f"unknown spooled call {op!r}")


def stamp() -> str:
    return time.strftime("%Y%m%d-%H%M%S")


def write_spool(spool_dir: Path, header: dict[str, Any], records: list[dict]) -> Path:
    """Write a run's undelivered calls (and their files) to a new folder of ``spool_dir``,
    atomically (built under a hidden name, then renamed); returns the folder.

    ``header``: the run (tracking URI, experiment, run id or None, name, tags);
    ``records``: the calls as JSON data, oldest first. A ``log_artifacts`` record's folder
    is copied in, or moved when the record says the tracker ``owned`` it."""
    spool_dir.mkdir(parents=True, exist_ok=True)
    name = f"{stamp()}-{header['run_id'] or 'new-run'}"
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=spool_dir))
    usual_mode(tmp, folder=True)
    lines = [header]
    for i, record in enumerate(records):
        record = dict(record)
        if record["op"] == "log_artifacts":  # the files travel with the spool
            dest = tmp / "files" / str(i)
            src = Path(record["folder"])
            if record.pop("owned", False):
                shutil.move(str(src), dest)
            else:
                shutil.copytree(src, dest)
            record["folder"] = f"files/{i}"
        lines.append(record)
    (tmp / "calls.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    # Lightning finalizes a logger after fit and again after test, often within the
    # same second: the second folder gets the next free suffix instead of colliding.
    for n in range(1, 1000):
        final = spool_dir / (name if n == 1 else f"{name}-{n}")
        try:
            tmp.rename(final)
            return final
        except OSError as e:
            if e.errno not in (errno.EEXIST, errno.ENOTEMPTY):
                raise
    raise OSError(errno.EEXIST, f"no free spool folder name for {name}", str(tmp))


def sync_spool(path: str | Path, tracking_uri: str | None = None) -> int:
    """Deliver every spooled run under ``path`` (a spool folder, or a folder of them) to
    its tracking store (or ``tracking_uri``), oldest call first; returns the calls
    delivered. A delivered folder is deleted; after a failure the folder keeps exactly the
    calls not yet delivered, so running it again continues where it stopped."""
    from mlflow import MlflowClient

    path = Path(path)
    folders = (
        [path]
        if (path / "calls.jsonl").is_file()
        else sorted(p for p in path.glob("*") if (p / "calls.jsonl").is_file())
    )
    if not folders:
        raise MedlitError(f"{path}: no spooled tracking calls (no */calls.jsonl)")
    delivered = 0
    for folder in folders:
        header, *records = [
            json.loads(line) for line in (folder / "calls.jsonl").read_text().splitlines()
        ]
        uri = tracking_uri or header["tracking_uri"]
        fail_fast_over_http(uri)
        client = MlflowClient(uri)
        try:
            run_id = header["run_id"]
            if run_id is None:  # the run itself was never created on the store
                exp = client.get_experiment_by_name(header["experiment_name"])
                exp_id = (
                    exp.experiment_id
                    if exp
                    else client.create_experiment(
                        header["experiment_name"],
                        artifact_location=artifact_location(uri, header["experiment_name"]),
                    )
                )
                # A run that started offline spools at each finalize (after fit, after
                # test): every folder of it goes to the one run the first one created.
                offline = header.get("offline_id")
                found = (
                    client.search_runs(
                        [exp_id], filter_string=f"tags.`medlit.offline_id` = '{offline}'"
                    )
                    if offline
                    else []
                )
                tags = {
                    **(header["tags"] or {}),
                    **({"medlit.offline_id": offline} if offline else {}),
                }
                run_id = (
                    found[0].info.run_id
                    if found
                    else client.create_run(
                        exp_id, run_name=header["run_name"], tags=tags
                    ).info.run_id
                )
                header["run_id"] = run_id
            while records:
                retrying(records[0]["op"], replay, client, run_id, records[0], folder)
                records.pop(0)
                delivered += 1
        except Exception as e:  # noqa: BLE001 - keep what is left, say why
            atomic_lines = "".join(json.dumps(x) + "\n" for x in [header, *records])
            tmp = folder / "calls.jsonl.tmp"
            tmp.write_text(atomic_lines)
            tmp.replace(folder / "calls.jsonl")
            raise MedlitError(
                f"{folder}: {len(records)} calls not delivered to {uri} "
                f"({type(e).__name__}: {str(e)[:200]}); run the sync again"
            ) from None
        shutil.rmtree(folder)
        log.info("delivered %s to %s (run %s)", folder.name, uri, run_id)
    return delivered
