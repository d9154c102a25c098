"""MLflow tracking that never kills training, plus run metadata and artifact helpers.

The default store is ``sqlite:///mlruns/mlflow.db`` (MLflow 3 refuses the plain file
store); artifacts go next to it under ``mlruns/``. Open the UI with::

    mlflow ui --backend-store-uri sqlite:///mlruns/mlflow.db
"""

from __future__ import annotations

import errno
import json
import logging
import os
import random
import re
import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable
from functools import partial
from importlib import metadata
from pathlib import Path
from typing import Any, Literal, TypeVar

import yaml
from pytorch_lightning import Trainer
from pytorch_lightning.loggers import MLFlowLogger
from pytorch_lightning.utilities import rank_zero_only

log = logging.getLogger(__name__)
T = TypeVar("T")

DEFAULT_TRACKING_URI = "sqlite:///mlruns/mlflow.db"
TRACKED_PACKAGES = (
    "medlit",
    "torch",
    "torchvision",
    "pytorch-lightning",
    "timm",
    "segmentation-models-pytorch",
    "albumentations",
    "mlflow",
    "optuna",
    "SimpleITK",
    "nibabel",
    "torchmetrics",
    "numpy",
    "ultralytics",
)


REJECTED = {
    "INVALID_PARAMETER_VALUE",
    "RESOURCE_ALREADY_EXISTS",
    "RESOURCE_DOES_NOT_EXIST",
    "BAD_REQUEST",
    "INVALID_STATE",
    "PERMISSION_DENIED",
    "UNAUTHENTICATED",
}


def rejected(e: BaseException) -> bool:
    """The store answered and refused the request (a changed param, a missing run):
    retrying or keeping it cannot help, unlike a store that does not answer."""
    return getattr(e, "error_code", None) in REJECTED or isinstance(e, FileNotFoundError)


def retrying(
    what: str, fn: Callable[..., T], *args: Any, retries: int = 6, delay: float = 0.5, **kwargs: Any
) -> T:
    """``fn(*args, **kwargs)``, retried ``retries`` times in all with jittered exponential
    back-off (0.5, 1, 2, 4, 8 s by default: about 15 s, longer than SQLite's 5 s lock
    timeout twice over); the last failure, or a :func:`rejected` request, is raised."""
    for attempt in range(1, retries + 1):
        try:
            return fn(*args, **kwargs)
        except Exception as e:  # noqa: BLE001 - the caller decides what a final failure means
            if attempt == retries or rejected(e):
                raise
            log.debug("MLflow: %s failed (%s), retry %d", what, e, attempt)
            time.sleep(delay * random.uniform(0.75, 1.25))
            delay *= 2
    raise AssertionError("unreachable")


