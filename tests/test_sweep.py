"""``python -m medlit.sweep``: search spaces, real worker processes on a shared Optuna
storage (journal file and PostgreSQL), a worker killed mid-trial, pruning, resuming, the
best config, and the study as the MLflow UI renders it in headless Chromium."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
import warnings
from pathlib import Path
from typing import Any

import mlflow
import optuna
import pytest
import yaml
from optuna.trial import TrialState

from medlit.errors import ConfigError
from medlit.sweep import load
from medlit.tuning import space as sp
from medlit.tuning.storage import JournalHeartbeatStorage, make_storage, redact
from medlit.tuning.worker import RETRY_OF, SURPLUS, resolve
from tests.helpers.shared import once

REPO = Path(__file__).resolve().parents[1]
DEMO = REPO / "experiments/demo/brats_unet.yaml"
ARTIFACTS = Path(os.environ.get("MEDLIT_TEST_ARTIFACTS", REPO / "test-artifacts"))
REQUIRE_SERVICES = os.environ.get("MEDLIT_REQUIRE_SERVICES") == "1"
POSTGRES = os.environ.get(
    "MEDLIT_TEST_POSTGRES", "postgresql://medlit:medlit@127.0.0.1:5432/medlit_test"
)
MAX_EPOCHS = 2


def write_sweep(
    tmp_path: Path,
    root: Path,
    tracking_uri: str,
    name: str = "tiny",
    overrides: dict[str, Any] | None = None,
    **keys: Any,
) -> Path:
    """A sweep over the demo BraTS experiment shrunk to seconds per trial (tiny encoder,
    32 px, 2 epochs), with its storage, logs and runs under ``tmp_path``; ``overrides``
    are added to the fixed ones, ``keys`` replace top-level keys of the sweep file."""
    doc = {
        "experiment": str(DEMO),
        "overrides": {
            "trainer.max_epochs": MAX_EPOCHS,
            "trainer.default_root_dir": str(tmp_path),
            "trainer.enable_progress_bar": False,
            "trainer.enable_model_summary": False,
            "trainer.logger.init_args.tracking_uri": tracking_uri,
            "trainer.logger.init_args.experiment_name": "sweep-test",
            "data.root": str(root),
            "data.demo": False,
            "data.patch_size": 32,
            "data.loader.batch_size": 4,
            "data.samples_per_epoch": 8,
            "data.loader.num_workers": 0,
            "data.split.val_fraction": 0.25,
            "data.split.test_fraction": 0.25,
            "model.encoder": "tu-test_resnet",
            "model.model_kwargs": {"decoder_channels": [32, 16, 16, 8, 8]},
            "model.inference_batch_size": 8,
            **(overrides or {}),
        },
        "objective": {"metric": "val/dice_mean", "direction": "maximize"},
        "search_space": {
            "model.lr": {"type": "float", "low": 1e-4, "high": 1e-1, "log": True},
            "model.loss": {"type": "categorical", "choices": ["dice_ce", "dice"]},
        },
        "n_trials": 3,
        "sampler": {"name": "tpe", "seed": 0},
        "pruner": {"name": "none"},
        "storage": str(tmp_path / "optuna" / f"{name}.journal"),
        "output_dir": str(tmp_path / "sweeps" / name),
    }
    doc.update(keys)
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


LOGS: dict[int, Path] = {}


def start_worker(sweep: Path, *args: str) -> subprocess.Popen:
    """A worker process, as a user starts one in a terminal; output to a log file."""
    log = sweep.with_suffix(f".worker-{uuid.uuid4().hex[:6]}.log")
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "medlit.sweep", str(sweep), *args],
            cwd=sweep.parent,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    LOGS[proc.pid] = log
    return proc


def finish(proc: subprocess.Popen, timeout: float = 600) -> str:
    proc.wait(timeout=timeout)
    return LOGS[proc.pid].read_text()


def run_sweep(sweep: Path, *args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "medlit.sweep", str(sweep), *args],
        cwd=sweep.parent,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def study_of(sweep: Path) -> optuna.Study:
    doc = yaml.safe_load(sweep.read_text())
    return optuna.load_study(study_name=sweep.stem, storage=make_storage(doc["storage"]))


def runs_of(tracking_uri: str) -> tuple[mlflow.entities.Run, list[mlflow.entities.Run]]:
    client = mlflow.MlflowClient(tracking_uri)
    exp = client.get_experiment_by_name("sweep-test")
    runs = client.search_runs([exp.experiment_id], max_results=1000)
    parents = [r for r in runs if r.data.tags.get("medlit.sweep.role") == "parent"]
    assert len(parents) == 1, [r.info.run_name for r in parents]
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parents[0].info.run_id]
    return parents[0], children


def validations(tracking_uri: str, run_id: str) -> int:
    """How many validations of a run reached MLflow (one val/dice_mean per epoch, at
    distinct global steps)."""
    history = mlflow.MlflowClient(tracking_uri).get_metric_history(run_id, "val/dice_mean")
    assert len({m.step for m in history}) == len(history)
    return len(history)


def worker_pids(children: list[mlflow.entities.Run]) -> set[str]:
    return {r.data.tags["medlit.sweep.worker"] for r in children}


# ----------------------------------------------------------------------- search spaces


def test_search_space_errors_name_the_key() -> None:
    bad = {
        "a": sp.Param("float", low=1.0, high=0.5),
        "b": sp.Param("float", low=0.0, high=1.0, log=True),
        "c": sp.Param("float", low=1e-4, high=1.0, log=True, step=0.1),
        "d": sp.Param("int", low=1, high=8.5),
        "e": sp.Param("categorical"),
        "f": sp.Param("categorical", choices=[1, 1]),
        "g": sp.Param("float", high=1.0),
    }
    messages = {
        "a": "low=1.0 must be below high=0.5",
        "b": "log scale needs low > 0",
        "c": "'log' and 'step' exclude each other",
        "d": "high=8.5 is not an integer",
        "e": "non-empty 'choices'",
        "f": "repeat a value",
        "g": "needs 'low' and 'high'",
    }
    for key, param in bad.items():
        with pytest.raises(ConfigError, match=messages[key]) as e:
            sp.distribution(key, param)
        assert f"search_space.{key}" in str(e.value)


def test_any_yaml_value_can_be_a_choice_and_reaches_the_config_unchanged() -> None:
    channels = [[32, 16, 16, 8, 8], [64, 32, 16, 8, 8]]
    dist = sp.distribution("model.model_kwargs", sp.Param("categorical", choices=channels))
    assert all(isinstance(c, str) for c in dist.choices)  # Optuna stores scalars only
    decoded = [sp.decode(c, dist) for c in dist.choices]
    assert decoded == channels
    assert sp.to_cli("model.x", decoded[0]) == "--model.x=[32, 16, 16, 8, 8]"
    assert sp.to_cli("model.lr", 0.001) == "--model.lr=0.001"
    assert sp.to_cli("data.demo", False) == "--data.demo=false"
    plain = sp.distribution("k", sp.Param("categorical", choices=["dice", "dice_ce"]))
    assert [sp.decode(c, plain) for c in plain.choices] == ["dice", "dice_ce"]


def test_grid_covers_every_step_and_choice() -> None:
    space = sp.distributions(
        {
            "a": sp.Param("int", low=8, high=32, step=8),
            "b": sp.Param("float", low=0.1, high=0.3, step=0.1),
            "c": sp.Param("categorical", choices=["x", "y"]),
        }
    )
    assert sp.grid(space) == {"a": [8, 16, 24, 32], "b": [0.1, 0.2, 0.3], "c": ["x", "y"]}
    assert sp.grid_size(space) == 24
    with pytest.raises(ConfigError, match="grid sampler needs choices or a step"):
        sp.grid(sp.distributions({"lr": sp.Param("float", low=1e-4, high=1e-2, log=True)}))
    for name in ("tpe", "random", "cmaes", "grid"):
        sampler = sp.make_sampler(sp.SamplerConfig(name=name, seed=3), space, offset=1)
        assert sampler is not None
    assert isinstance(sp.make_pruner(sp.PrunerConfig("hyperband")), optuna.pruners.HyperbandPruner)
    with pytest.raises(ConfigError, match="pruner.kwargs for 'median'"):
        sp.make_pruner(sp.PrunerConfig("median", {"n_startup": 3}))


def test_a_grid_sweep_asks_and_tells_its_whole_grid() -> None:
    """The workers' ask-and-tell loop over a whole grid visits every point once. Optuna's
    grid sampler stopped the study after the last point, which raises outside
    study.optimize (the last tell failed, the trial stayed RUNNING, the worker crashed);
    and the grid was reshuffled for every trial, so points repeated and others were
    never run."""
    space = sp.distributions(
        {"a": sp.Param("int", low=1, high=3), "b": sp.Param("categorical", choices=["x", "y"])}
    )
    cfg = sp.SamplerConfig(name="grid", seed=0)
    study = optuna.create_study(sampler=sp.make_sampler(cfg, space))
    for _ in range(sp.grid_size(space)):
        trial = sp.ask(study, cfg, space)
        study.tell(trial, float(trial.params["a"]))
    trials = study.get_trials()
    assert all(t.state == optuna.trial.TrialState.COMPLETE for t in trials)
    assert sorted((t.params["a"], t.params["b"]) for t in trials) == [
        (a, b) for a in (1, 2, 3) for b in ("x", "y")
    ]


@pytest.mark.parametrize("name", ["tpe", "random", "cmaes"])
def test_workers_with_the_same_seed_draw_different_reproducible_values(name: str) -> None:
    """Two workers started with the same command (same sampler seed) used to draw the
    same values; each trial's draw is seeded with its trial number instead."""
    space = sp.distributions(
        {
            "lr": sp.Param("float", low=1e-4, high=1e-1, log=True),
            "depth": sp.Param("int", low=2, high=6),
            "loss": sp.Param("categorical", choices=["dice", "dice_ce"]),
        }
    )
    cfg = sp.SamplerConfig(name=name, seed=0)

    def draw() -> list[dict[str, Any]]:
        storage = optuna.storages.InMemoryStorage()
        optuna.create_study(study_name="s", storage=storage)
        a, b = (  # two workers of one study
            optuna.load_study(study_name="s", storage=storage, sampler=sp.make_sampler(cfg, space))
            for _ in range(2)
        )
        out = []
        for study in (a, b, a, b):
            trial = sp.ask(study, cfg, space)
            study.tell(trial, trial.params["lr"])
            out.append(trial.params)
        return out

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Optuna's experimental-feature notices
        first, again = draw(), draw()
    assert len({p["lr"] for p in first}) == 4, first
    assert first == again  # a seeded sweep stays reproducible


