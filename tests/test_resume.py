"""``medlit.fit CONFIG --ckpt_path=last`` continues a run killed with SIGKILL: the same
MLflow run, every metric step, and the same numbers as a run that was never stopped."""

from __future__ import annotations

import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import pytest

from tests.test_fit import tiny

EPOCHS, STEPS = 4, 24  # steps per epoch: samples_per_epoch / batch size 4


def fit_command(root: Path, uri: str, experiment: str, *extra: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "medlit.fit",
        *tiny(
            root,
            uri,
            f"--trainer.max_epochs={EPOCHS}",
            f"--data.samples_per_epoch={4 * STEPS}",
            "--trainer.log_every_n_steps=1",
            f"--trainer.logger.init_args.experiment_name={experiment}",
        ),
        *extra,
    ]


def logged_steps(db: Path, key: str) -> int:
    """How many values of ``key`` the SQLite store holds (read directly, while the run
    is writing)."""
    try:
        with sqlite3.connect(db, timeout=5) as con:
            return con.execute("SELECT COUNT(*) FROM metrics WHERE key = ?", (key,)).fetchone()[0]
    except sqlite3.Error:
        return 0


def history(client: mlflow.MlflowClient, run_id: str, key: str) -> dict[int, list[float]]:
    out: dict[int, list[float]] = {}
    for m in client.get_metric_history(run_id, key):
        out.setdefault(m.step, []).append(m.value)
    return out


@pytest.mark.slow
def test_a_killed_run_resumes_into_the_same_run_with_the_same_numbers(
    brats_root: Path, tmp_path: Path
) -> None:
    db = tmp_path / "mlruns" / "mlflow.db"
    uri = f"sqlite:///{db}"
    start = time.monotonic()
    straight = subprocess.run(
        fit_command(brats_root, uri, "straight"), cwd=tmp_path, capture_output=True, text=True
    )
    straight_s = time.monotonic() - start
    assert straight.returncode == 0, straight.stderr[-3000:]

    start = time.monotonic()
    victim = subprocess.Popen(
        fit_command(brats_root, uri, "resumed"),
        cwd=tmp_path,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    # Kill it a few steps into epoch 2, after epoch 1's validation wrote last.ckpt
    # (the store also holds the uninterrupted run's EPOCHS * STEPS values).
    deadline = time.monotonic() + 600
    while logged_steps(db, "train/loss_step") < EPOCHS * STEPS + 2 * STEPS + 5:
        assert victim.poll() is None and time.monotonic() < deadline, "the run ended early"
        time.sleep(0.1)
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    resumed = subprocess.run(
        fit_command(brats_root, uri, "resumed", "--ckpt_path=last"),
        cwd=tmp_path,
        capture_output=True,
        text=True,
    )
    resumed_s = time.monotonic() - start
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    print(f"uninterrupted {straight_s:.1f} s; killed + resumed {resumed_s:.1f} s")

    client = mlflow.MlflowClient(uri)
    [a] = client.search_runs([client.get_experiment_by_name("straight").experiment_id])
    runs = client.search_runs([client.get_experiment_by_name("resumed").experiment_id])
    assert len(runs) == 1  # the resumed run logged into the killed one
    b = runs[0]
    assert b.info.status == "FINISHED"
    assert "resuming MLflow run" in resumed.stderr and b.info.run_id in resumed.stderr
    for key in ("train/loss_step", "val/dice_mean", "val/dice_WT", "train/loss_epoch"):
        want, got = history(client, a.info.run_id, key), history(client, b.info.run_id, key)
        assert sorted(got) == sorted(want), key  # no step missing, none extra
        for step, values in got.items():
            # Steps re-run after the checkpoint are logged again, with equal values.
            assert values == pytest.approx([want[step][0]] * len(values), abs=1e-6), (key, step)
    assert any(len(v) > 1 for v in history(client, b.info.run_id, "train/loss_step").values())
    for key, value in a.data.metrics.items():
        if key.startswith("test/"):
            assert b.data.metrics[key] == pytest.approx(value, abs=1e-6), key


def test_last_without_an_unfinished_run_names_the_experiment(
    brats_root: Path, tracking_uri: str
) -> None:
    from medlit.errors import ConfigError
    from medlit.fit import main

    with pytest.raises(ConfigError, match="no unfinished run of this config"):
        main(tiny(brats_root, tracking_uri, "--trainer.max_epochs=1", "--ckpt_path=last"))


def test_a_file_that_is_not_a_safe_checkpoint_is_refused_by_name(
    brats_root: Path, tracking_uri: str, tmp_path: Path
) -> None:
    from medlit.errors import ConfigError
    from medlit.fit import main

    bad = tmp_path / "pickled.ckpt"
    import pickle

    bad.write_bytes(pickle.dumps({"obj": object()}))
    with pytest.raises(ConfigError, match="pickled.ckpt: not a checkpoint that loads"):
        main(tiny(brats_root, tracking_uri, "--trainer.max_epochs=1", f"--ckpt_path={bad}"))