def init_store(uri: str) -> None:
    """Create a SQLite tracking store's tables under a file lock. MLflow creates them on
    first use with Alembic, and two processes doing that at once on a new database (two
    sweep workers started together) fail with "table ... already exists"."""
    if (folder := _sqlite_dir(uri)) is None:
        return
    import fcntl

    from mlflow import MlflowClient

    folder.mkdir(parents=True, exist_ok=True)
    db = Path(uri.removeprefix("sqlite:///"))
    with open(db.with_name(db.name + ".init-lock"), "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            MlflowClient(uri).search_experiments(max_results=1)
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def fail_fast_over_http(uri: str) -> None:
    """MLflow's HTTP client retries 7 times with exponential back-off and waits 120 s per
    request by default: minutes of stalled training per call while a server is down.
    medlit retries and keeps calls itself, so a request fails within 10 s."""
    if uri.startswith(("http://", "https://")):
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")


def _sqlite_dir(uri: str) -> Path | None:
    return Path(uri.removeprefix("sqlite:///")).parent if uri.startswith("sqlite:///") else None


class MLflowTracker(MLFlowLogger):
    """Lightning's MLFlowLogger, made resilient: a tracking store or server that fails
    never stops training and loses nothing while the run lasts.

    Each call is retried with jittered back-off (a SQLite store locked by another writer,
    a server restarting). When it still fails the tracker declares an outage, warns once,
    and from then on keeps every call, in order and with its original step and time
    stamp, without blocking training; every ``outage_probe`` seconds it tries to deliver
    what it kept, and once the store answers everything is delivered and logging goes
    on as before. At the end of the run it keeps trying for ``flush_timeout`` seconds;
    what is still undelivered then is written to a local spool folder (metrics, params,
    tags, artifact files, the best checkpoint and the final status), which
    ``python -m medlit.tracking sync`` delivers later; only calls the spool cannot
    describe (none in a plain run) are dropped, and counted in ``dropped``.

    Args:
        experiment_name: MLflow experiment the run belongs to.
        run_name: display name of the run (MLflow picks one when None).
        tracking_uri: tracking store or server, e.g. ``sqlite:///mlruns/mlflow.db`` or
            ``http://mlflow:5000``.
        tags: extra run tags.
        log_model: log the best checkpoint as an artifact at the end of training.
        run_id: log into this existing run instead of starting a new one (a sweep
            creates each trial's run as a child of the study's run and passes its id).
        retries: attempts per tracking call before an outage is declared.
        retry_delay: seconds before the first retry; doubles after each failure, with
            jitter so that parallel writers (sweep workers on one SQLite store) that
            collided do not collide again.
        outage_probe: seconds between delivery attempts during an outage.
        flush_timeout: seconds the end of the run waits for the store to come back.
        spool_dir: where undelivered calls are kept after ``flush_timeout``; default
            ``spool/`` beside a SQLite store, else ``mlruns/spool``. ``""`` drops them.
    """

    def __init__(
        self,
        experiment_name: str = "medlit",
        run_name: str | None = None,
        tracking_uri: str = DEFAULT_TRACKING_URI,
        tags: dict[str, Any] | None = None,
        log_model: Literal[True, False, "all"] = True,
        run_id: str | None = None,
        retries: int = 6,
        retry_delay: float = 0.5,
        outage_probe: float = 10.0,
        flush_timeout: float = 120.0,
        spool_dir: str | None = None,
    ) -> None:
        fail_fast_over_http(tracking_uri)
        init_store(tracking_uri)
        self._local_dir = _sqlite_dir(tracking_uri)
        self.retries = retries
        self.retry_delay = retry_delay
        self.outage_probe = outage_probe
        self.flush_timeout = flush_timeout
        self.dropped = 0
        self.spooled: Path | None = None
        if spool_dir is None:
            spool_dir = str(self._local_dir / "spool") if self._local_dir else "mlruns/spool"
        self.spool_dir = Path(spool_dir) if spool_dir else None
        # (what, call, replay record or None): the record is the call as JSON data, for
        # the spool; a call without one cannot outlive the process.
        self._pending: list[tuple[str, Callable[[], Any], dict | None]] = []
        self._down_since: float | None = None
        self._next_probe = 0.0
        super().__init__(
            experiment_name=experiment_name,
            run_name=run_name,
            tracking_uri=tracking_uri,
            tags=tags,
            log_model=log_model,
            run_id=run_id,
        )

    # ------------------------------------------------------------------ resilience

    def _safely(
        self,
        what: str,
        fn: Callable[..., T],
        *args: Any,
        record: dict | None = None,
        **kwargs: Any,
    ) -> T | None:
        call = partial(fn, *args, **kwargs)
        if self._down_since is not None and not self._deliver(attempts=1):
            self._pending.append((what, call, record))
            return None
        try:
            return retrying(what, call, retries=self.retries, delay=self.retry_delay)
        except Exception as e:  # noqa: BLE001 - tracking must never stop training
            if rejected(e):
                self.dropped += 1
                log.warning("MLflow refused %s, dropped (%s)", what, str(e)[:300])
                return None
            now = time.monotonic()
            self._down_since, self._next_probe = now, now + self.outage_probe
            self._pending.append((what, call, record))
            log.warning(
                "MLflow at %s is unreachable (%s: %s): training goes on; tracking calls are "
                "kept and delivered when it answers again",
                self._tracking_uri,
                type(e).__name__,
                str(e)[:200],
            )
            return None

    def _deliver(self, attempts: int) -> bool:
        """Send the kept calls, oldest first; False (and keep the rest) at the first that
        fails. Probes at most every ``outage_probe`` seconds."""
        if time.monotonic() < self._next_probe:
            return False
        sent = 0
        while self._pending:
            what, call, _ = self._pending[0]
            try:
                retrying(what, call, retries=attempts, delay=self.retry_delay)
            except Exception as e:  # noqa: BLE001 - still down, or this one call refused
                if rejected(e):
                    self.dropped += 1
                    log.warning("MLflow refused %s, dropped (%s)", what, str(e)[:300])
                else:
                    self._next_probe = time.monotonic() + self.outage_probe
                    return False
            self._pending.pop(0)
            sent += 1
        if self._down_since is not None:
            log.warning(
                "MLflow at %s answers again after %.0f s: %d kept tracking calls delivered",
                self._tracking_uri,
                time.monotonic() - self._down_since,
                sent,
            )
        self._down_since = None
        return True

    def _flush_at_end(self) -> None:
        deadline = time.monotonic() + self.flush_timeout
        while self._pending and time.monotonic() < deadline:
            self._next_probe = 0.0
            if self._deliver(attempts=1):
                return
            time.sleep(min(self.outage_probe, max(0.0, deadline - time.monotonic())))
        if not self._pending:
            return
        kept = [r for _, _, r in self._pending if r is not None] if self.spool_dir else []
        lost = sorted({w for w, _, r in self._pending if r is None or not self.spool_dir})
        self.dropped += len(self._pending) - len(kept)
        if kept:
            try:
                self.spooled = self._spool(kept)
            except OSError as e:  # a full or read-only disk must not kill training either
                self.dropped += len(kept)
                lost.append(f"spool failed: {e}")
                kept = []
        if kept:
            log.warning(
                "MLflow at %s stayed unreachable: %d tracking calls are kept in %s; deliver "
                "them with: python -m medlit.tracking sync %s",
                self._tracking_uri,
                len(kept),
                self.spooled,
                self.spooled,
            )
        if lost:
            log.warning(
                "MLflow at %s stayed unreachable: %d tracking calls (%s) were dropped",
                self._tracking_uri,
                len(self._pending) - len(kept),
                ", ".join(lost),
            )
        self._pending.clear()

    def _spool(self, records: list[dict]) -> Path:
        """Write undelivered calls (and their files) to a new spool folder, atomically."""
        assert self.spool_dir is not None
        self.spool_dir.mkdir(parents=True, exist_ok=True)
        name = f"{_stamp()}-{self._run_id or 'new-run'}"
        tmp = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=self.spool_dir))
        lines = [
            {
                "tracking_uri": self._tracking_uri,
                "experiment_name": self._experiment_name,
                "run_id": self._run_id,
                "run_name": self._run_name,
                "tags": self.tags,
            }
        ]
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
            final = self.spool_dir / (name if n == 1 else f"{name}-{n}")
            try:
                tmp.rename(final)
                return final
            except OSError as e:
                if e.errno not in (errno.EEXIST, errno.ENOTEMPTY):
                    raise
        raise OSError(errno.EEXIST, f"no free spool folder name for {name}", str(tmp))

    @property
    def save_dir(self) -> str | None:
        # Checkpoints go to <store dir>/<experiment id>/<run id>/checkpoints, beside the
        # run's artifacts, instead of a ./checkpoints folder shared by every run.
        return str(self._local_dir) if self._local_dir is not None else super().save_dir

    def _key(self, name: str) -> str:
        name = f"{self._prefix}{self.LOGGER_JOIN_CHAR}{name}" if self._prefix else name
        return re.sub(r"[^a-zA-Z0-9_/. -]+", "", name)  # what MLflow accepts, as Lightning does

    @rank_zero_only
    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        from mlflow.entities import Metric

        # Lightning's own method, but the time stamp is taken now: a call kept during an
        # outage is delivered later with the time it was logged.
        now = int(time.time() * 1000)
        batch = [
            Metric(key=self._key(k), value=float(v), timestamp=now, step=step or 0)
            for k, v in metrics.items()
            if not isinstance(v, str)
        ]
        self._safely(
            "log_metrics",
            lambda: self.experiment.log_batch(
                run_id=self.run_id, metrics=batch, **self._log_batch_kwargs
            ),
            record={"op": "log_metrics", "metrics": [[m.key, m.value, now, m.step] for m in batch]},
        )

    @rank_zero_only
    def log_hyperparams(self, params: Any) -> None:
        from lightning_fabric.utilities.logger import _convert_params, _flatten_dict

        # As Lightning logs them: flattened, values as strings cut to 250 characters.
        flat = {k: str(v)[:250] for k, v in _flatten_dict(_convert_params(params)).items()}
        self._safely(
            "log_hyperparams",
            super().log_hyperparams,
            params,
            record={"op": "log_params", "params": flat},
        )

    def after_save_checkpoint(self, checkpoint_callback: Any) -> None:
        from medlit.callbacks import LastCheckpoint

        if isinstance(checkpoint_callback, LastCheckpoint):
            return  # the resume state stays local; the run's model is the best checkpoint
        self._safely("log checkpoint", super().after_save_checkpoint, checkpoint_callback)

    @rank_zero_only
    def finalize(self, status: str = "success") -> None:
        final = {"success": "FINISHED", "failed": "FAILED", "finished": "FINISHED"}
        callback = getattr(self, "_checkpoint_callback", None)
        best = getattr(callback, "best_model_path", "") if callback is not None else ""
        self._safely(
            "finalize",
            super().finalize,
            status,
            record={
                "op": "finalize",
                "status": final.get(status, status),
                "checkpoints": [best] if best else [],
            },
        )
        self._flush_at_end()

    @rank_zero_only
    def set_tags(self, tags: dict[str, Any]) -> None:
        for k, v in tags.items():
            self._safely(
                f"set tag {k}",
                lambda k=k, v=v: self.experiment.set_tag(self.run_id, k, str(v)),
                record={"op": "set_tag", "key": k, "value": str(v)},
            )

    def log_artifacts(
        self, folder: str | Path, artifact_path: str | None = None, owned: bool = False
    ) -> None:
        """Upload a folder's files. ``owned``: the folder is the tracker's to delete once
        uploaded (so it outlives an outage: it is uploaded when the store is back)."""

        def upload() -> None:
            self.experiment.log_artifacts(self.run_id, str(folder), artifact_path)
            if owned:
                shutil.rmtree(folder, ignore_errors=True)

        self._safely(
            f"log artifacts {artifact_path or '.'}",
            upload,
            record={
                "op": "log_artifacts",
                "folder": str(folder),
                "artifact_path": artifact_path,
                "owned": owned,
            },
        )