def test_sweep_file_flags_win_and_paths_are_relative_to_the_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "sub").mkdir()
    monkeypatch.chdir(tmp_path)
    sweep = tmp_path / "sub" / "s.yaml"
    sweep.write_text(
        yaml.safe_dump(
            {
                "experiment": os.path.relpath(DEMO, sweep.parent),
                "objective": {"metric": "val/dice_mean"},
                "search_space": {"model.lr": {"type": "float", "low": 1e-4, "high": 1e-2}},
                "n_trials": 5,
            }
        )
    )
    cfg, workers = load([str(sweep), "--n-trials", "7", "--storage=/x/y.journal", "--workers=3"])
    assert cfg.experiment == DEMO
    assert (cfg.n_trials, cfg.storage, cfg.study_name, workers) == (7, "/x/y.journal", "s", 3)
    assert cfg.objective.direction == "maximize" and cfg.objective.mode == "best"


def test_unknown_sweep_keys_and_config_keys_fail_at_start(tmp_path: Path, brats_root: Path) -> None:
    sweep = write_sweep(tmp_path, brats_root, "sqlite:///x.db", n_trial=3)
    bad = run_sweep(sweep)
    assert bad.returncode != 0 and "n_trial" in bad.stderr
    sweep = write_sweep(
        tmp_path,
        brats_root,
        f"sqlite:///{tmp_path}/mlflow.db",
        search_space={"model.lrr": {"type": "float", "low": 1e-4, "high": 1e-2}},
    )
    bad = run_sweep(sweep)
    assert bad.returncode == 2, bad.stderr
    assert "model.lrr" in bad.stderr
    assert not (tmp_path / "optuna").exists()  # nothing created before the config parses


