"""``python -m medlit.tracking runs`` against a real SQLite MLflow store, written with
MlflowClient the way the tracker writes it (tags, params, per-epoch metric histories)."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import yaml
from mlflow import MlflowClient

from medlit.errors import ConfigError, run_main
from medlit.liveness import HOST
from medlit.tracking.__main__ import main
from medlit.tracking.runs import fit_header, runs_report, short_names, short_value

T0 = 1_700_000_000_000  # ms


def add_run(
    client: MlflowClient,
    experiment: str,
    name: str,
    params: dict[str, str],
    history: dict[str, list[float]],
    status: str = "FINISHED",
    tags: dict[str, str] | None = None,
    start: int = 0,
) -> str:
    run = client.create_run(experiment, start_time=T0 + start * 60_000, run_name=name, tags=tags)
    rid = run.info.run_id
    for key, value in params.items():
        client.log_param(rid, key, value)
    for key, values in history.items():
        for epoch, value in enumerate(values):
            client.log_metric(rid, key, value, step=10 * (epoch + 1))
    if status != "RUNNING":
        client.set_terminated(rid, status, end_time=T0 + start * 60_000 + 195_000)
    return rid


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory, empty_store: Path) -> str:
    """Two experiments: ``seg`` with three finished/killed runs and one whose process
    died, ``cls`` with a run from before the monitor tags (its monitor is in the best
    checkpoint's metadata, as Lightning's MLFlowLogger writes it)."""
    root = tmp_path_factory.mktemp("store")
    shutil.copyfile(empty_store, root / "mlflow.db")  # the session's, tables made once
    uri = f"sqlite:///{root}/mlflow.db"
    client = MlflowClient(uri)
    seg = client.create_experiment("seg", artifact_location=(root / "seg").as_uri())
    cls = client.create_experiment("cls", artifact_location=(root / "cls").as_uri())
    monitor = {"medlit.monitor": "val/dice_mean", "medlit.mode": "max"}
    same = {"data.init_args.batch_size": "8", "trainer.max_epochs": "3"}
    add_run(
        client,
        seg,
        "alpha",
        {**same, "model.init_args.lr": "0.001", "model.class_path": "medlit.tasks.Seg"},
        {"val/dice_mean": [0.5, 0.8, 0.7], "val/loss": [1.0, 0.6, 0.65], "test/dice_mean": [0.75]},
        tags=monitor,
        start=0,
    )
    add_run(
        client,
        seg,
        "beta",
        {**same, "model.init_args.lr": "0.01", "model.class_path": "medlit.tasks.Seg"},
        {"val/dice_mean": [0.6, 0.65, 0.9], "val/loss": [0.9, 0.7, 0.4], "test/dice_mean": [0.85]},
        tags=monitor,
        start=10,
    )
    add_run(
        client,
        seg,
        "gamma",
        {**same, "model.init_args.lr": "0.003", "model.class_path": "medlit.tasks.Seg"},
        {"val/dice_mean": [0.4, 0.55], "val/loss": [1.1, 0.8]},
        status="KILLED",
        tags=monitor,
        start=20,
    )
    # RUNNING, its owner this process's pid with another start time: a process gone.
    gone = json.dumps({"host": HOST, "pid": os.getpid(), "start": "0"})
    add_run(
        client,
        seg,
        "delta",
        {**same, "model.init_args.lr": "0.001", "model.class_path": "medlit.tasks.Seg"},
        {},
        status="RUNNING",
        tags={**monitor, "medlit.owner": gone, "medlit.heartbeat": str(T0 // 1000 + 1800 + 90)},
        start=30,
    )
    rid = add_run(
        client,
        cls,
        "old",
        {"model.init_args.lr": "0.1"},
        {"val/balanced_accuracy": [0.6, 0.72, 0.7], "val/loss": [0.5, 0.4, 0.3]},
        start=40,
    )
    meta = root / "best-001"
    meta.mkdir()
    (meta / "metadata.yaml").write_text(
        yaml.safe_dump(
            {"score": 0.72, "Checkpoint": {"monitor": "val/balanced_accuracy", "mode": "max"}}
        )
    )
    client.log_artifacts(rid, str(meta), "best-001")
    return uri


def row(table: str, name: str) -> list[str]:
    return next(line.split() for line in table.splitlines() if line.startswith(f"{name} "))


def names_in_order(table: str, names: set[str]) -> list[str]:
    return [
        words[0] for line in table.splitlines() if (words := line.split()) and words[0] in names
    ]


def test_the_table_shows_runs_their_differing_params_and_best_values(store: str) -> None:
    table = runs_report(store, "seg", width=120)
    lines = table.splitlines()
    assert lines[0] == "experiment 'seg' (4 runs, newest first)"
    header = lines[1].split()
    # Only lr differs (batch size, max_epochs and the task are the same everywhere).
    assert header == [
        "name",
        "status",
        "start",
        "duration",
        "lr",
        "max",
        "val/dice_mean",
        "test/dice_mean",
    ]
    assert names_in_order(table, {"alpha", "beta", "gamma", "delta"}) == [
        "delta",
        "gamma",
        "beta",
        "alpha",
    ]
    # The best validation Dice over the history (0.8 at epoch 2), not the last (0.7).
    assert row(table, "alpha")[1:2] + row(table, "alpha")[4:] == [
        "FINISHED",
        "3m15s",
        "0.001",
        "0.8",
        "0.75",
    ]
    assert row(table, "beta")[-2:] == ["0.9", "0.85"]
    assert row(table, "gamma")[1] == "KILLED" and row(table, "gamma")[-2:] == ["0.55", "-"]
    # RUNNING in MLflow, its process gone: DEAD, for as long as its heartbeats lasted.
    assert row(table, "delta")[1] == "DEAD" and row(table, "delta")[4] == "1m30s"
    assert "--ckpt_path=last continues" in table.split("DEAD: ")[-1]


def test_all_experiments_newest_first_and_the_checkpoint_metadata_monitor(store: str) -> None:
    table = runs_report(store, width=120)
    blocks = table.split("\n\n")
    assert [b.splitlines()[0].split()[1] for b in blocks] == ["'cls'", "'seg'"]
    # No medlit.monitor tag: the monitor comes from the best checkpoint's metadata.
    assert blocks[0].splitlines()[1].split()[-2:] == ["max", "val/balanced_accuracy"]
    assert row(blocks[0], "old")[-1] == "0.72"


def test_sort_by_a_metric_best_first_or_as_asked(store: str) -> None:
    names = {"alpha", "beta", "gamma", "delta"}
    by_dice = runs_report(store, "seg", sort="val/dice_mean", width=120)
    assert "by max val/dice_mean, best first" in by_dice.splitlines()[0]
    assert names_in_order(by_dice, names) == ["beta", "alpha", "gamma", "delta"]  # no value: last
    up = runs_report(store, "seg", sort="+val/dice_mean", width=120)
    assert names_in_order(up, names) == ["gamma", "alpha", "beta", "delta"]
    # val/loss is no run's monitor: lower is better for a loss, and it becomes a column.
    by_loss = runs_report(store, "seg", sort="val/loss", width=120)
    assert names_in_order(by_loss, names) == ["beta", "alpha", "gamma", "delta"]
    assert row(by_loss, "alpha")[-3:] == ["0.8", "0.6", "0.75"]
    top = runs_report(store, "seg", sort="test/dice_mean", limit=1, width=120)
    assert names_in_order(top, names) == ["beta"] and "(1 of 4 runs" in top


def test_a_narrow_terminal_drops_the_least_important_columns_and_says_which(store: str) -> None:
    table = runs_report(store, "seg", width=50)
    assert all(len(line) <= 50 for line in table.splitlines())
    assert row(table, "alpha") == ["alpha", "FINISHED", "0.8", "0.75"]
    assert "(not shown in 50 columns: start, duration, lr; set" in table


def test_unknown_experiment_or_metric_is_one_line_naming_what_there_is(
    store: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert run_main(lambda: main(["runs", "--tracking_uri", store, "--experiment", "sgs"])) == 2
    err = capsys.readouterr().err.strip()
    assert (
        err == "medlit: error: no experiment 'sgs' in the store; its experiments: Default, cls, seg"
    )
    with pytest.raises(
        ConfigError, match="no listed run logged 'val/dise_mean'; they logged: test/dice_mean"
    ):
        runs_report(store, "seg", sort="val/dise_mean")
    with pytest.raises(ConfigError, match="no tracking store at .*nowhere.db"):
        runs_report(f"sqlite:///{Path(store.removeprefix('sqlite:///')).parent}/nowhere.db")


def test_the_cli_prints_the_table(store: str, capsys: pytest.CaptureFixture[str]) -> None:
    main(
        ["runs", "--tracking_uri", store, "--experiment", "seg", "--sort=-val/loss", "--limit", "2"]
    )
    out = capsys.readouterr().out
    assert names_in_order(out, {"alpha", "beta", "gamma", "delta"}) == ["gamma", "alpha"]


def test_short_param_names_are_unique_tails() -> None:
    assert short_names(
        ["model.init_args.lr", "data.init_args.batch_size", "model.init_args.batch_size"]
    ) == {
        "model.init_args.lr": "lr",
        "data.init_args.batch_size": "data.batch_size",
        "model.init_args.batch_size": "model.batch_size",
    }


def test_long_names_and_values_are_shortened_where_it_loses_least() -> None:
    assert fit_header("sweep.data.foreground_fraction") == "s.d.foreground_fraction"
    assert fit_header("data.foreground_fraction") == "data.foreground_fraction"
    assert short_value("0.0017287465812") == "0.001729"  # a sweep's sampled rate
    assert short_value("medlit.tasks.SegmentationTask") == "SegmentationTask"
    assert short_value("dice_ce") == "dice_ce"
