"""Tracking: runs are visible through a real MLflow server, and tracking errors never stop
training."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from medlit.fit import main
from medlit.tracking import flatten
from tests.helpers.shared import Trained, free_port
from tests.test_fit import tiny

NO_WAIT = "--trainer.logger.init_args.retry_delay=0"


def _post(url: str, body: dict) -> dict:
    req = urllib.request.Request(
        url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(req, timeout=10) as r:
        return json.loads(r.read())


@pytest.mark.slow
def test_run_is_served_by_the_mlflow_ui_server(brats_unet: Trained, mlflow_ui: str) -> None:
    """What the README's ``mlflow ui --backend-store-uri sqlite:///...`` shows: the
    session's UI server, on the store the trained U-Net logged to."""
    base = mlflow_ui
    experiments = _post(f"{base}/api/2.0/mlflow/experiments/search", {"max_results": 100})
    ids = [
        e["experiment_id"] for e in experiments["experiments"] if e["name"] == brats_unet.experiment
    ]
    runs = _post(f"{base}/api/2.0/mlflow/runs/search", {"experiment_ids": ids})["runs"]
    assert len(runs) == 1
    metrics = {m["key"] for m in runs[0]["data"]["metrics"]}
    assert {"val/dice_WT", "test/dice_WT", "test/hd95_ET", "train/loss_epoch"} <= metrics
    tags = {t["key"]: t["value"] for t in runs[0]["data"]["tags"]}
    assert tags["data"] == "synthetic"
    with urllib.request.urlopen(f"{base}/", timeout=10) as page:  # the UI itself
        assert page.status == 200 and b"<html" in page.read().lower()