def test_storage_urls_are_redacted() -> None:
    assert redact("postgresql://u:secret@db:5432/x") == "postgresql://u:***@db:5432/x"
    assert redact("/a/b.journal") == "/a/b.journal"


def test_journal_storage_fails_a_dead_workers_trial_and_only_once(tmp_path: Path) -> None:
    """The journal heartbeat: a running trial whose owner process is gone is stale at
    once; a live owner's is not; two workers failing it at once give one retry."""
    retries: list[int] = []

    def retry(study: optuna.Study, t: optuna.trial.FrozenTrial) -> None:
        retries.append(t.number)
        optuna.storages.RetryFailedTrialCallback()(study, t)

    path = tmp_path / "s.journal"
    storage = JournalHeartbeatStorage(path, stale_trial_callback=retry)
    study = optuna.create_study(study_name="s", storage=storage)
    mine = study.ask()
    storage.record_heartbeat(mine._trial_id)
    gone = study.ask()
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    record = {"trial_id": gone._trial_id, "host": socket.gethostname(), "pid": dead.pid}
    storage.set_trial_system_attr(gone._trial_id, "medlit:owner", {**record, "time": time.time()})
    other = JournalHeartbeatStorage(path, stale_trial_callback=retry)  # a second worker
    assert storage._get_stale_trial_ids(study._study_id) == [gone._trial_id]
    with warnings_ignored():
        optuna.storages.fail_stale_trials(study)
        optuna.storages.fail_stale_trials(optuna.load_study(study_name="s", storage=other))
    states = {t.number: t.state for t in study.trials}
    assert states[mine.number] == TrialState.RUNNING
    assert states[gone.number] == TrialState.FAIL
    assert retries == [gone.number]
    waiting = [t for t in study.trials if t.state == TrialState.WAITING]
    assert [t.system_attrs[RETRY_OF] for t in waiting] == [gone.number]