def log_folder(trainer: Trainer, name: str, write: Callable[[Path], None]) -> None:
    """Fill a folder with ``write(folder)`` and attach its files to the run under ``name``
    ("" for the top level).

    With MLflow the files land in the run's artifacts; with another logger (or none) they
    are kept in the trainer's log dir, so a run without MLflow still keeps its outputs.
    """
    if not trainer.is_global_zero or trainer.fast_dev_run:
        return  # fast_dev_run disables loggers and checkpoints; artefacts too
    tracker = next((lg for lg in trainer.loggers if isinstance(lg, MLflowTracker)), None)
    if tracker is None:
        folder = Path(trainer.log_dir or trainer.default_root_dir) / name
        folder.mkdir(parents=True, exist_ok=True)
        write(folder)
        return
    folder = Path(tempfile.mkdtemp(prefix="medlit-artifacts-"))
    try:
        write(folder)
    except BaseException:
        shutil.rmtree(folder, ignore_errors=True)
        raise
    tracker.log_artifacts(folder, name or None, owned=True)


def log_file(trainer: Trainer, name: str, write: Callable[[Path], None]) -> None:
    """Write one artifact file ``name`` (may contain folders) with ``write(path)``."""
    parent, filename = Path(name).parent, Path(name).name
    log_folder(
        trainer, "" if parent == Path(".") else str(parent), lambda folder: write(folder / filename)
    )


