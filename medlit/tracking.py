"""MLflow tracking that never kills training, plus run metadata and artifact helpers.

The default store is ``sqlite:///mlruns/mlflow.db`` (MLflow 3 refuses the plain file
store); artifacts go next to it under ``mlruns/``. Open the UI with::

    mlflow ui --backend-store-uri sqlite:///mlruns/mlflow.db
"""

from __future__ import annotations

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
    only what is still undelivered then is dropped, and counted in ``dropped``.

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
    ) -> None:
        if tracking_uri.startswith(("http://", "https://")):
            # MLflow's HTTP client retries 7 times with exponential back-off and waits
            # 120 s per request by default: minutes of stalled training per call while a
            # server is down. The tracker retries and keeps calls itself.
            os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
            os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")
        init_store(tracking_uri)
        self._local_dir = _sqlite_dir(tracking_uri)
        self.retries = retries
        self.retry_delay = retry_delay
        self.outage_probe = outage_probe
        self.flush_timeout = flush_timeout
        self.dropped = 0
        self._pending: list[tuple[str, Callable[[], Any]]] = []
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

    def _safely(self, what: str, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T | None:
        call = partial(fn, *args, **kwargs)
        if self._down_since is not None and not self._deliver(attempts=1):
            self._pending.append((what, call))
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
            self._pending.append((what, call))
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
            what, call = self._pending[0]
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
        if self._pending:
            self.dropped += len(self._pending)
            log.warning(
                "MLflow at %s stayed unreachable: %d tracking calls (%s) were dropped",
                self._tracking_uri,
                len(self._pending),
                ", ".join(sorted({w for w, _ in self._pending})),
            )
            self._pending.clear()

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
        )

    @rank_zero_only
    def log_hyperparams(self, params: Any) -> None:
        self._safely("log_hyperparams", super().log_hyperparams, params)

    def after_save_checkpoint(self, checkpoint_callback: Any) -> None:
        from medlit.callbacks import LastCheckpoint

        if isinstance(checkpoint_callback, LastCheckpoint):
            return  # the resume state stays local; the run's model is the best checkpoint
        self._safely("log checkpoint", super().after_save_checkpoint, checkpoint_callback)

    @rank_zero_only
    def finalize(self, status: str = "success") -> None:
        self._safely("finalize", super().finalize, status)
        self._flush_at_end()

    @rank_zero_only
    def set_tags(self, tags: dict[str, Any]) -> None:
        for k, v in tags.items():
            self._safely(
                f"set tag {k}", lambda k=k, v=v: self.experiment.set_tag(self.run_id, k, str(v))
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

        self._safely(f"log artifacts {artifact_path or '.'}", upload)


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
