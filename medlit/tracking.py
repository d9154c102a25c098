"""MLflow tracking that never kills training, plus run metadata and artifact helpers.

The default store is ``sqlite:///mlruns/mlflow.db`` (MLflow 3 refuses the plain file
store); artifacts go next to it under ``mlruns/``. Open the UI with::

    mlflow ui --backend-store-uri sqlite:///mlruns/mlflow.db
"""

from __future__ import annotations

import logging
import random
import subprocess
import tempfile
import time
from collections.abc import Callable
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


def retrying(
    what: str, fn: Callable[..., T], *args: Any, retries: int = 6, delay: float = 0.5, **kwargs: Any
) -> T:
    """``fn(*args, **kwargs)``, retried ``retries`` times in all with jittered exponential
    back-off (0.5, 1, 2, 4, 8 s by default: about 15 s, longer than SQLite's 5 s lock
    timeout twice over); the last failure is raised."""
    for attempt in range(1, retries + 1):
        try:
            return fn(*args, **kwargs)
        except Exception as e:  # noqa: BLE001 - the caller decides what a final failure means
            if attempt == retries:
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
    """Lightning's MLFlowLogger, made resilient: every call to the tracking store is
    retried with back-off and, if it still fails, logged and dropped, so a tracking
    outage never stops training.

    Args:
        experiment_name: MLflow experiment the run belongs to.
        run_name: display name of the run (MLflow picks one when None).
        tracking_uri: tracking store or server, e.g. ``sqlite:///mlruns/mlflow.db`` or
            ``http://mlflow:5000``.
        tags: extra run tags.
        log_model: log the best checkpoint as an artifact at the end of training.
        run_id: log into this existing run instead of starting a new one (a sweep
            creates each trial's run as a child of the study's run and passes its id).
        retries: attempts per tracking call before it is dropped.
        retry_delay: seconds before the first retry; doubles after each failure, with
            jitter so that parallel writers (sweep workers on one SQLite store) that
            collided do not collide again.
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
    ) -> None:
        init_store(tracking_uri)
        self._local_dir = _sqlite_dir(tracking_uri)
        self.retries = retries
        self.retry_delay = retry_delay
        self.dropped = 0
        super().__init__(
            experiment_name=experiment_name,
            run_name=run_name,
            tracking_uri=tracking_uri,
            tags=tags,
            log_model=log_model,
            run_id=run_id,
        )

    @property
    def save_dir(self) -> str | None:
        # Checkpoints go to <store dir>/<experiment id>/<run id>/checkpoints, beside the
        # run's artifacts, instead of a ./checkpoints folder shared by every run.
        return str(self._local_dir) if self._local_dir is not None else super().save_dir

    def _safely(self, what: str, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T | None:
        try:
            return retrying(what, fn, *args, retries=self.retries, delay=self.retry_delay, **kwargs)
        except Exception as e:  # noqa: BLE001 - tracking must never stop training
            self.dropped += 1
            log.warning(
                "MLflow: %s failed %d times, dropped (%s: %s)",
                what,
                self.retries,
                type(e).__name__,
                e,
            )
            return None

    @rank_zero_only
    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        self._safely("log_metrics", super().log_metrics, metrics, step)

    @rank_zero_only
    def log_hyperparams(self, params: Any) -> None:
        self._safely("log_hyperparams", super().log_hyperparams, params)

    def after_save_checkpoint(self, checkpoint_callback: Any) -> None:
        self._safely("log checkpoint", super().after_save_checkpoint, checkpoint_callback)

    @rank_zero_only
    def finalize(self, status: str = "success") -> None:
        self._safely("finalize", super().finalize, status)

    @rank_zero_only
    def set_tags(self, tags: dict[str, Any]) -> None:
        for k, v in tags.items():
            self._safely(
                f"set tag {k}", lambda k=k, v=v: self.experiment.set_tag(self.run_id, k, str(v))
            )

    def log_artifacts(self, folder: str | Path, artifact_path: str | None = None) -> None:
        self._safely(
            f"log artifacts {artifact_path or '.'}",
            lambda: self.experiment.log_artifacts(self.run_id, str(folder), artifact_path),
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
    with tempfile.TemporaryDirectory() as tmp:
        write(Path(tmp))
        tracker.log_artifacts(tmp, name or None)


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
        params = {k: v for k, v in flatten(config).items() if not k.startswith("trainer.logger")}
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