def git_commit() -> str:
    """Commit of the medlit checkout (``+dirty`` when it has uncommitted changes)."""
    here = Path(__file__).resolve().parent
    try:
        sha = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            cwd=here,
            capture_output=True,
            text=True,
            check=True,
            timeout=10,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=here,
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout.strip()
        return sha + ("+dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def package_versions() -> dict[str, str]:
    out = {}
    for name in TRACKED_PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return out


def flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested config -> ``{"model.init_args.lr": 3e-4, ...}`` for MLflow params."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v:
            out.update(flatten(v, f"{key}."))
        elif isinstance(v, list) and v and not isinstance(v[0], int | float | str | bool):
            out[key] = [str(x) for x in v]  # e.g. the config file paths
        else:
            out[key] = v
    return out


def log_run_metadata(
    trainer: Trainer, config: dict[str, Any], config_yaml: str, tags: dict[str, str]
) -> None:
    """Resolved config (YAML artifact + flattened params), git commit, versions, tags."""
    for tracker in (lg for lg in trainer.loggers if isinstance(lg, MLflowTracker)):
        params = {
            k: v
            for k, v in flatten(config).items()
            if not k.startswith("trainer.logger") and k != "ckpt_path"
        }
        tracker.log_hyperparams(params)
        tracker.set_tags(
            {
                "git_commit": git_commit(),
                **tags,
                **{f"version.{k}": v for k, v in package_versions().items()},
            }
        )
    log_file(trainer, "config.yaml", lambda p: p.write_text(config_yaml))
    log_file(
        trainer,
        "versions.yaml",
        lambda p: p.write_text(yaml.safe_dump(package_versions(), sort_keys=True)),
    )


# ---- the spool: calls a run could not deliver, delivered later ---------------------------


def _replay(client: Any, run_id: str, record: dict, folder: Path) -> None:
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
    elif op == "log_artifacts":
        client.log_artifacts(run_id, str(folder / record["folder"]), record["artifact_path"])
    elif op == "finalize":
        for ckpt in record["checkpoints"]:
            if Path(ckpt).is_file():
                client.log_artifact(run_id, ckpt, Path(ckpt).stem)
        client.set_terminated(run_id, record["status"])
    else:
        raise ValueError(f"unknown spooled call {op!r}")


def _stamp() -> str:
    return time.strftime("%Y%m%d-%H%M%S")


def sync_spool(path: str | Path, tracking_uri: str | None = None) -> int:
    """Deliver every spooled run under ``path`` (a spool folder, or a folder of them) to
    its tracking store (or ``tracking_uri``), oldest call first; returns the calls
    delivered. A delivered folder is deleted; after a failure the folder keeps exactly the
    calls not yet delivered, so running it again continues where it stopped."""
    from mlflow import MlflowClient

    from medlit.errors import MedlitError

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
                    else client.create_experiment(header["experiment_name"])
                )
                run_id = client.create_run(
                    exp_id, run_name=header["run_name"], tags=header["tags"] or {}
                ).info.run_id
                header["run_id"] = run_id
            while records:
                retrying(records[0]["op"], _replay, client, run_id, records[0], folder)
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


def main(argv: list[str] | None = None) -> None:
    import argparse
    import sys

    parser = argparse.ArgumentParser(
        prog="python -m medlit.tracking",
        description="Deliver tracking calls that runs kept in a spool folder while their "
        "MLflow store was unreachable.",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    sync = sub.add_parser("sync", help="deliver spooled calls")
    sync.add_argument("path", nargs="?", default="mlruns/spool")
    sync.add_argument("--tracking_uri", default=None, help="deliver here instead")
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    n = sync_spool(args.path, args.tracking_uri)
    print(f"medlit.tracking: delivered {n} spooled tracking calls from {args.path}")


if __name__ == "__main__":
    import sys

    from medlit.cli import run_main

    sys.exit(run_main(main))
