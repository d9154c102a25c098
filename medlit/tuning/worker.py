"""One sweep worker: asks Optuna for trials, trains each as a ``medlit.fit`` process, and
records the study in MLflow (one parent run, one child run per trial).

Every trial runs as its own process, DDP or not: every rank of a DDP trial then starts
from the same sampled values, a trial that crashes (out of memory, a CUDA error, a
segfault) fails that trial and not the worker, and each trial starts with a clean
interpreter (no global state or GPU memory carried over). The price is the start-up of
one Python process per trial (a few seconds; see the README).
"""

from __future__ import annotations

import contextlib
import ctypes
import io
import json
import logging
import os
import signal
import sqlite3
import subprocess
import sys
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import mlflow
import optuna
from optuna.storages import RetryFailedTrialCallback, fail_stale_trials
from optuna.storages._heartbeat import get_heartbeat_thread
from optuna.trial import FrozenTrial, TrialState

from medlit.errors import ConfigError, MedlitError
from medlit.tracking import MLflowTracker, init_store, retrying
from medlit.tracking.store import artifact_location
from medlit.tuning import relay
from medlit.tuning import space as sp
from medlit.tuning.storage import (
    HOST,
    default_storage,
    make_storage,
    redact,
)
from medlit.tuning.trial import ENV

log = logging.getLogger("medlit.sweep")

SURPLUS = "medlit:surplus"
RETRY_OF = "failed_trial"  # set by Optuna's RetryFailedTrialCallback
PARENT_ATTR = "mlflow_parent_run_id"
# Optuna's parameter importance fits a random forest (fANOVA) to the complete trials:
# on a handful of trials it ranks the parameters by noise, and a plot would look like a
# finding. Below this many it is not drawn, and the sweep says why.
MIN_TRIALS_FOR_IMPORTANCE = 10


class SweepError(MedlitError):
    """A sweep cannot go on (e.g. every trial would fail the same way)."""


@dataclass
class SweepConfig:
    """A resolved sweep file (see ``medlit.sweep`` for the meaning of each key)."""

    experiment: Path
    objective: sp.Objective
    search_space: dict[str, sp.Param]
    overrides: dict[str, Any] = field(default_factory=dict)
    n_trials: int | None = None
    timeout: float | None = None
    sampler: sp.SamplerConfig = field(default_factory=sp.SamplerConfig)
    pruner: sp.PrunerConfig = field(default_factory=sp.PrunerConfig)
    study_name: str = "sweep"
    storage: str | None = None
    output_dir: Path | None = None
    max_retry: int = 2
    test_trials: bool = False
    source: str = ""

    @property
    def storage_spec(self) -> str:
        return self.storage or default_storage(self.study_name)

    @property
    def out(self) -> Path:
        return self.output_dir or Path("mlruns") / "sweeps" / self.study_name

    def base_args(self) -> list[str]:
        return [str(self.experiment), *(sp.to_cli(k, v) for k, v in self.overrides.items())]


# --------------------------------------------------------------------------- config


def resolve(args: list[str]) -> tuple[dict[str, Any], str]:
    """Parse an experiment with overrides exactly as ``medlit.fit`` would, without
    building anything: returns the resolved config and its YAML, which ``medlit.fit``
    runs unchanged. Unknown keys and invalid values fail here, naming the key."""
    from medlit.cli import MedlitCLI, normalise_args

    class ParseOnly(MedlitCLI):
        def instantiate_classes(self) -> None:  # the sweep only needs the parsed config
            pass

        def _set_seed(self) -> None:  # nor a seeded process
            pass

    stderr = io.StringIO()
    try:
        with warnings.catch_warnings(), contextlib.redirect_stderr(stderr):
            warnings.filterwarnings("ignore", "LightningCLI's args parameter")
            cli = ParseOnly(args=normalise_args(args))
    except SystemExit:  # jsonargparse's message names the key and the value
        lines = [ln.strip() for ln in stderr.getvalue().splitlines()]
        error = [ln for ln in lines if ln.startswith("error:")]
        # jsonargparse puts which key and which rule deep in its Union-subtype message.
        error += list(
            dict.fromkeys(ln for ln in lines if ln.startswith(("Parser key", "Not of type")))
        )
        raise ConfigError(
            f"{args[0]} with overrides {' '.join(args[1:])}: "
            + (" ".join(error) or stderr.getvalue()[-2000:])
        ) from None
    return cli.config.as_dict(), cli.parser.dump(cli.config, skip_none=False)


