"""medlit's MLflow logger: Lightning's ``MLFlowLogger``, made resilient to an unreachable
store, with the artifact methods tasks log their files through."""

from __future__ import annotations

import logging
import re
import shutil
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any, Literal, TypeVar

from pytorch_lightning.loggers import MLFlowLogger
from pytorch_lightning.loggers.logger import rank_zero_experiment
from pytorch_lightning.utilities import rank_zero_only
from pytorch_lightning.utilities.exceptions import SIGTERMException

from medlit.checkpoints import stored_once
from medlit.constraints import NonNegativeFloat, NonNegativeInt
from medlit.errors import MedlitError, Unburied
from medlit.liveness import HEARTBEAT_EVERY, me
from medlit.tracking.retry import fail_fast_over_http, rejected, retrying
from medlit.tracking.spool import write_spool
from medlit.tracking.store import (
    DEFAULT_TRACKING_URI,
    artifact_location,
    experiment_url,
    init_store,
    mark_training_experiment,
    run_url,
    share_view,
    sqlite_dir,
)

log = logging.getLogger(__name__)
T = TypeVar("T")


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
        log_model: log the best checkpoint as an artifact at the end of training (with a
            local artifact store, a hard link to the file in ``checkpoints/``, not a copy).
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
        retries: NonNegativeInt = 6,
        retry_delay: NonNegativeFloat = 0.5,
        outage_probe: NonNegativeFloat = 10.0,
        flush_timeout: NonNegativeFloat = 120.0,
        spool_dir: str | None = None,
    ) -> None:
        fail_fast_over_http(tracking_uri)
        try:  # before MLFlowLogger's client opens it
            init_store(tracking_uri)
        except MedlitError as e:
            raise Unburied(e) from None
        self._offline_id: str | None = None
        self._local_dir = sqlite_dir(tracking_uri)
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
        self.reopened = False  # logging into an earlier run (--ckpt_path)
        self._last_beat = 0.0
        super().__init__(
            experiment_name=experiment_name,
            run_name=run_name,
            tracking_uri=tracking_uri,
            tags=tags,
            log_model=log_model,
            run_id=run_id,
            artifact_location=artifact_location(tracking_uri, experiment_name),
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
        if not self._initialized:  # down since the start: the run comes first
            try:
                MLFlowLogger.experiment.fget(self)
            except Exception:  # noqa: BLE001 - still down
                self._next_probe = time.monotonic() + self.outage_probe
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
        assert self.spool_dir is not None
        header = {
            "tracking_uri": self._tracking_uri,
            "experiment_name": self._experiment_name,
            "run_id": self._run_id,
            "offline_id": self._offline_id,  # a run never created: one run for all spools
            "run_name": self._run_name,
            "tags": self.tags,
        }
        return write_spool(self.spool_dir, header, records)

    # ------------------------------------------------------------------ the run

    @property
    @rank_zero_experiment
    def experiment(self) -> Any:
        """MLflow's client, with the run created (Lightning's), or, when the store cannot
        be reached as the run starts, the client without a run: training starts anyway,
        every call is kept as during an outage mid-run, and the run is created when the
        store answers again (or by ``python -m medlit.tracking sync`` from the spool)."""
        if self._initialized or (self._down_since is not None and self._offline_id):
            return self._mlflow_client
        try:
            client = retrying(
                "open the run",
                lambda: MLFlowLogger.experiment.fget(self),
                retries=self.retries,
                delay=self.retry_delay,
            )
            # The experiment opens on its runs (a model-training experiment), not on
            # MLflow 3's empty GenAI traces page. Cosmetic: never worth failing a run.
            self._safely(
                "tag the experiment kind",
                mark_training_experiment,
                client,
                self._experiment_id,
                record={"op": "experiment_kind"},
            )
            return client
        except Exception as e:  # noqa: BLE001 - the store does not answer: run offline
            if rejected(e):
                raise
            now = time.monotonic()
            self._down_since, self._next_probe = now, now + self.outage_probe
            self._offline_id = f"offline-{uuid.uuid4().hex[:12]}"
            log.warning(
                "MLflow at %s cannot be reached as the run starts (%s: %s): training goes "
                "on; its tracking calls are kept, and the run is created when the store "
                "answers (or from the spool: python -m medlit.tracking sync). Checkpoints: "
                "%s",
                self._tracking_uri,
                type(e).__name__,
                str(e)[:200],
                Path(self.save_dir or ".") / "offline" / self._offline_id,
            )
            return self._mlflow_client

    @property
    def name(self) -> str | None:
        _ = self.experiment
        return self._experiment_id or ("offline" if self._offline_id else None)

    @property
    def version(self) -> str | None:
        _ = self.experiment
        return self._run_id or self._offline_id

    @property
    def experiment_name(self) -> str:
        return self._experiment_name

    @property
    def tracking_uri(self) -> str:
        return self._tracking_uri

    @property
    def run_url(self) -> str | None:
        """The run's page in the MLflow UI (for a local store, where ``mlflow ui``
        serves it by default), or None before the run exists."""
        return run_url(self._tracking_uri, self._experiment_id, self._run_id)

    @property
    def experiment_url(self) -> str | None:
        """The experiment's runs table in the MLflow UI, key metrics as columns."""
        return experiment_url(self._tracking_uri, self._experiment_id)

    @rank_zero_only
    def show_metrics(self, metrics: list[str]) -> None:
        """Make ``metrics`` columns of the experiment's runs table (:func:`share_view`)."""
        if self._experiment_id:
            self._safely(
                "show metrics in the runs table",
                share_view,
                self._mlflow_client,
                self._experiment_id,
                metrics,
                record={"op": "show_metrics", "metrics": metrics},
            )

    def runs_of_config(self, fingerprint: str) -> list[Any]:
        """The experiment's runs tagged with config hash ``fingerprint``, newest first."""
        client = self._mlflow_client
        exp = client.get_experiment_by_name(self._experiment_name)
        if exp is None:
            return []
        return client.search_runs(
            [exp.experiment_id],
            filter_string=f"tags.`medlit.config_hash` = '{fingerprint}'",
            order_by=["attributes.start_time DESC"],
        )

    def run(self, run_id: str) -> Any | None:
        """The MLflow run ``run_id`` (status, tags, params), or None when the store has
        none by that id."""
        try:
            return self._mlflow_client.get_run(run_id)
        except Exception:  # noqa: BLE001 - MlflowException RESOURCE_DOES_NOT_EXIST
            return None

    def beat(self, force: bool = False) -> None:
        """Record that this process owns the run and is alive (``medlit.owner``, and
        ``medlit.heartbeat`` at most every :data:`HEARTBEAT_EVERY` seconds), so that
        ``--ckpt_path`` never joins a run that is still being trained."""
        now = time.time()
        if force or now - self._last_beat >= HEARTBEAT_EVERY:
            self._last_beat = now
            self.set_tags({"medlit.owner": me(), "medlit.heartbeat": f"{now:.0f}"})

    def reopen(self, run_id: str) -> None:
        """Log into the existing run ``run_id`` (a resumed run), marked running again."""
        self.reopened = True
        self._run_id = run_id
        self._safely("reopen run", lambda: self.experiment.update_run(run_id, "RUNNING"))

    def log_folder(self, name: str, write: Callable[[Path], None]) -> None:
        """:meth:`medlit.artifacts.ArtifactLogger.log_folder`: the files are written to a
        folder the tracker owns and uploaded; during an outage the folder is kept (in the
        spool at the end of the run) until the store takes it."""
        folder = Path(tempfile.mkdtemp(prefix="medlit-artifacts-"))
        try:
            write(folder)
        except BaseException:
            shutil.rmtree(folder, ignore_errors=True)
            raise
        self.log_artifacts(folder, name or None, owned=True)

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
        self.beat()
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

    def _scan_and_log_checkpoints(self, checkpoint_callback: Any) -> None:
        # Lightning's upload (the checkpoint copied under <stem>/, its metadata.yaml and
        # aliases.txt beside it), then, with a local artifact store, each copy just made
        # replaced by a hard link to the checkpoint: the best weights were on disk twice.
        before = dict(self._logged_model_time)
        super()._scan_and_log_checkpoints(checkpoint_callback)
        for path, mtime in self._logged_model_time.items():
            if before.get(path) != mtime:
                stored_once(self.experiment, self.run_id, Path(path), Path(path).stem)

    @rank_zero_only
    def finalize(self, status: str = "success") -> None:
        # Lightning finalises with "failed" while it handles the exception that stopped
        # fit; a signal (SIGTERM from a scheduler, Ctrl-C) is not a failure of the run:
        # KILLED, which --ckpt_path=last continues like any unfinished run.
        if status == "failed" and isinstance(
            sys.exc_info()[1], KeyboardInterrupt | SIGTERMException
        ):
            status = "KILLED"
        if status == "finished":
            # Only Lightning's SLURM auto-requeue handler finalises with "finished", before
            # it saves hpc_ckpt_N.ckpt and requeues the job: the run is not over. It stays
            # unfinished, its calls delivered, its owner released, so the requeued job
            # continues it (medlit.fit resumes from the hpc checkpoint into this run).
            # The handler runs in the signal's context, maybe in the middle of this
            # process's own write to the store: with SQLite that write holds the lock
            # until the handler returns, so a write from here waited for it through
            # every retry and the whole flush timeout (minutes, while SLURM's grace time
            # ran out). A thread writes the tags once the interrupted write is done.
            tags = {"medlit.owner": "", "medlit.requeued": f"{time.time():.0f}"}
            self._requeue_marker = threading.Thread(
                target=self._mark_requeued, args=(tags,), name="medlit-requeue", daemon=True
            )
            self._requeue_marker.start()
            return
        if (marker := getattr(self, "_requeue_marker", None)) is not None:
            # SLURM ends a requeued job with SIGTERM, which finalises the run (KILLED)
            # soon after the requeue: the tags go first, or they die with the process.
            marker.join(timeout=self.flush_timeout)
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

    def _mark_requeued(self, tags: dict[str, Any]) -> None:
        self.set_tags(tags)
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