@contextlib.contextmanager
def warnings_ignored():
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


# ----------------------------------------------------------------------- whole sweeps


@pytest.mark.slow
def test_sweep_records_trials_resumes_and_writes_a_runnable_best_config(
    tmp_path: Path, brats_root: Path, tracking_uri: str
) -> None:
    sweep = write_sweep(tmp_path, brats_root, tracking_uri, n_trials=2)
    done = run_sweep(sweep)
    assert done.returncode == 0, done.stderr[-3000:]
    study = study_of(sweep)
    assert [t.state for t in study.trials] == [TrialState.COMPLETE] * 2
    # The table: every trial, its state, value and parameters.
    assert "Study 'tiny': 2 trials" in done.stdout
    for t in study.trials:
        assert f"{t.value:.5g}" in done.stdout
    # As it ran, each trial said where its log is, its values, each epoch and its end.
    out = done.stdout.splitlines()
    for t in study.trials:
        log = tmp_path / "sweeps" / "tiny" / f"trial-{t.number:04d}.log"
        assert f"trial {t.number} started, log {log}" in out
        assert f"trial {t.number}  model.lr {t.params['model.lr']:.4g}  model.loss" in done.stdout
        epochs = [ln for ln in log.read_text().splitlines() if ln.startswith("epoch ")]
        relayed = [ln for ln in out if ln.startswith(f"trial {t.number}  epoch ")]
        assert len(epochs) == MAX_EPOCHS  # medlit.progress's line, one per validation
        assert relayed == [f"trial {t.number}  {ln}" for ln in epochs]
        best_epoch = max(t.intermediate_values, key=t.intermediate_values.get) + 1
        assert (
            f"trial {t.number} complete  val/dice_mean {t.value:.4f} "
            f"(best, epoch {best_epoch}/{MAX_EPOCHS})"
        ) in done.stdout
    assert "parameter importance needs at least 10 completed trials; this study has 2" in out

    parent, children = runs_of(tracking_uri)
    assert parent.info.status == "FINISHED"
    assert parent.data.metrics["best_value"] == pytest.approx(study.best_value)
    assert parent.data.tags["best_trial"] == str(study.best_trial.number)
    assert parent.data.tags["best.model.loss"] == study.best_params["model.loss"]
    assert parent.data.params["objective.metric"] == "val/dice_mean"
    client = mlflow.MlflowClient(tracking_uri)
    artifacts = {a.path for a in client.list_artifacts(parent.info.run_id)}
    assert {"best_config.yaml", "trials.csv", "optimization_history.png"} <= artifacts
    assert "param_importances.png" not in artifacts  # 2 trials: noise, not importance
    by_trial = {int(r.data.tags["optuna.trial"]): r for r in children}
    assert sorted(by_trial) == [0, 1]
    for t in study.trials:
        run = by_trial[t.number]
        assert run.info.status == "FINISHED" and run.data.tags["optuna.state"] == "COMPLETE"
        assert run.data.metrics["objective"] == pytest.approx(t.value)
        assert float(run.data.params["sweep.model.lr"]) == pytest.approx(t.params["model.lr"])
        assert float(run.data.params["model.init_args.lr"]) == pytest.approx(t.params["model.lr"])
        assert validations(tracking_uri, run.info.run_id) == MAX_EPOCHS
        assert t.value == pytest.approx(
            max(m.value for m in client.get_metric_history(run.info.run_id, "val/dice_mean"))
        )

    # Re-running the same command resumes: nothing left to do, no trial added...
    again = run_sweep(sweep)
    assert again.returncode == 0, again.stderr[-3000:]
    assert len(study_of(sweep).trials) == 2
    # ...and a larger budget adds exactly the difference, under the same parent run.
    more = run_sweep(sweep, "--n-trials", "3")
    assert more.returncode == 0, more.stderr[-3000:]
    assert [t.state for t in study_of(sweep).trials] == [TrialState.COMPLETE] * 3
    parent2, children = runs_of(tracking_uri)
    assert parent2.info.run_id == parent.info.run_id and len(children) == 3

    # The best trial's config runs unchanged with medlit.fit and reproduces its value.
    best = tmp_path / "sweeps" / "tiny" / "best_config.yaml"
    study = study_of(sweep)
    assert f"trial {study.best_trial.number}" in best.read_text().splitlines()[0]
    cfg = yaml.safe_load(best.read_text())
    assert cfg["model"]["init_args"]["lr"] == pytest.approx(study.best_params["model.lr"])
    fit = subprocess.run(
        [sys.executable, "-m", "medlit.fit", str(best)],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert fit.returncode == 0, fit.stderr[-3000:]
    client = mlflow.MlflowClient(tracking_uri)
    rerun = [
        r
        for r in client.search_runs([parent.info.experiment_id])
        if "medlit.sweep.role" not in r.data.tags
    ]
    assert len(rerun) == 1
    history = client.get_metric_history(rerun[0].info.run_id, "val/dice_mean")
    assert max(m.value for m in history) == pytest.approx(study.best_value, abs=1e-6)


@pytest.mark.slow
def test_pruned_trials_stop_early_and_are_marked_pruned(
    tmp_path: Path, brats_root: Path, tracking_uri: str
) -> None:
    # A threshold no Dice reaches: every trial is pruned at its first validation.
    sweep = write_sweep(
        tmp_path,
        brats_root,
        tracking_uri,
        overrides={"trainer.max_epochs": 4},
        n_trials=2,
        pruner={"name": "threshold", "kwargs": {"lower": 2.0}},
    )
    done = run_sweep(sweep)
    assert done.returncode == 0, done.stderr[-3000:]
    study = study_of(sweep)
    assert [t.state for t in study.trials] == [TrialState.PRUNED] * 2
    assert all(list(t.intermediate_values) == [0] for t in study.trials)
    _, children = runs_of(tracking_uri)
    for run in children:
        assert run.data.tags["optuna.state"] == "PRUNED" and run.info.status == "KILLED"
        assert validations(tracking_uri, run.info.run_id) == 1  # stopped after epoch 0
    assert "PRUNED" in done.stdout


@pytest.mark.slow
def test_a_ddp_trial_reports_from_rank_zero_and_every_rank_stops_when_pruned(
    tmp_path: Path, brats_root: Path, tracking_uri: str
) -> None:
    """A trial on 2 CPU processes (gloo): rank 0 alone reports to the storage, its pruning
    decision reaches rank 1 (which would otherwise train on and hang the run)."""
    sweep = write_sweep(
        tmp_path,
        brats_root,
        tracking_uri,
        overrides={
            "trainer.max_epochs": 3,
            "trainer.accelerator": "cpu",
            "trainer.devices": 2,
            "trainer.strategy": "ddp",
        },
        n_trials=1,
        pruner={"name": "threshold", "kwargs": {"lower": 2.0}},
    )
    done = run_sweep(sweep, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    [trial] = study_of(sweep).trials
    assert trial.state == TrialState.PRUNED
    assert list(trial.intermediate_values) == [0]  # one report per epoch, not one per rank
    _, [run] = runs_of(tracking_uri)
    assert validations(tracking_uri, run.info.run_id) == 1
    log = (tmp_path / "sweeps" / "tiny" / "trial-0000.log").read_text()
    assert "MEMBER: 2/2" in log  # rank 1 ran, and stopped with rank 0


def create_database(folder: Path) -> dict[str, str | None]:
    """A fresh database on the PostgreSQL server that ``.ci/run`` starts (for ``once``);
    its URL is None where no server runs and CI's ``MEDLIT_REQUIRE_SERVICES`` is unset."""
    psycopg = required_module("psycopg")
    try:
        admin = psycopg.connect(POSTGRES, connect_timeout=5, autocommit=True)
    except psycopg.OperationalError as e:
        if REQUIRE_SERVICES:
            pytest.fail(f"PostgreSQL at {redact(POSTGRES)} is required here: {e}")
        return {"url": None}
    name = f"medlit_sweep_{uuid.uuid4().hex[:8]}"
    with admin, admin.cursor() as cur:
        cur.execute(f"CREATE DATABASE {name}")
    return {"url": POSTGRES.rsplit("/", 1)[0] + "/" + name, "admin": POSTGRES, "name": name}


@pytest.fixture(scope="session")
def postgres_url(tmp_path_factory: pytest.TempPathFactory) -> str | None:
    """One database per session, shared by the xdist workers; conftest's
    ``pytest_sessionfinish`` drops it once every worker is done."""
    return once(tmp_path_factory, "postgres", create_database)["url"]


PAIR_TRIALS = 4  # of the two-worker sweep: more than one each, whoever is faster


@pytest.fixture(scope="session")
def two_worker_sweep(
    tmp_path_factory: pytest.TempPathFactory, shared_store: str, postgres_url: str | None
) -> dict[str, Any]:
    """Two worker processes started together on one storage, PostgreSQL where it runs
    (else a journal file; two workers on a journal file also share the killed-worker
    test's study), and one SQLite tracking store (the session's shared one, which
    ``mlflow_ui`` serves): PAIR_TRIALS trials between them, run once per session for its three
    tests (across xdist workers too)."""
    from tests.data.brats.data import make_brats

    def build(tmp: Path) -> dict[str, Any]:
        root = tmp / "BraTS2021"
        make_brats(root, "2021", cases=8, seed=3)
        storage = {"storage": postgres_url} if postgres_url else {}
        sweep = write_sweep(tmp, root, shared_store, name="pair", n_trials=PAIR_TRIALS, **storage)
        # The same command twice, as the README says to add a worker by hand.
        workers = [start_worker(sweep) for _ in range(2)]
        logs = [finish(w) for w in workers]
        return {"sweep": str(sweep), "codes": [w.returncode for w in workers], "logs": logs}

    done = once(tmp_path_factory, "two_worker_sweep", build)
    return {**done, "sweep": Path(done["sweep"]), "uri": shared_store}


@pytest.mark.slow
def test_two_workers_share_the_trials_without_losing_or_repeating_one(
    two_worker_sweep: dict[str, Any],
) -> None:
    assert two_worker_sweep["codes"] == [0, 0], two_worker_sweep["logs"]
    study = study_of(two_worker_sweep["sweep"])
    trials = [t for t in study.trials if not t.system_attrs.get(SURPLUS)]
    assert [t.number for t in trials] == list(range(PAIR_TRIALS))
    assert all(t.state == TrialState.COMPLETE for t in trials)
    # Same command, same sampler seed: still no two trials with the same values.
    assert len({t.params["model.lr"] for t in trials}) == PAIR_TRIALS
    uri = two_worker_sweep["uri"]
    _, children = runs_of(uri)
    by_trial = sorted(int(r.data.tags["optuna.trial"]) for r in children)
    assert by_trial == list(range(PAIR_TRIALS))  # one MLflow run per trial: none lost, none twice
    assert len(worker_pids(children)) == 2  # both workers ran trials
    for run in children:  # every epoch of every trial reached the shared SQLite store
        assert validations(uri, run.info.run_id) == MAX_EPOCHS
        assert run.info.status == "FINISHED"
    # Each worker's lines say their trial: between them, every trial started and ended once.
    said = [ln for log in two_worker_sweep["logs"] for ln in log.splitlines()]
    for t in trials:
        assert sum(ln.startswith(f"trial {t.number} started, log ") for ln in said) == 1
        assert sum(ln.startswith(f"trial {t.number} complete  ") for ln in said) == 1
    trial_logs = (two_worker_sweep["sweep"].parent / "sweeps" / "pair").glob("trial-*.log")
    for log in [*two_worker_sweep["logs"], *(p.read_text() for p in trial_logs)]:
        assert "dropped" not in log  # no tracking call gave up


@pytest.mark.slow
def test_mlflow_ui_shows_the_study_and_its_trials(
    two_worker_sweep: dict[str, Any], mlflow_ui: str
) -> None:
    """The MLflow UI, in headless Chromium: the parent run, expanded, shows every trial."""
    from tests.helpers.browser import page

    uri = two_worker_sweep["uri"]
    parent, children = runs_of(uri)
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    shot = ARTIFACTS / "mlflow_ui_sweep.png"
    with page() as tab:
        tab.goto(f"{mlflow_ui}/#/experiments/{parent.info.experiment_id}/runs")
        tab.get_by_text(parent.info.run_name, exact=True).wait_for(timeout=60_000)
        expand = tab.locator("[role=row] button").filter(has_not_text="Pin")
        for i in range(expand.count()):
            if not expand.nth(i).get_attribute("aria-label"):
                expand.nth(i).click()  # the parent run's "+" (show child runs)
                break
        for run in children:
            tab.get_by_text(run.info.run_name, exact=True).wait_for(timeout=30_000)
        rows = tab.get_by_role("row").all_inner_texts()
        tab.screenshot(path=str(shot))
    text = "\n".join(rows)
    assert parent.info.run_name in text
    for run in children:
        assert run.info.run_name in text
    assert shot.stat().st_size > 10_000


@pytest.mark.slow
def test_a_killed_worker_s_trial_fails_is_retried_and_the_study_completes(
    tmp_path: Path, brats_root: Path, tracking_uri: str
) -> None:
    sweep = write_sweep(
        tmp_path,
        brats_root,
        tracking_uri,
        name="kill",
        overrides={"trainer.max_epochs": 3},  # long enough to be killed mid-trial
        n_trials=3,
    )
    doc = yaml.safe_load(sweep.read_text())
    victim = start_worker(sweep, "--worker_index=0")
    survivor = start_worker(sweep, "--worker_index=1")
    storage = make_storage(doc["storage"])
    killed_trial = None
    deadline = time.monotonic() + 300
    while killed_trial is None and time.monotonic() < deadline:
        time.sleep(0.5)
        with contextlib.suppress(KeyError, ValueError):
            study = optuna.load_study(study_name="kill", storage=storage)
            for t in study.get_trials(states=(TrialState.RUNNING,)):
                owner = t.system_attrs.get("medlit:owner") or {}
                if owner.get("pid") == victim.pid and t.intermediate_values:
                    killed_trial = t  # mid-trial: it has reported an epoch already
    assert killed_trial is not None, "the victim never got a trial running"
    trainer_pids = trial_processes(killed_trial._trial_id)
    assert trainer_pids, "the trial's training process was not found"
    victim.send_signal(signal.SIGKILL)
    victim.wait(timeout=30)
    time.sleep(2)
    assert not any(alive(p) for p in trainer_pids), "the dead worker's trial kept training"
    log = finish(survivor)
    assert survivor.returncode == 0, log

    study = study_of(sweep)
    failed = [t for t in study.trials if t.state == TrialState.FAIL]
    assert [t.number for t in failed] == [killed_trial.number]  # only the dead worker's
    retries = [t for t in study.trials if t.system_attrs.get(RETRY_OF) == killed_trial.number]
    assert len(retries) == 1 and retries[0].state == TrialState.COMPLETE
    assert retries[0].params == killed_trial.params
    complete = [t for t in study.trials if t.state == TrialState.COMPLETE]
    assert len(complete) == 3
    assert f"trial {killed_trial.number}: its worker" in log
    _, children = runs_of(tracking_uri)
    by_trial = {int(r.data.tags["optuna.trial"]): r for r in children}
    dead_run = by_trial[killed_trial.number]
    assert dead_run.info.status == "FAILED"
    assert "worker died" in dead_run.data.tags["medlit.failure"]
    assert by_trial[retries[0].number].data.tags["optuna.retry_of"] == str(killed_trial.number)
    assert sum(r.data.tags["optuna.state"] == "COMPLETE" for r in children) == 3


@pytest.mark.slow
def test_two_workers_on_a_postgresql_storage(
    two_worker_sweep: dict[str, Any], postgres_url: str | None
) -> None:
    """The shared sweep ran on PostgreSQL (the multi-host storage), its URL redacted."""
    if postgres_url is None:
        pytest.skip(f"no PostgreSQL at {redact(POSTGRES)}; .ci/run starts one")
    assert yaml.safe_load(two_worker_sweep["sweep"].read_text())["storage"] == postgres_url
    study = optuna.load_study(study_name="pair", storage=postgres_url)
    trials = [t for t in study.trials if not t.system_attrs.get(SURPLUS)]
    assert [t.number for t in trials] == list(range(PAIR_TRIALS))
    assert all(t.state == TrialState.COMPLETE for t in trials)
    parent, _ = runs_of(two_worker_sweep["uri"])
    assert parent.data.tags["optuna.storage"].startswith("postgresql://medlit:***@")


@pytest.mark.slow
def test_a_metric_the_task_does_not_log_stops_the_sweep_with_its_name(
    tmp_path: Path, brats_root: Path, tracking_uri: str
) -> None:
    sweep = write_sweep(
        tmp_path, brats_root, tracking_uri, objective={"metric": "val/dise_mean"}, n_trials=3
    )
    done = run_sweep(sweep)
    assert done.returncode == 2
    assert "'val/dise_mean' is not logged" in done.stderr and "val/dice_mean" in done.stderr
    assert [t.state for t in study_of(sweep).trials] == [TrialState.FAIL]  # not 3 failures


def test_epoch_lines_are_relayed_with_their_trial_while_the_trial_runs(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The worker's relay of a trial's log: a real process writes an epoch line, waits
    until the test has seen it on the worker's stdout, then ends on an unfinished line."""
    import threading

    from medlit.tuning.relay import follow

    go, log = tmp_path / "go", tmp_path / "trial.log"
    script = (
        "import pathlib, sys, time\n"
        "print('epoch 1/2  val/dice_mean 0.1000  best 0.1000 (epoch 1)  1.0 s', flush=True)\n"
        "print('a warning, not relayed', file=sys.stderr, flush=True)\n"
        f"while not pathlib.Path({str(go)!r}).exists(): time.sleep(0.05)\n"
        "sys.stdout.write('epoch 2/2  val/dice_mean 0.2000  best 0.2000 (epoch 2)  1.0 s')\n"
    )
    with open(log, "wb") as out:
        proc = subprocess.Popen([sys.executable, "-c", script], stdout=out, stderr=out)
    codes: list[int] = []
    relay = threading.Thread(target=lambda: codes.append(follow(proc, log, "trial 7", 0.05)))
    relay.start()
    seen = ""
    deadline = time.monotonic() + 30
    while "trial 7  epoch 1/2" not in seen and time.monotonic() < deadline:
        time.sleep(0.05)
        seen += capsys.readouterr().out
    assert proc.poll() is None, "the line came only after the trial ended"
    go.touch()
    relay.join(timeout=30)
    seen += capsys.readouterr().out
    assert codes == [0]
    assert seen.splitlines() == [
        "trial 7  epoch 1/2  val/dice_mean 0.1000  best 0.1000 (epoch 1)  1.0 s",
        "trial 7  epoch 2/2  val/dice_mean 0.2000  best 0.2000 (epoch 2)  1.0 s",
    ]


def test_every_shipped_sweep_parses_against_its_experiment() -> None:
    files = sorted((REPO / "experiments/sweeps").glob("*.yaml"))
    experiments = {p.stem for p in (REPO / "experiments").glob("*.yaml")}
    assert experiments <= {f.stem for f in files}, "a shipped experiment has no sweep file"
    for f in files:
        cfg, _ = load([str(f)])
        dists = sp.distributions(cfg.search_space)
        for key, d in dists.items():
            for value in d.choices if hasattr(d, "choices") else (d.low, d.high):
                overrides = [sp.to_cli(k, v) for k, v in cfg.overrides.items()]
                resolve([str(cfg.experiment), *overrides, sp.to_cli(key, sp.decode(value, d))])
        assert cfg.n_trials or cfg.timeout


# ----------------------------------------------------------------------- helpers


def required_module(name: str) -> Any:
    """A dev-extra module: skipped without it, except where CI requires the services."""
    if REQUIRE_SERVICES:
        import importlib

        return importlib.import_module(name)
    return pytest.importorskip(name)


def trial_processes(trial_id: int) -> list[int]:
    """Processes whose environment carries this trial (the trial's training process)."""
    pids = []
    for env in Path("/proc").glob("[0-9]*/environ"):
        with contextlib.suppress(OSError):
            for var in env.read_bytes().split(b"\0"):
                if var.startswith(b"MEDLIT_SWEEP_TRIAL="):
                    ctx = json.loads(var.split(b"=", 1)[1])
                    if ctx["trial_id"] == trial_id:
                        pids.append(int(env.parent.name))
    return pids


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"