def tracking_of(config: dict[str, Any]) -> tuple[str, str]:
    logger = (config.get("trainer") or {}).get("logger")
    cls = logger.get("class_path") if isinstance(logger, dict) else None
    if cls not in ("medlit.tracking.MLflowTracker", MLflowTracker.__qualname__):
        raise ConfigError(
            "a sweep records its trials in MLflow: the experiment's trainer.logger must be "
            f"medlit.tracking.MLflowTracker, not {cls or logger!r}"
        )
    args = logger.get("init_args") or {}
    return args.get("tracking_uri"), args.get("experiment_name") or "medlit"


def enable_sqlite_wal(uri: str) -> None:
    """SQLite tracking store in write-ahead-log mode: readers (the UI, other workers) no
    longer block the writer. The mode is a property of the database file; MLflow
    works with it unchanged. Concurrent writers still take turns: ``retrying`` covers
    the moments one waits longer than SQLite's 5 s lock timeout."""
    if not uri.startswith("sqlite:///"):
        return
    path = uri.removeprefix("sqlite:///")
    with contextlib.closing(sqlite3.connect(path, timeout=30)) as db:
        db.execute("PRAGMA journal_mode=WAL")


# --------------------------------------------------------------------------- MLflow


class Tracking:
    """The worker's own MLflow bookkeeping (parent run, child runs, their end state).
    Every call is retried; a final failure is logged and dropped, never fatal."""

    def __init__(self, uri: str, experiment: str) -> None:
        self.uri = uri
        try:
            init_store(uri)
            self.client = mlflow.MlflowClient(uri)
            exp = retrying("get experiment", self.client.get_experiment_by_name, experiment)
        except Exception as e:  # noqa: BLE001 - name the store, no traceback
            raise ConfigError(
                f"MLflow tracking store {redact(uri)} cannot be reached ({type(e).__name__}: "
                f"{str(e)[:300]}); a sweep records its trials there"
            ) from None
        if exp is None:
            try:
                self.experiment_id = self.client.create_experiment(
                    experiment, artifact_location=artifact_location(uri, experiment)
                )
            except Exception:  # noqa: BLE001 - another worker created it first
                self.experiment_id = retrying(
                    "get experiment", self.client.get_experiment_by_name, experiment
                ).experiment_id
        else:
            self.experiment_id = exp.experiment_id
        enable_sqlite_wal(uri)

    def call(self, what: str, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        try:
            return retrying(what, fn, *args, **kwargs)
        except Exception as e:  # noqa: BLE001 - tracking never stops a sweep
            log.warning("MLflow: %s failed, dropped (%s: %s)", what, type(e).__name__, e)
            return None

    def create_run(self, name: str, tags: dict[str, str]) -> str | None:
        run = self.call(
            f"create run {name}",
            self.client.create_run,
            self.experiment_id,
            run_name=name,
            tags=tags,
        )
        return run.info.run_id if run is not None else None

    def end_trial_run(self, run_id: str | None, state: str, tags: dict[str, str]) -> None:
        if not run_id:
            return
        status = {"COMPLETE": "FINISHED", "PRUNED": "KILLED"}.get(state, "FAILED")
        for k, v in {"optuna.state": state, **tags}.items():
            self.call(f"tag {k}", self.client.set_tag, run_id, k, v)
        self.call("end run", self.client.set_terminated, run_id, status)


# --------------------------------------------------------------------------- worker


def die_with_parent() -> None:  # pragma: no cover - runs in the forked child
    """Linux: the trial process gets SIGKILL when its worker dies, so a killed worker
    leaves no orphan training on (its trial is failed and retried elsewhere)."""
    with contextlib.suppress(Exception):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


@contextlib.contextmanager
def _signals_as_interrupt() -> Iterator[None]:
    def raise_interrupt(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt(signal.Signals(signum).name)

    old = signal.signal(signal.SIGTERM, raise_interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, old)


class Worker:
    def __init__(self, cfg: SweepConfig) -> None:
        self.cfg = cfg
        self.dists = sp.distributions(cfg.search_space)
        if cfg.sampler.name == "grid" and cfg.n_trials is None:
            cfg.n_trials = sp.grid_size(self.dists)
        if cfg.n_trials is None and cfg.timeout is None:
            raise ConfigError("a sweep needs n_trials or timeout (or both)")
        # The base experiment, and every search-space key at both ends of its range and at
        # each of its choices, must parse: a range that leaves an argument's own bounds
        # (lr from -1, a batch size of 0) is refused now, naming the key, not in a trial.
        config = None
        for probe in _probes(self.dists):
            overrides = [sp.to_cli(k, sp.decode(v, self.dists[k])) for k, v in probe.items()]
            parsed, _ = resolve(self.cfg.base_args() + overrides)
            config = config or parsed
        uri, experiment = tracking_of(config)
        self.tracking = Tracking(uri, experiment)
        self.storage = make_storage(cfg.storage_spec, self._on_stale_trial)
        self.study = self._open_study()
        self.parent_run_id = self._parent_run()

    # ------------------------------------------------------------------ study + parent

    def _open_study(self) -> optuna.Study:
        cfg = self.cfg
        sampler = sp.make_sampler(cfg.sampler, self.dists)
        pruner = sp.make_pruner(cfg.pruner)
        self.created = False
        try:
            study = optuna.create_study(
                study_name=cfg.study_name,
                storage=self.storage,
                sampler=sampler,
                pruner=pruner,
                direction=cfg.objective.direction,
            )
            self.created = True
            study.set_user_attr(
                "objective", {"metric": cfg.objective.metric, "mode": cfg.objective.mode}
            )
        except optuna.exceptions.DuplicatedStudyError:
            study = optuna.load_study(
                study_name=cfg.study_name, storage=self.storage, sampler=sampler, pruner=pruner
            )
            if study.direction.name.lower() != cfg.objective.direction:
                raise ConfigError(
                    f"study '{cfg.study_name}' in {redact(cfg.storage_spec)} "
                    f"{study.direction.name.lower()}s its objective, the sweep file says "
                    f"{cfg.objective.direction}: use another study_name"
                ) from None
            stored = study.user_attrs.get("objective", {}).get("metric")
            if stored not in (None, cfg.objective.metric):
                raise ConfigError(
                    f"study '{cfg.study_name}' optimises {stored}, the sweep file says "
                    f"{cfg.objective.metric}: use another study_name"
                ) from None
        return study

    def _parent_run(self) -> str | None:
        """One MLflow parent run per study. The worker that created the study creates it
        (``create_study`` is atomic in every storage); the others wait for its id."""
        if not self.created:
            for _ in range(120):
                if (run_id := self.study.user_attrs.get(PARENT_ATTR)) is not None:
                    self.tracking.call(
                        "reopen parent", self.tracking.client.update_run, run_id, "RUNNING"
                    )
                    return run_id
                if self.study.trials:  # an old study whose parent run was never recorded
                    break
                time.sleep(0.5)
                self.study = optuna.load_study(
                    study_name=self.cfg.study_name,
                    storage=self.storage,
                    sampler=self.study.sampler,
                    pruner=self.study.pruner,
                )
        cfg = self.cfg
        run_id = self.tracking.create_run(
            cfg.study_name,
            {
                "medlit.sweep.study": cfg.study_name,
                "medlit.sweep.role": "parent",
                "optuna.storage": redact(cfg.storage_spec),
                "medlit.sweep.file": cfg.source,
            },
        )
        if run_id is None:
            return None
        params = {
            "objective.metric": cfg.objective.metric,
            "objective.direction": cfg.objective.direction,
            "objective.mode": cfg.objective.mode,
            "sampler": cfg.sampler.name,
            "pruner": cfg.pruner.name,
            "experiment": str(cfg.experiment),
            **{f"search_space.{k}": str(d) for k, d in self.dists.items()},
        }
        for k, v in params.items():
            self.tracking.call(f"param {k}", self.tracking.client.log_param, run_id, k, v)
        self.study.set_user_attr(PARENT_ATTR, run_id)
        return run_id

    # ------------------------------------------------------------------ budget

    def _all(self) -> list[FrozenTrial]:
        return self.study.get_trials(deepcopy=False)

    @staticmethod
    def is_fresh(t: FrozenTrial) -> bool:
        """A trial that takes one slot of the n_trials budget (not a retry of a trial
        whose worker died, not a surplus trial)."""
        return RETRY_OF not in t.system_attrs and not t.system_attrs.get(SURPLUS)

    def _budget_left(self) -> bool:
        n = self.cfg.n_trials
        return n is None or sum(map(self.is_fresh, self._all())) < n

    def _attrs(self, trial: optuna.Trial) -> dict[str, Any]:
        return self.storage.get_trial_system_attrs(trial._trial_id)

    def _waiting(self) -> bool:
        return any(t.state == TrialState.WAITING for t in self._all())

    def _surplus(self, trial: optuna.Trial) -> bool:
        """Two workers may ask at once for the last slot: trial numbers are assigned
        atomically by the storage, so the one with the higher number gives way."""
        n = self.cfg.n_trials
        if n is None or RETRY_OF in self._attrs(trial):
            return False
        before = [t for t in self._all() if t.number < trial.number and self.is_fresh(t)]
        return len(before) >= n

    # ------------------------------------------------------------------ the loop

    def run(self) -> int:
        """Run trials until the budget (n_trials over the whole study, timeout for this
        worker) is spent; returns how many trials this worker ran."""
        deadline = None if self.cfg.timeout is None else time.monotonic() + self.cfg.timeout
        ran = 0
        with _signals_as_interrupt():
            while True:
                with _quiet_optuna():  # "heartbeat is supposed to be used with optimize"
                    fail_stale_trials(self.study)  # dead workers' trials -> failed + retried
                if deadline is not None and time.monotonic() > deadline:
                    log.info("timeout reached: no new trials from this worker")
                    break
                if not self._waiting() and not self._budget_left():
                    break
                with _quiet_optuna():
                    trial = sp.ask(self.study, self.cfg.sampler, self.dists)
                if self._surplus(trial):
                    self.storage.set_trial_system_attr(trial._trial_id, SURPLUS, True)
                    self.study.tell(trial, state=TrialState.FAIL)
                    break
                self._run_trial(trial)
                ran += 1
        self.finish()
        return ran

    def _run_trial(self, trial: optuna.Trial) -> None:
        cfg = self.cfg
        values = {k: sp.decode(trial.params[k], d) for k, d in self.dists.items()}
        overrides = [sp.to_cli(k, v) for k, v in values.items()]
        retry_of = self._attrs(trial).get(RETRY_OF)
        label = f"trial {trial.number}" + (
            f" (retry of {retry_of})" if retry_of is not None else ""
        )
        try:
            config, _ = resolve(cfg.base_args() + overrides)
        except ConfigError as e:
            self.study.tell(trial, state=TrialState.FAIL)
            raise SweepError(f"{label}: {e}") from e
        run_id = self.tracking.create_run(
            f"{cfg.study_name}-{trial.number:03d}",
            {
                "mlflow.parentRunId": self.parent_run_id or "",
                "medlit.sweep.study": cfg.study_name,
                "medlit.sweep.role": "trial",
                "optuna.trial": str(trial.number),
                "optuna.state": "RUNNING",
                "medlit.sweep.worker": f"{HOST}:{os.getpid()}",
                **({"optuna.retry_of": str(retry_of)} if retry_of is not None else {}),
            },
        )
        if run_id:
            trial.set_user_attr("mlflow_run_id", run_id)
            for k, v in values.items():
                self.tracking.call("param", self.tracking.client.log_param, run_id, f"sweep.{k}", v)
        cfg.out.mkdir(parents=True, exist_ok=True)
        log_path = cfg.out / f"trial-{trial.number:04d}.log"
        result_path = cfg.out / f".trial-{trial.number:04d}.json"
        result_path.unlink(missing_ok=True)
        max_epochs = (config.get("trainer") or {}).get("max_epochs")
        relay.started(label, values, log_path)
        ctx = {
            "storage": cfg.storage_spec,
            "study": cfg.study_name,
            "trial_id": trial._trial_id,
            "number": trial.number,
            "metric": cfg.objective.metric,
            "direction": cfg.objective.direction,
            "pruner": {"name": cfg.pruner.name, "kwargs": cfg.pruner.kwargs},
            "result_file": str(result_path.resolve()),
            "test": cfg.test_trials,
        }
        cmd = [sys.executable, "-m", "medlit.fit", *cfg.base_args(), *overrides]
        if run_id:
            cmd.append(f"--trainer.logger.init_args.run_id={run_id}")
        # Unbuffered: the epoch lines reach the log (and this terminal) as they are
        # printed, and the log's stdout and stderr lines stay in the order they happened.
        env = {**os.environ, ENV: json.dumps(ctx), "PYTHONUNBUFFERED": "1"}
        start = time.monotonic()
        with open(log_path, "wb") as out:
            proc = subprocess.Popen(
                cmd,
                stdout=out,
                stderr=subprocess.STDOUT,
                env=env,
                start_new_session=True,  # Ctrl-C reaches the worker, which stops the trial
                preexec_fn=die_with_parent,
            )
            try:
                with _quiet_optuna(), get_heartbeat_thread(trial._trial_id, self.storage):
                    rc = relay.follow(proc, log_path, f"trial {trial.number}")
            except KeyboardInterrupt:
                _stop(proc)
                self.study.tell(trial, state=TrialState.FAIL)
                self.tracking.end_trial_run(run_id, "FAIL", {"medlit.failure": "interrupted"})
                RetryFailedTrialCallback(cfg.max_retry)(self.study, self.study.trials[trial.number])
                raise
        seconds = time.monotonic() - start
        if run_id:
            self.tracking.call(
                "trial log", self.tracking.client.log_artifact, run_id, str(log_path)
            )
        result = json.loads(result_path.read_text()) if result_path.exists() else None
        result_path.unlink(missing_ok=True)
        if rc != 0 or result is None:
            tail = _tail(log_path)
            self.study.tell(trial, state=TrialState.FAIL)
            trial_tags = {"medlit.failure": f"exit status {rc}: {tail[-500:]}"}
            self.tracking.end_trial_run(run_id, "FAIL", trial_tags)
            relay.ended(label, "failed", seconds, f"exit status {rc}, log {log_path}")
            if rc == 2:  # medlit's own error (bad data, bad config): every trial would fail
                raise SweepError(f"{label} stopped with medlit's error (see {log_path}):\n{tail}")
            log.error("%s: its log ends\n%s", label, tail)
            return
        value = result[cfg.objective.mode]
        if result["pruned"]:
            self.study.tell(trial, state=TrialState.PRUNED)
            self.tracking.end_trial_run(run_id, "PRUNED", {})
            last = result["last"]
            detail = (
                f"{relay.epoch_of(result, last, max_epochs)}  {cfg.objective.metric} {last:.4f}"
                if last is not None
                else f"after {len(result['history'])} validations"
            )
            relay.ended(label, "pruned", seconds, detail)
            return
        if value is None:
            self.study.tell(trial, state=TrialState.FAIL)
            self.tracking.end_trial_run(
                run_id, "FAIL", {"medlit.failure": "no finite validation value"}
            )
            relay.ended(label, "failed", seconds, f"no finite {cfg.objective.metric} logged")
            return
        self.study.tell(trial, value)
        if run_id:
            self.tracking.call(
                "objective", self.tracking.client.log_metric, run_id, "objective", value
            )
        self.tracking.end_trial_run(run_id, "COMPLETE", {})
        where = relay.epoch_of(result, value, max_epochs)
        detail = f"{cfg.objective.metric} {value:.4f} ({cfg.objective.mode}, {where})"
        relay.ended(label, "complete", seconds, detail)

    def _on_stale_trial(self, study: optuna.Study, trial: FrozenTrial) -> None:
        """Optuna failed a trial whose worker is gone: retry it, and say so in MLflow."""
        owner = trial.system_attrs.get("medlit:owner") or {}
        who = f"pid {owner.get('pid')} on {owner.get('host')}" if owner else "unknown"
        log.warning(
            "trial %d: its worker (%s) stopped beating; failed, and retried with the same "
            "parameters",
            trial.number,
            who,
        )
        RetryFailedTrialCallback(self.cfg.max_retry)(study, trial)
        self.tracking.end_trial_run(
            trial.user_attrs.get("mlflow_run_id"),
            "FAIL",
            {"medlit.failure": f"worker died ({who})"},
        )

    # ------------------------------------------------------------------ results

    def finish(self) -> None:
        """Results table, the best trial's config, plots, and the parent run's summary."""
        study = self.study = optuna.load_study(study_name=self.cfg.study_name, storage=self.storage)
        print(results_table(study, self.cfg.objective.metric))
        done = [t for t in study.trials if t.state == TrialState.COMPLETE]
        rid = self.parent_run_id
        client = self.tracking.client
        if done:
            best = study.best_trial
            values = {k: sp.decode(best.params[k], d) for k, d in self.dists.items()}
            _, best_yaml = resolve(
                self.cfg.base_args() + [sp.to_cli(k, v) for k, v in values.items()]
            )
            best_path = self.cfg.out / "best_config.yaml"
            header = (
                f"# Best trial {best.number} of sweep '{self.cfg.study_name}': "
                f"{self.cfg.objective.metric} = {best.value:.6g}\n"
                f"# python -m medlit.fit {best_path}\n"
            )
            from medlit.datasets.io.files import atomic_write

            atomic_write(best_path, lambda p: p.write_text(header + best_yaml))
            print(f"best trial {best.number}: {self.cfg.objective.metric} = {best.value:.6g}")
            print(f"its full config: {best_path}  (python -m medlit.fit {best_path})")
            if rid:
                self.tracking.call("best", client.log_metric, rid, "best_value", best.value)
                self.tracking.call("tag", client.set_tag, rid, "best_trial", str(best.number))
                for k, v in values.items():
                    self.tracking.call("tag", client.set_tag, rid, f"best.{k}", str(v))
                self.tracking.call("best config", client.log_artifact, rid, str(best_path))
        if not rid:
            return
        counts = {
            s.name.lower(): 0 for s in (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL)
        }
        for t in study.trials:
            if t.state.name.lower() in counts and not t.system_attrs.get(SURPLUS):
                counts[t.state.name.lower()] += 1
        for k, v in counts.items():
            self.tracking.call("count", client.log_metric, rid, f"n_{k}", v)
        self._log_plots(rid)
        active = [t for t in study.trials if t.state in (TrialState.RUNNING, TrialState.WAITING)]
        if not active and (self.cfg.n_trials is None or not self._budget_left()):
            self.tracking.call("end parent", client.set_terminated, rid, "FINISHED")

    def _log_plots(self, run_id: str) -> None:
        import tempfile

        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from optuna.visualization import matplotlib as ovm

        study = self.study
        complete = len(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)))
        with tempfile.TemporaryDirectory() as tmp:
            table = study.trials_dataframe()
            table.to_csv(Path(tmp) / "trials.csv", index=False)
            metric = self.cfg.objective.metric
            plots = {
                "optimization_history.png": partial(
                    ovm.plot_optimization_history, target_name=metric
                ),
                "param_importances.png": partial(ovm.plot_param_importances, target_name=metric),
                "intermediate_values.png": ovm.plot_intermediate_values,
            }
            if complete < MIN_TRIALS_FOR_IMPORTANCE:
                del plots["param_importances.png"]
                print(
                    f"parameter importance needs at least {MIN_TRIALS_FOR_IMPORTANCE} "
                    f"completed trials; this study has {complete}"
                )
            for name, plot in plots.items():
                try:
                    with _quiet_optuna():
                        ax = plot(study)
                    fig = (ax.flat[0] if hasattr(ax, "flat") else ax).get_figure()
                    fig.set_size_inches(8, 5)
                    fig.tight_layout()
                    fig.savefig(Path(tmp) / name, dpi=100)
                    plt.close(fig)
                except (ValueError, RuntimeError, ZeroDivisionError) as e:
                    # e.g. importances need two complete trials that differ
                    log.info("%s not drawn yet: %s", name, e)
            self.tracking.call("sweep artifacts", self.tracking.client.log_artifacts, run_id, tmp)