def test_tracking_errors_are_retried_and_never_stop_training(
    brats_root: Path, tracking_uri: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The store rejects every second metrics write: retried, the run still finishes."""
    real = MlflowClient.log_batch
    calls = {"n": 0}

    def flaky(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] % 2:
            raise MlflowException("simulated outage of the tracking store")
        return real(self, *args, **kwargs)

    monkeypatch.setattr(MlflowClient, "log_batch", flaky)
    metrics = main(tiny(brats_root, tracking_uri, "--trainer.max_epochs=1", NO_WAIT))
    assert "test/dice_WT" in metrics
    monkeypatch.setattr(MlflowClient, "log_batch", real)
    client = MlflowClient(tracking_uri)
    [run] = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert "test/dice_WT" in run.data.metrics  # logged on the retry


def test_a_store_that_stays_down_only_drops_records(
    brats_root: Path, tracking_uri: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    def down(self, *args, **kwargs):
        raise MlflowException("tracking store unreachable")

    monkeypatch.setattr(MlflowClient, "log_batch", down)
    # fit's and test's spools in the same second, as on a fast machine: no collision
    monkeypatch.setattr("medlit.tracking.spool.stamp", lambda: "20260101-000000")
    metrics = main(
        tiny(
            brats_root,
            tracking_uri,
            "--trainer.max_epochs=1",
            NO_WAIT,
            "--trainer.logger.init_args.flush_timeout=0",
        )
    )
    assert 0 <= metrics["test/dice_mean"] <= 1
    spool = Path(tracking_uri.removeprefix("sqlite:///")).parent / "spool"
    folders = sorted(p.name for p in spool.iterdir())
    assert len(folders) == 2 and not [f for f in folders if f.startswith(".")], folders
    assert folders[1] == folders[0] + "-2"
    kept = [json.loads(x) for f in folders for x in (spool / f / "calls.jsonl").open()]
    assert {"log_metrics", "log_artifacts", "finalize"} <= {r.get("op") for r in kept}


def test_flatten_config_for_params() -> None:
    assert flatten({"model": {"init_args": {"lr": 0.1, "names": ["a"]}}, "x": {}}) == {
        "model.init_args.lr": 0.1,
        "model.init_args.names": ["a"],
        "x": {},
    }


def _start_server(store: str, port: int, cwd: Path) -> subprocess.Popen:
    return subprocess.Popen(
        [
            *(sys.executable, "-m", "mlflow", "server"),
            *("--backend-store-uri", store, "--host", "127.0.0.1", "--port", str(port)),
            *("--workers", "1"),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        cwd=cwd,
    )


def _wait_until(predicate, timeout: float, what: str) -> None:
    deadline = time.time() + timeout
    while not predicate():
        if time.time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.5)


def _fit_against(
    root: Path, base: str, tmp_path: Path, epochs: int, steps: int, *extra: str
) -> subprocess.Popen:
    """A tiny fit logging every step to the server at ``base``, retrying and probing fast,
    its output in ``fit.log``."""
    args = tiny(
        root,
        base,
        f"--trainer.max_epochs={epochs}",
        f"--data.samples_per_epoch={4 * steps}",
        "--trainer.log_every_n_steps=1",
        "--trainer.logger.init_args.retry_delay=0.2",
        "--trainer.logger.init_args.retries=2",
        "--trainer.logger.init_args.outage_probe=1",
        *extra,
    )
    log = (tmp_path / "fit.log").open("wb")
    return subprocess.Popen(
        [sys.executable, "-m", "medlit.fit", *args], cwd=tmp_path, stdout=log, stderr=log
    )


def _answers(base: str) -> bool:
    try:
        urllib.request.urlopen(f"{base}/health", timeout=2)
        return True
    except OSError:
        return False


@pytest.mark.slow
def test_metrics_logged_while_the_server_is_down_arrive_when_it_is_back(
    brats_root: Path, tmp_path: Path
) -> None:
    """A real ``mlflow server`` is stopped mid-training and started again: training goes
    on, and every metric step of every epoch reaches the server."""
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    store = f"sqlite:///{tmp_path}/server/mlflow.db"
    (tmp_path / "server").mkdir()
    server = _start_server(store, port, tmp_path / "server")
    epochs, steps_per_epoch = 10, 8
    fit = None
    try:
        _wait_until(lambda: _answers(base), 120, "the MLflow server")
        fit = _fit_against(brats_root, base, tmp_path, epochs, steps_per_epoch)
        client = MlflowClient(base)

        def validated(n: int) -> bool:
            with contextlib.suppress(Exception):
                [run] = client.search_runs([client.get_experiment_by_name("test").experiment_id])
                return len(client.get_metric_history(run.info.run_id, "val/dice_mean")) >= n
            return False

        _wait_until(lambda: validated(1), 300, "the first validation")
        server.terminate()
        server.wait(timeout=30)
        time.sleep(3)
        assert fit.poll() is None, "training stopped with the server"
        server = _start_server(store, port, tmp_path / "server")
        _wait_until(lambda: _answers(base), 120, "the restarted MLflow server")
        assert fit.wait(timeout=600) == 0, (tmp_path / "fit.log").read_text()[-3000:]
    finally:
        if fit is not None and fit.poll() is None:
            fit.kill()
        server.terminate()
        server.wait(timeout=30)
    output = (tmp_path / "fit.log").read_text()
    assert "is unreachable" in output and "answers again" in output
    assert "dropped" not in output
    # What reached the server, read from its store (a third server start costs ~15 s).
    client = MlflowClient(store)
    [run] = client.search_runs([client.get_experiment_by_name("test").experiment_id])
    assert run.info.status == "FINISHED"
    train = client.get_metric_history(run.info.run_id, "train/loss_step")
    assert sorted(m.step for m in train) == list(range(epochs * steps_per_epoch))
    val = client.get_metric_history(run.info.run_id, "val/dice_mean")
    assert len(val) == epochs
    assert "test/dice_mean" in run.data.metrics
    stamps = [m.timestamp for m in sorted(train, key=lambda m: m.step)]
    assert stamps == sorted(stamps)  # kept calls carry the time they were logged


@pytest.mark.slow
def test_calls_still_undelivered_at_the_end_are_spooled_and_synced_later(
    brats_root: Path, tmp_path: Path
) -> None:
    """The server goes down mid-training and stays down past the run's end: the run
    finishes, its undelivered calls go to a spool folder, a sync while the server is down
    keeps them all, and a sync once it is back delivers every metric step, the artifacts,
    the best checkpoint and the final status."""
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    store = f"sqlite:///{tmp_path}/server/mlflow.db"
    (tmp_path / "server").mkdir()
    spool = tmp_path / "spool"
    server = _start_server(store, port, tmp_path / "server")
    epochs, steps_per_epoch = 3, 4
    fit = None
    try:
        _wait_until(lambda: _answers(base), 120, "the MLflow server")
        fit = _fit_against(
            brats_root,
            base,
            tmp_path,
            epochs,
            steps_per_epoch,
            "--trainer.logger.init_args.flush_timeout=2",
            f"--trainer.logger.init_args.spool_dir={spool}",
        )
        client = MlflowClient(base)

        def validated() -> bool:
            with contextlib.suppress(Exception):
                [run] = client.search_runs([client.get_experiment_by_name("test").experiment_id])
                return bool(client.get_metric_history(run.info.run_id, "val/dice_mean"))
            return False

        _wait_until(validated, 300, "the first validation")
        server.terminate()
        server.wait(timeout=30)
        assert fit.wait(timeout=600) == 0, (tmp_path / "fit.log").read_text()[-3000:]
    finally:
        if fit is not None and fit.poll() is None:
            fit.kill()
        server.terminate()
        server.wait(timeout=30)
    output = (tmp_path / "fit.log").read_text()
    assert "stayed unreachable" in output and "python -m medlit.tracking sync" in output
    assert "dropped" not in output
    # One spool folder per end of a stage (Lightning finalizes after fit and after test).
    folders = sorted(p for p in spool.iterdir() if not p.name.startswith("."))
    assert len(folders) == 2
    calls = {f: (f / "calls.jsonl").read_text() for f in folders}
    n_calls = sum(len(c.splitlines()) - 1 for c in calls.values())  # less the headers
    sync = [sys.executable, "-m", "medlit.tracking", "sync", str(spool)]

    down = subprocess.run(sync, capture_output=True, text=True, timeout=300)
    assert down.returncode == 2 and "not delivered" in down.stderr, down.stderr[-2000:]
    assert {f: (f / "calls.jsonl").read_text() for f in folders} == calls  # nothing lost

    server = _start_server(store, port, tmp_path / "server")
    try:
        _wait_until(lambda: _answers(base), 120, "the restarted MLflow server")
        up = subprocess.run(sync, capture_output=True, text=True, timeout=300)
        assert up.returncode == 0, up.stderr[-2000:]
        assert f"delivered {n_calls} spooled" in up.stdout
        assert not any(spool.iterdir())
        client = MlflowClient(base)
        [run] = client.search_runs([client.get_experiment_by_name("test").experiment_id])
        assert run.info.status == "FINISHED"
        train = client.get_metric_history(run.info.run_id, "train/loss_step")
        assert sorted(m.step for m in train) == list(range(epochs * steps_per_epoch))
        assert len(client.get_metric_history(run.info.run_id, "val/dice_mean")) == epochs
        assert "test/dice_mean" in run.data.metrics
        names = {f.path for f in client.list_artifacts(run.info.run_id)}
        assert "test_per_case.csv" in names
        assert any(n.startswith("best-") for n in names)  # the best checkpoint
    finally:
        server.terminate()
        server.wait(timeout=30)


def test_a_store_down_as_the_run_starts_does_not_stop_training_and_syncs_later(
    brats_root: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    """``medlit.fit`` with the server down from the start used to die with a 100-line
    traceback and no spool. Now it trains, keeps every call, spools them at each
    finalize (after fit, after test), and one sync creates exactly one run with them."""
    from medlit.tracking.spool import sync_spool

    down = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    spool = tmp_path / "spool"
    metrics = main(
        tiny(
            brats_root,
            down,
            "--trainer.max_epochs=1",
            "--trainer.logger.init_args.retries=1",
            "--trainer.logger.init_args.outage_probe=0.2",
            "--trainer.logger.init_args.flush_timeout=0.5",
            f"--trainer.logger.init_args.spool_dir={spool}",
            f"--trainer.default_root_dir={tmp_path}",
        )
    )
    assert "test/dice_mean" in metrics  # trained and tested
    # after fit, after test (within the same second the second is <stamp>-new-run-2)
    folders = sorted(spool.glob("*-new-run*"))
    assert len(folders) == 2, sorted(spool.iterdir())
    store = f"sqlite:///{tmp_path}/later/mlflow.db"
    assert sync_spool(spool, tracking_uri=store) > 0
    client = MlflowClient(store)
    [run] = client.search_runs([client.get_experiment_by_name("test").experiment_id])
    assert run.info.status == "FINISHED"
    assert run.data.metrics["test/dice_mean"] == pytest.approx(metrics["test/dice_mean"])
    assert client.get_metric_history(run.info.run_id, "val/dice_mean")
    assert not list(spool.glob("*/calls.jsonl"))  # delivered, removed


def test_a_damaged_sqlite_store_is_one_clear_error(
    brats_root: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    from medlit.errors import run_main

    damaged = tmp_path / "damaged" / "mlflow.db"
    damaged.parent.mkdir()
    damaged.write_bytes(b"SQLite format 3\x00" + bytes(range(256)) * 16)
    args = tiny(brats_root, f"sqlite:///{damaged}", "--trainer.max_epochs=1")
    assert run_main(lambda: main(args)) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"medlit: error: tracking store {damaged} "), err
    assert "Restore it from a backup or move it aside" in err[0]


def test_a_read_only_sqlite_store_is_one_clear_error(brats_root: Path, tmp_path: Path) -> None:
    """A store file that cannot be written: by its mode, or, for root (who writes a 0444
    file anyway), by the file system's immutable flag (``chattr +i``)."""
    import shutil

    from medlit.errors import ConfigError

    good = tmp_path / "ro" / "mlflow.db"
    MlflowClient(f"sqlite:///{good}").search_experiments()  # a valid store
    immutable = os.geteuid() == 0
    if immutable:
        if shutil.which("chattr") is None:
            pytest.skip("root, and no chattr to make the store read-only")
        subprocess.run(["chattr", "+i", str(good)], check=True)
    else:
        good.chmod(0o444)
    try:
        assert not os.access(good, os.W_OK)
        with pytest.raises(ConfigError, match=rf"tracking store {good} is read-only"):
            main(tiny(brats_root, f"sqlite:///{good}", "--trainer.max_epochs=1"))
    finally:
        if immutable:
            subprocess.run(["chattr", "-i", str(good)], check=True)
        good.chmod(0o644)


def _as_config(flags: list[str]) -> dict:
    """``--a.b=v`` overrides as one config (the task's and data module's under
    ``init_args``), so that the runs below are named by their one real override."""
    import yaml

    config: dict = {}
    for flag in flags:
        key, _, value = flag.removeprefix("--").partition("=")
        parts = key.split(".")
        if parts[0] in ("model", "data") and parts[1] != "init_args":
            parts.insert(1, "init_args")
        node = config
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        node[parts[-1]] = yaml.safe_load(value)
    return config


@pytest.mark.slow
def test_two_runs_are_told_apart_on_the_mlflow_pages_the_summary_links(
    brats_root: Path,
    shared_store: str,
    mlflow_ui: str,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """Each run is named by what it is, and the links the run's summary prints open, in
    headless Chromium, the model-training pages (not MLflow 3's GenAI traces) with the
    runs table showing the key metrics; the screenshots are kept in test-artifacts/."""
    import yaml

    from tests.helpers.browser import ARTIFACTS, page

    demo, *flags = tiny(
        brats_root,
        shared_store,
        "--trainer.max_epochs=1",
        "--trainer.logger.init_args.experiment_name=two-named-runs",
    )
    settings = tmp_path / "tiny.yaml"
    settings.write_text(yaml.safe_dump(_as_config(flags)))
    printed = {}
    for lr in ("0.003", "0.01"):
        main([demo, "--config", str(settings), f"--model.lr={lr}"])
        printed[lr] = capsys.readouterr().out
    client = MlflowClient(shared_store)
    experiment = client.get_experiment_by_name("two-named-runs")
    runs = client.search_runs([experiment.experiment_id], order_by=["attributes.start_time"])
    names = [r.info.run_name for r in runs]
    assert len(set(names)) == 2
    assert names[0].startswith("brats_unet lr=0.003 ")
    assert names[1].startswith("brats_unet lr=0.01 ")
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"
    view = json.loads(experiment.tags["mlflow.sharedViewState.medlit"])
    assert view["selectedColumns"][:2] == ["metrics.`val/dice_mean`", "metrics.`test/dice_mean`"]

    def link(out: str, label: str) -> str:
        line = next(ln for ln in out.splitlines() if ln.strip().startswith(label))
        return line.split(label, 1)[1].strip().replace("http://127.0.0.1:5000", mlflow_ui)

    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    with page() as tab:
        tab.goto(link(printed["0.01"], "its runs:"))
        for name in names:
            tab.get_by_text(name, exact=True).wait_for(timeout=60_000)
        tab.get_by_text("val/dice_mean").first.wait_for(timeout=30_000)
        text = tab.inner_text("body")
        tab.screenshot(path=str(ARTIFACTS / "mlflow_ui_runs.png"))
        assert "Traces" not in text.split("Runs")[0]  # opened on the runs, not GenAI
        assert "test/dice_mean" in text
        tab.goto(link(printed["0.01"], "this run:"))
        tab.get_by_text(names[1]).first.wait_for(timeout=60_000)
        tab.screenshot(path=str(ARTIFACTS / "mlflow_ui_run.png"))
    assert (ARTIFACTS / "mlflow_ui_runs.png").stat().st_size > 10_000


def test_the_slurm_requeue_mark_never_waits_for_the_store_lock_its_own_process_holds(
    tracking_uri: str,
) -> None:
    """Lightning's SLURM handler finalises the run in the signal's context, possibly in the
    middle of this process's own write to the SQLite store, whose lock is then held until
    the handler returns: finalize("finished") must return at once (it waited through
    every retry and the flush timeout) and mark the run requeued once the lock is free."""
    import sqlite3

    from medlit.tracking import MLflowTracker

    tracker = MLflowTracker(
        experiment_name="requeue-lock", tracking_uri=tracking_uri, retry_delay=0.01
    )
    run_id = tracker.run_id  # the run exists
    writer = sqlite3.connect(tracking_uri.removeprefix("sqlite:///"), timeout=0)
    writer.execute("BEGIN IMMEDIATE")  # a write in progress: the store's lock is taken
    started = time.monotonic()
    tracker.finalize("finished")
    assert time.monotonic() - started < 1.0
    writer.rollback()  # the interrupted write ends once the handler has returned
    writer.close()
    tracker._requeue_marker.join(timeout=60)
    run = MlflowClient(tracking_uri).get_run(run_id)
    assert run.info.status == "RUNNING" and run.data.tags["medlit.requeued"]
    assert run.data.tags["medlit.owner"] == ""


def test_artifacts_go_beside_the_sqlite_store_whatever_the_current_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """MLflow files a new experiment's artifacts under ./mlruns of the current directory:
    a run started elsewhere than its store's folder left them there. They go beside the
    store; the default store (``sqlite:///mlruns/mlflow.db``) keeps MLflow's layout."""
    from medlit.tracking import MLflowTracker

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    store = tmp_path / "store"
    uri = f"sqlite:///{store}/mlflow.db"
    located = {}
    for name in ("a demo", "a/demo"):  # slugged alike, kept apart by the digest
        tracker = MLflowTracker(experiment_name=name, tracking_uri=uri)
        tracker.experiment.log_text(tracker.run_id, "hello", "note.txt")
        tracker.finalize("success")
        run = MlflowClient(uri).get_run(tracker.run_id)
        located[name] = Path(run.info.artifact_uri)  # a path, as MLflow's default is
        assert (located[name] / "note.txt").read_text() == "hello"
        assert located[name].is_relative_to(store / "artifacts")
    assert located["a demo"] != located["a/demo"]
    assert not (elsewhere / "mlruns").exists()

    # The default store, from the folder that holds it: MLflow's mlruns/<experiment id>.
    monkeypatch.chdir(tmp_path)
    tracker = MLflowTracker(experiment_name="default", tracking_uri="sqlite:///mlruns/mlflow.db")
    tracker.finalize("success")
    run = MlflowClient(f"sqlite:///{tmp_path}/mlruns/mlflow.db").get_run(tracker.run_id)
    artifacts = Path(run.info.artifact_uri)
    assert artifacts == tmp_path / "mlruns" / run.info.experiment_id / run.info.run_id / "artifacts"