@contextlib.contextmanager
def _quiet_optuna() -> Iterator[None]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "ExperimentalWarning: plot_... is experimental"
        yield


def results_table(study: optuna.Study, metric: str) -> str:
    trials = [t for t in study.trials if not t.system_attrs.get(SURPLUS)]
    best = None
    with contextlib.suppress(ValueError):
        best = study.best_trial.number
    keys = sorted({k for t in trials for k in t.params})
    rows = []
    for t in trials:
        retry = t.system_attrs.get(RETRY_OF)
        dur = t.duration.total_seconds() if t.duration else None
        value = (
            t.value
            if t.value is not None
            else (
                t.intermediate_values[max(t.intermediate_values)] if t.intermediate_values else None
            )
        )
        rows.append(
            [
                f"{t.number}{'*' if t.number == best else ''}",
                t.state.name,
                "" if value is None else f"{value:.5g}",
                "" if dur is None else f"{dur:.0f}",
                "" if retry is None else str(retry),
                *(relay.short(t.params.get(k)) for k in keys),
            ]
        )
    head = ["trial", "state", metric, "seconds", "retry_of", *keys]
    widths = [
        max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(head)
    ]
    lines = [
        f"\nStudy '{study.study_name}': {len(trials)} trials (* best)",
        "  ".join(h.ljust(w) for h, w in zip(head, widths, strict=True)),
        "  ".join("-" * w for w in widths),
    ]
    lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) for r in rows]
    return "\n".join(lines)


def _probes(dists: dict[str, optuna.distributions.BaseDistribution]) -> list[dict[str, Any]]:
    """Search-space points that together reach every key's low and high end and each of
    its choices (as few parses as the longest list of those)."""
    ends = {
        k: list(d.choices)
        if isinstance(d, optuna.distributions.CategoricalDistribution)
        else [d.low, d.high]
        for k, d in dists.items()
    }
    return [
        {k: values[min(i, len(values) - 1)] for k, values in ends.items()}
        for i in range(max(len(v) for v in ends.values()))
    ]


def _stop(proc: subprocess.Popen) -> None:
    """SIGTERM to the trial's process group (every DDP rank), SIGKILL after 30 s."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def _tail(path: Path, lines: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""
