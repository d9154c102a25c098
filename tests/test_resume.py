"""``medlit.fit CONFIG --ckpt_path=last`` continues a run killed with SIGKILL or stopped
by SIGTERM: the same MLflow run, every metric step, and the same numbers as a run that was
never stopped."""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import mlflow
import pytest
import yaml

from tests.helpers.shared import once
from tests.test_fit import tiny
from tests.test_fit_3d import tiny3d

EPOCHS, STEPS = 4, 24  # steps per epoch: samples_per_epoch / batch size 4
# The 3D variant's schedule, shorter (its steps, validations and process start cost more):
# killed 3 steps into its second epoch, after the first epoch's last.ckpt.
SCHEDULE = {"2d": (EPOCHS, STEPS), "3d": (3, 8)}


def kill_point(kind: str) -> int:
    """Values of train/loss_step in the store when the victim is killed: the straight
    run's, then a few steps past the victim's last checkpoint."""
    epochs, steps = SCHEDULE[kind]
    done = 2 if kind == "2d" else 1  # epochs completed (2d: into epoch 3 of 4)
    return epochs * steps + done * steps + (5 if kind == "2d" else 3)


def fit_command(root: Path, uri: str, experiment: str, *extra: str, kind: str = "2d") -> list[str]:
    """The tiny 2.5D U-Net (``kind="2d"``) or 3D DynUNet (``"3d"``), batches of 4 on the
    kind's ``SCHEDULE``."""
    shrink = tiny if kind == "2d" else tiny3d
    epochs, steps = SCHEDULE[kind]
    return [
        sys.executable,
        "-m",
        "medlit.fit",
        *shrink(
            root,
            uri,
            f"--trainer.max_epochs={epochs}",
            f"--data.samples_per_epoch={4 * steps}",
            "--data.loader.batch_size=4",
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


@pytest.fixture(scope="session")
def straight_runs(tmp_path_factory: pytest.TempPathFactory, _brats_pristine: Path) -> Any:
    """One uninterrupted run of the schedule per kind (2d, 3d), made once per session
    (across xdist workers: the killed runs of one kind may run on either) when first asked
    for, in a store the killed runs copy."""

    def run(kind: str) -> dict:
        def build(work: Path) -> dict:
            root = shutil.copytree(_brats_pristine, work / "BraTS2021")
            db = work / "mlruns" / "mlflow.db"
            start = time.monotonic()
            done = subprocess.run(
                fit_command(root, f"sqlite:///{db}", "straight", kind=kind),
                cwd=work,
                capture_output=True,
                text=True,
                env={**os.environ, "MEDLIT_CACHE_DIR": str(work / "cache")},
            )
            assert done.returncode == 0, done.stderr[-3000:]
            return {"db": str(db), "seconds": time.monotonic() - start}

        made = once(tmp_path_factory, f"straight-{kind}", build)
        return {**made, "db": Path(made["db"])}

    return run


@pytest.fixture(scope="module")
def straight_run(straight_runs: Any) -> dict:
    return straight_runs("2d")


@pytest.mark.slow
@pytest.mark.parametrize(
    ("kind", "sig"),
    [("2d", signal.SIGKILL), ("2d", signal.SIGTERM), ("3d", signal.SIGKILL)],
    ids=["SIGKILL", "SIGTERM", "3D-SIGKILL"],
)
def test_a_killed_run_resumes_into_the_same_run_with_the_same_numbers(
    straight_runs: Any, brats_root: Path, tmp_path: Path, kind: str, sig: signal.Signals
) -> None:
    """SIGKILL (a crash) and SIGTERM (what SLURM sends before preemption or at the time
    limit): SIGTERM's exit status says the run did not finish (it used to exit with
    status 0, the run marked FINISHED) and its run is marked KILLED; after SIGKILL the run
    is continued from last.ckpt into the same MLflow run, with the same numbers. The 3D path
    (patch batches, MONAI augmentation, sliding-window validation) resumes the same way."""
    straight_run = straight_runs(kind)
    db = tmp_path / "mlruns" / "mlflow.db"
    db.parent.mkdir()
    shutil.copy(straight_run["db"], db)
    uri = f"sqlite:///{db}"
    start = time.monotonic()
    victim = subprocess.Popen(
        fit_command(brats_root, uri, "resumed", kind=kind),
        cwd=tmp_path,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    # Kill it a few steps into an epoch, after the last validation wrote last.ckpt (the
    # store also holds the uninterrupted run's values).
    deadline = time.monotonic() + 600
    while logged_steps(db, "train/loss_step") < kill_point(kind):
        assert victim.poll() is None and time.monotonic() < deadline, "the run ended early"
        time.sleep(0.1)
    victim.send_signal(sig)
    _, victim_err = victim.communicate(timeout=300)
    client = mlflow.MlflowClient(uri)
    resumed_experiment = client.get_experiment_by_name("resumed").experiment_id
    if sig == signal.SIGTERM:
        assert victim.returncode == 143, victim_err[-3000:]  # 128 + 15: did not finish
        [killed] = client.search_runs([resumed_experiment])
        assert killed.info.status == "KILLED"
        assert f"interrupted by SIGTERM; MLflow run {killed.info.run_id} is marked KILLED" in (
            victim_err
        )
        assert "last.ckpt, the end of the last completed epoch" in victim_err
        assert victim_err.rstrip().endswith("--ckpt_path=last")
        # Resuming is the same from here on, whatever stopped the run: the SIGKILL
        # variants check it (last.ckpt is there, and the run can take it).
        assert list(tmp_path.rglob("last.ckpt"))
        return
    else:
        assert victim.returncode == -signal.SIGKILL
    resumed = subprocess.run(
        fit_command(brats_root, uri, "resumed", "--ckpt_path=last", kind=kind),
        cwd=tmp_path,
        capture_output=True,
        text=True,
    )
    resumed_s = time.monotonic() - start
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    print(f"uninterrupted {straight_run['seconds']:.1f} s; killed + resumed {resumed_s:.1f} s")

    [a] = client.search_runs([client.get_experiment_by_name("straight").experiment_id])
    runs = client.search_runs([resumed_experiment])
    assert len(runs) == 1  # the resumed run logged into the killed one
    b = runs[0]
    assert b.info.status == "FINISHED"
    assert "resuming MLflow run" in resumed.stderr and b.info.run_id in resumed.stderr
    # Kept while the run was killed (the resume read it), removed once it finished.
    checkpoints = db.parent / b.info.experiment_id / b.info.run_id / "checkpoints"
    assert not (checkpoints / "last.ckpt").exists() and list(checkpoints.glob("best-*.ckpt"))
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


def test_the_signal_behind_lightning_s_exit_is_told_apart_from_other_exits() -> None:
    from pytorch_lightning.utilities.exceptions import SIGTERMException

    from medlit.fit import interrupted_by

    assert interrupted_by(SIGTERMException()) == "SIGTERM"
    try:  # Lightning's Ctrl-C path: sys.exit(1) while handling the KeyboardInterrupt
        try:
            raise KeyboardInterrupt
        except KeyboardInterrupt:
            sys.exit(1)
    except SystemExit as e:
        assert interrupted_by(e) == "SIGINT"
    assert interrupted_by(SystemExit(2)) is None


@pytest.mark.slow
def test_a_slurm_requeue_continues_the_same_run(
    straight_run: dict, brats_root: Path, tmp_path: Path
) -> None:
    """Lightning's SLURM auto-requeue (SIGUSR1) finalised the run as finished and, once
    requeued, restored its hpc checkpoint into a new MLflow run. The run now stays
    unfinished, and the requeued job (the same command) continues it."""
    db = tmp_path / "mlruns" / "mlflow.db"
    db.parent.mkdir()
    shutil.copy(straight_run["db"], db)
    uri = f"sqlite:///{db}"
    # SLURM's scontrol (which cannot run here) records the request and, as slurmctld does
    # with a requeued job, sends the job SIGTERM. The test used to leave the call failing
    # and kill the job 2 s later: the job trained on meanwhile and, on a loaded machine,
    # finished the run first.
    bin_ = tmp_path / "bin"
    bin_.mkdir()
    asked = tmp_path / "requeue-request"
    scontrol = bin_ / "scontrol"
    scontrol.write_text(f'#!/bin/sh\necho "$@" > {asked}\nkill -TERM "$PPID"\n')
    scontrol.chmod(0o755)
    slurm = {
        **os.environ,
        "PATH": f"{bin_}{os.pathsep}{os.environ['PATH']}",
        "SLURM_NTASKS": "1",
        "SLURM_JOB_NAME": "medlit",
        "SLURM_JOB_ID": "4242",
        "SLURM_PROCID": "0",
        "SLURM_LOCALID": "0",
        "SLURM_NODEID": "0",
    }
    job = subprocess.Popen(
        fit_command(brats_root, uri, "requeued"),
        cwd=tmp_path,
        env=slurm,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 600
        while logged_steps(db, "train/loss_step") < kill_point("2d"):
            assert job.poll() is None and time.monotonic() < deadline, "the run ended early"
            time.sleep(0.1)
        job.send_signal(signal.SIGUSR1)  # SLURM's warning before the time limit
        assert job.wait(timeout=300) == 128 + signal.SIGTERM
    finally:
        job.kill()
        job.wait()
    assert asked.read_text().split() == ["requeue", "4242"]
    assert (brats_root.parent / "hpc_ckpt_1.ckpt").is_file()
    client = mlflow.MlflowClient(uri)
    exp = client.get_experiment_by_name("requeued").experiment_id
    [before] = client.search_runs([exp])
    # Unfinished (KILLED, by the SIGTERM), its requeue recorded before the job ended.
    assert before.info.status == "KILLED" and before.data.tags["medlit.requeued"]

    again = subprocess.run(  # the requeued job: the same command
        fit_command(brats_root, uri, "requeued"),
        cwd=tmp_path,
        env=slurm,
        capture_output=True,
        text=True,
    )
    assert again.returncode == 0, again.stderr[-3000:]
    # From the run's last.ckpt (the end of epoch 2), which resumes exactly; Lightning's
    # mid-epoch hpc checkpoint would train one step twice.
    assert "SLURM job requeued: continuing from" in again.stderr
    assert "last.ckpt" in again.stderr.split("SLURM job requeued: continuing from")[1][:500]
    [after] = client.search_runs([exp])
    assert after.info.run_id == before.info.run_id and after.info.status == "FINISHED"
    assert not (db.parent / exp / after.info.run_id / "checkpoints" / "last.ckpt").exists()
    [a] = client.search_runs([client.get_experiment_by_name("straight").experiment_id])
    for key in ("train/loss_step", "val/dice_mean", "train/loss_epoch"):
        want, got = history(client, a.info.run_id, key), history(client, after.info.run_id, key)
        assert sorted(got) == sorted(want), key  # no step missing, none extra
        for step, values in got.items():
            assert values == pytest.approx([want[step][0]] * len(values), abs=1e-6), (key, step)
    for key, value in a.data.metrics.items():
        if key.startswith("test/"):
            assert after.data.metrics[key] == pytest.approx(value, abs=1e-6), key


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
    with pytest.raises(
        ConfigError,
        match=r"pickled.ckpt: the file holds pickled Python objects.* could run code.*torch.save",
    ):
        main(tiny(brats_root, tracking_uri, "--trainer.max_epochs=1", f"--ckpt_path={bad}"))


# The config hash of each shipped experiment as medlit computed it at c9de9f4 (every
# resolved key, defaults included): the tag of every run started before the hash came to
# leave defaults out.
BEFORE_DEFAULTS_LEFT_OUT = {
    # Shipped with the 3D path, the Volumes module and LUNA16 lungs (no older medlit ran
    # them): the legacy hash as computed now.
    "experiments/brats_unet3d.yaml": "a5c2e6aaefc72950",
    "experiments/demo/brats_unet3d.yaml": "1b9fc066dd61839a",
    "experiments/demo/volumes_unet.yaml": "58e299fee344c312",
    "experiments/volumes_unet3d.yaml": "86c5058d4aba0508",
    "experiments/demo/luna16_lungs_unet.yaml": "ce98a8c7e448c0e5",
    "experiments/luna16_lungs_unet.yaml": "4fd76ab51b72afff",
    "experiments/brats_deeplabv3plus.yaml": "6ff82cbf521a31ad",
    "experiments/brats_pix2pix.yaml": "544899e62cfbc228",
    "experiments/brats_unet.yaml": "6685feefbce8192f",
    "experiments/demo/brats_pix2pix.yaml": "a3cf0af562f6a777",
    "experiments/demo/brats_unet.yaml": "f29a36c709e20387",
    "experiments/demo/isic_classifier.yaml": "45c6b00931a33165",
    "experiments/demo/isic_gan.yaml": "d2c3bb99031d8d7c",
    "experiments/demo/isic_unet.yaml": "e8faf0fa0dcdcf63",
    "experiments/demo/luna16_fpr.yaml": "f521d0bdb296197f",
    "experiments/demo/luna16_yolo.yaml": "f82e80de5a97e7f0",
    "experiments/isic2019_classifier.yaml": "6713dc7b255715a8",
    "experiments/isic_classifier.yaml": "6c2e5f450b695912",
    "experiments/isic_gan.yaml": "018f1f3e17a4aa7e",
    "experiments/isic_unet.yaml": "979787aab4b7a28c",
    "experiments/luna16_fpr.yaml": "89f51f2a195cdebe",
    "experiments/luna16_yolo.yaml": "7de037884e8f4b30",
}


# The current hash of each shipped experiment (defaults left out), as tagged on runs since
# 394c375; the loader and split settings moving into groups left every one unchanged.
DEFAULTS_LEFT_OUT = {
    "experiments/brats_unet3d.yaml": "2a698233cc7222d2",
    "experiments/demo/brats_unet3d.yaml": "2c67327ff3fe01f4",
    "experiments/demo/volumes_unet.yaml": "6b44d72a4f1ab5a0",
    "experiments/volumes_unet3d.yaml": "3d3325102794f2d7",
    "experiments/demo/luna16_lungs_unet.yaml": "75e1e169c6d61c16",
    "experiments/luna16_lungs_unet.yaml": "50703c155acedc48",
    "experiments/brats_deeplabv3plus.yaml": "0ece9a6eb85aa8a0",
    "experiments/brats_pix2pix.yaml": "c107f944bc801e3f",
    "experiments/brats_unet.yaml": "5295a9e556affc7b",
    "experiments/demo/brats_pix2pix.yaml": "eeb1852e616e3ff6",
    "experiments/demo/brats_unet.yaml": "3e35a98c79de9092",
    "experiments/demo/isic_classifier.yaml": "ecccb9b91a97c31e",
    "experiments/demo/isic_gan.yaml": "f4d292d3eea1d286",
    "experiments/demo/isic_unet.yaml": "ec2276dce65707a7",
    "experiments/demo/luna16_fpr.yaml": "ebe65b4c73dc42bf",
    "experiments/demo/luna16_yolo.yaml": "6331a4f29d8118ba",
    "experiments/isic2019_classifier.yaml": "aed04a03d92a1e7d",
    "experiments/isic_classifier.yaml": "72bf2c8bb6bfba86",
    "experiments/isic_gan.yaml": "6335ae68ea850116",
    "experiments/isic_unet.yaml": "baac3cc55a63cb8f",
    "experiments/luna16_fpr.yaml": "1200fa7cf9bb9673",
    "experiments/luna16_yolo.yaml": "fb3cfdeaa24858aa",
}


def test_runs_started_by_an_older_medlit_are_still_found_by_their_config_hash() -> None:
    from medlit.cli import config_hashes
    from medlit.tuning.worker import resolve

    repo = Path(__file__).parents[1]
    shipped = {
        str(p.relative_to(repo))
        for p in (repo / "experiments").rglob("*.yaml")
        if "sweeps" not in p.parts
    }
    assert shipped == set(BEFORE_DEFAULTS_LEFT_OUT)
    for name, before in BEFORE_DEFAULTS_LEFT_OUT.items():
        config, _ = resolve([str(repo / name)])
        current, legacy = config_hashes(config)
        assert legacy == before, name
        assert current == DEFAULTS_LEFT_OUT[name], name
        assert current != legacy, name  # the current hash leaves the defaults out


def _flat(config: Path, out: Path) -> Path:
    """The shipped config as it was written before the loader and split groups: their
    fields as flat data arguments (LUNA16's subsets as ``<split>_subsets``)."""
    content = yaml.safe_load(config.read_text())
    init = content["data"]["init_args"]
    for group in ("split", "loader"):
        for key, value in (init.pop(group, None) or {}).items():
            init[f"{key}_subsets" if key in ("train", "val", "test") else key] = value
    out.write_text(yaml.safe_dump(content))
    return out


@pytest.mark.parametrize("name", ["brats_unet", "luna16_yolo"])
def test_a_config_with_the_flat_data_keys_still_runs_says_the_new_keys_and_is_the_same_experiment(
    tmp_path: Path, name: str
) -> None:
    from medlit.cli import config_hashes
    from medlit.tuning.worker import resolve

    new = Path(__file__).parents[1] / f"experiments/demo/{name}.yaml"
    old = _flat(new, tmp_path / "old.yaml")
    assert "batch_size" in yaml.safe_load(old.read_text())["data"]["init_args"]
    with pytest.warns(
        FutureWarning,
        match=r"`batch_size` moved into the `loader` group .* use `data.loader.batch_size`",
    ):
        before, _ = resolve([str(old), "--data.num_workers=0", "--data.init_args.batch_size=4"])
    after, _ = resolve([str(new), "--data.loader.num_workers=0", "--data.loader.batch_size=4"])
    assert before == {**after, "config": before["config"]}
    assert before["data"]["init_args"]["loader"] == {"batch_size": 4, "num_workers": 0}
    assert config_hashes(before) == config_hashes(after)


def test_python_callers_may_still_pass_the_flat_data_arguments() -> None:
    from medlit.datamodules import BraTSDataModule, Loader, LUNA16DataModule, Split

    with pytest.warns(FutureWarning, match="`val_fraction` moved into the `split` group"):
        dm = BraTSDataModule(root="x", val_fraction=0.3, batch_size=4)
    assert dm.split_settings == Split(val_fraction=0.3)
    assert (dm.loader, dm.batch_size) == (Loader(batch_size=4), 4)
    assert dm.hparams["loader"] == {"batch_size": 4, "num_workers": 2}
    assert "batch_size" not in dm.hparams and "val_fraction" not in dm.hparams
    with pytest.warns(FutureWarning, match="`test_subsets` moved into the `split` group"):
        luna = LUNA16DataModule(root="x", test_subsets=[7])
    assert luna.subsets["test"] == [7] and luna.subsets["val"] == [8]
    with pytest.raises(TypeError, match=r"unexpected keyword arguments \['val_fractoin'\]"):
        BraTSDataModule(root="x", val_fractoin=0.3)


class Widened:
    """A constructor that gained an argument (``added``) after runs were started."""

    def __init__(self, lr: float = 1e-3, added: int = 7) -> None:
        pass


def test_an_argument_added_at_its_default_leaves_the_config_hash_unchanged() -> None:
    from medlit.cli import config_hash

    model = {"class_path": f"{__name__}.Widened", "init_args": {"lr": 3e-4}}
    before = config_hash({"model": model, "ckpt_path": None})
    widened = {**model, "init_args": {"lr": 3e-4, "added": 7}}
    assert config_hash({"model": widened, "ckpt_path": "last"}) == before
    assert config_hash({"model": {**model, "init_args": {"lr": 3e-4, "added": 8}}}) != before
    assert config_hash({"model": {**model, "init_args": {"lr": 1e-3}}}) != before


def test_last_finds_an_unfinished_run_by_either_hash(tmp_path: Path, tracking_uri: str) -> None:
    from medlit.errors import ConfigError
    from medlit.tracking import MLflowTracker
    from medlit.tracking.resume import last_unfinished

    tracker = MLflowTracker(experiment_name="older", tracking_uri=tracking_uri)
    client = tracker.experiment  # creates the experiment
    exp = client.get_experiment_by_name("older").experiment_id
    old = client.create_run(exp, tags={"medlit.config_hash": "legacyhash"}).info.run_id
    last = tmp_path / exp / old / "checkpoints" / "last.ckpt"
    last.parent.mkdir(parents=True)
    last.write_bytes(b"")
    assert last_unfinished(tracker, tmp_path, ["currenthash", "legacyhash"]) == (last, old)
    with pytest.raises(ConfigError, match="experiment 'older' at sqlite:"):
        last_unfinished(tracker, tmp_path, ["currenthash"])


def _owned_run(client, exp: str, root: Path, owner: str, heartbeat: float) -> tuple[str, Path]:
    run = client.create_run(
        exp,
        tags={
            "medlit.config_hash": "h",
            "medlit.owner": owner,
            "medlit.heartbeat": f"{heartbeat:.0f}",
        },
    ).info.run_id
    last = root / exp / run / "checkpoints" / "last.ckpt"
    last.parent.mkdir(parents=True)
    last.write_bytes(b"")
    return run, last


def test_last_never_joins_a_run_a_live_process_is_training(
    tmp_path: Path, tracking_uri: str
) -> None:
    """Two processes used to write one run and one checkpoint folder: a RUNNING run is
    continued only once its owner is gone (same host: pid and its start time; another
    host: no heartbeat for HEARTBEAT_GRACE)."""
    from medlit.errors import ConfigError
    from medlit.liveness import HEARTBEAT_GRACE, process_start
    from medlit.tracking import MLflowTracker
    from medlit.tracking.resume import last_unfinished

    tracker = MLflowTracker(experiment_name="owned", tracking_uri=tracking_uri)
    client = tracker.experiment
    exp = client.get_experiment_by_name("owned").experiment_id
    trainer = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    try:
        local = json.dumps(
            {"host": socket.gethostname(), "pid": trainer.pid, "start": process_start(trainer.pid)}
        )
        busy, busy_last = _owned_run(client, exp, tmp_path, local, time.time())
        with pytest.raises(ConfigError, match="1 still being trained by live processes"):
            last_unfinished(tracker, tmp_path, ["h"])
        elsewhere = '{"host": "node-7", "pid": 4242, "start": "1"}'
        _owned_run(client, exp, tmp_path, elsewhere, time.time() - 60)  # beating: alive
        with pytest.raises(ConfigError, match="2 still being trained"):
            last_unfinished(tracker, tmp_path, ["h"])
        stale, stale_last = _owned_run(
            client, exp, tmp_path, elsewhere, time.time() - HEARTBEAT_GRACE - 60
        )
        assert last_unfinished(tracker, tmp_path, ["h"]) == (stale_last, stale)
    finally:
        trainer.kill()
        trainer.wait()
    client.delete_run(stale)
    # Its owner gone (the pid is dead), the local run is continued; the other host's
    # run, still beating, is not.
    assert last_unfinished(tracker, tmp_path, ["h"]) == (busy_last, busy)


def test_a_checkpoint_of_a_finished_run_or_another_config_starts_a_new_run(
    tmp_path: Path, tracking_uri: str
) -> None:
    """``--ckpt_path=PATH`` used to reopen whatever run wrote the checkpoint, even a
    FINISHED one of another experiment, and log a second test result into it."""
    import torch

    from medlit.errors import ConfigError
    from medlit.liveness import me
    from medlit.tracking import MLflowTracker
    from medlit.tracking.resume import resume_from

    class Trainer:  # what resume_from reads of a trainer
        def __init__(self, tracker: MLflowTracker) -> None:
            self.loggers, self.default_root_dir = [tracker], str(tmp_path)

    tracker = MLflowTracker(experiment_name="paths", tracking_uri=tracking_uri)
    client = tracker.experiment
    exp = client.get_experiment_by_name("paths").experiment_id

    def checkpoint_of(tags: dict, status: str | None = None) -> tuple[str, Path]:
        run = client.create_run(exp, tags=tags).info.run_id
        if status:
            client.set_terminated(run, status)
        path = tmp_path / f"{run}.ckpt"
        torch.save({"medlit": {"mlflow_run_id": run}}, path)
        return run, path

    finished, ckpt = checkpoint_of({"medlit.config_hash": "h"}, "FINISHED")
    resume_from(
        str(ckpt), Trainer(fresh := MLflowTracker("paths", tracking_uri=tracking_uri)), ["h"]
    )
    assert not fresh.reopened and fresh.run_id != finished
    assert client.get_run(finished).info.status == "FINISHED"  # left as it was
    assert (
        client.get_run(fresh.run_id).data.tags["medlit.resumed_from"].endswith(f"(run {finished})")
    )

    # A finished run's last.ckpt, removed at its end: said so, not "no such file".
    best = tmp_path / exp / finished / "checkpoints" / "best-001.ckpt"
    best.parent.mkdir(parents=True)
    best.write_bytes(b"")
    with pytest.raises(
        ConfigError,
        match=rf"its run {finished} has finished and its last.ckpt was removed .*best-001.ckpt"
        r".*--keep_last_checkpoint=true",
    ):
        resume_from(str(best.with_name("last.ckpt")), Trainer(tracker), ["h"])

    other, ckpt = checkpoint_of({"medlit.config_hash": "another"})
    resume_from(
        str(ckpt), Trainer(fresh := MLflowTracker("paths", tracking_uri=tracking_uri)), ["h"]
    )
    assert not fresh.reopened and fresh.run_id != other

    mine, ckpt = checkpoint_of({"medlit.config_hash": "h"}, "KILLED")
    resume_from(
        str(ckpt), Trainer(same := MLflowTracker("paths", tracking_uri=tracking_uri)), ["h"]
    )
    assert same.reopened and same.run_id == mine

    live = (
        me()
        .replace(f'"pid": {os.getpid()}', f'"pid": {os.getppid()}')
        .replace(
            '"start": ',
            '"start_": ',  # the parent process: alive, and not this one
        )
    )
    busy, ckpt = checkpoint_of(
        {"medlit.config_hash": "h", "medlit.owner": live, "medlit.heartbeat": "0"}
    )
    with pytest.raises(ConfigError, match=f"its run {busy} is still being trained by process"):
        resume_from(str(ckpt), Trainer(MLflowTracker("paths", tracking_uri=tracking_uri)), ["h"])


def _hand_written_factor(epoch: int, total: int, warmup: int) -> float:
    """The warm-up + cosine factor medlit computed by hand (LambdaLR) up to c9de9f4."""
    if epoch < warmup:
        return (epoch + 1) / (warmup + 1)
    progress = (epoch - warmup) / max(total - warmup, 1)
    return 0.5 * (1 + math.cos(math.pi * progress)) * 0.99 + 0.01


def test_a_checkpoint_with_the_hand_written_schedule_resumes_on_torchs() -> None:
    import torch
    from pytorch_lightning import Trainer
    from torch.optim.lr_scheduler import LambdaLR, SequentialLR

    from medlit.tasks import ClassificationTask
    from medlit.tasks.base import warmup_cosine

    for total, warmup in ((1, 0), (4, 0), (12, 2), (60, 5)):  # torch's equals the old one
        opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=3e-4)
        scheduler = warmup_cosine(opt, total, warmup)
        for epoch in range(total):
            want = 3e-4 * _hand_written_factor(epoch, total, warmup)
            assert opt.param_groups[0]["lr"] == pytest.approx(want, rel=1e-12), (total, epoch)
            opt.step()
            scheduler.step()

    task = ClassificationTask(model="test_resnet", num_classes=2, lr=3e-4, warmup_epochs=2)
    task.trainer = Trainer(max_epochs=12, logger=False, enable_checkpointing=False)
    opt = torch.optim.AdamW(task.parameters(), lr=3e-4)
    old = LambdaLR(opt, lambda e: _hand_written_factor(e, 12, 2))
    for _ in range(5):  # the run stopped after epoch 5
        opt.step()
        old.step()
    checkpoint = {
        "state_dict": task.state_dict(),
        "optimizer_states": [opt.state_dict()],
        "lr_schedulers": [old.state_dict()],
    }
    task.on_load_checkpoint(checkpoint)
    resumed = task.configure_optimizers()["lr_scheduler"]["scheduler"]
    assert isinstance(resumed, SequentialLR)
    # As Lightning restores a run: the optimizer's state (its learning rate), then the
    # scheduler's.
    resumed.optimizer.load_state_dict(checkpoint["optimizer_states"][0])
    resumed.load_state_dict(checkpoint["lr_schedulers"][0])
    for epoch in range(5, 12):
        lr = resumed.optimizer.param_groups[0]["lr"]
        assert lr == pytest.approx(3e-4 * _hand_written_factor(epoch, 12, 2), rel=1e-12), epoch
        resumed.optimizer.step()
        resumed.step()


def test_a_renamed_key_still_works_says_its_new_name_and_is_the_same_experiment() -> None:
    from medlit.cli import config_hashes
    from medlit.errors import ConfigError
    from medlit.tasks import ClassificationTask
    from medlit.tuning.worker import resolve

    config = str(Path(__file__).parents[1] / "experiments/demo/luna16_fpr.yaml")
    old, _ = resolve([config, "--model.in_chans=1"])
    new, _ = resolve([config, "--model.in_channels=1"])
    assert config_hashes(old) == config_hashes(new)
    assert config_hashes(new) != config_hashes(resolve([config])[0])
    with pytest.warns(FutureWarning, match="`in_chans` is deprecated .* use `in_channels`"):
        task = ClassificationTask(model="test_resnet", num_classes=2, in_chans=1)
    assert task.hparams["in_channels"] == 1 and task.hparams["in_chans"] is None
    with pytest.raises(ConfigError, match="both in_chans=1 .* and in_channels=4"):
        ClassificationTask(model="test_resnet", in_channels=4, in_chans=1)


def test_a_resumed_run_records_the_settings_it_changed(
    tmp_path: Path, tracking_uri: str, caplog: pytest.LogCaptureFixture
) -> None:
    """MLflow keeps a param's first value: resuming with a longer ``trainer.max_epochs``
    used to be refused ("dropped") and left the old value as if nothing had changed."""
    from medlit.tracking import MLflowTracker
    from medlit.tracking.metadata import log_run_metadata

    first = MLflowTracker(experiment_name="longer", tracking_uri=tracking_uri)
    first.log_hyperparams({"trainer.max_epochs": 4, "model.lr": 0.001})
    run_id = first.run_id
    resumed = MLflowTracker(experiment_name="longer", tracking_uri=tracking_uri)
    resumed.reopen(run_id)

    class Trainer:
        loggers, is_global_zero, fast_dev_run = [resumed], True, False
        log_dir = default_root_dir = str(tmp_path)

    config = {"trainer": {"max_epochs": 6}, "model": {"lr": 0.001, "added": 2}}
    with caplog.at_level(logging.WARNING):
        log_run_metadata(Trainer(), config, "trainer: {max_epochs: 6}\n", {"task": "t"})
    assert not [r for r in caplog.records if "refused" in r.getMessage()]
    run = mlflow.MlflowClient(tracking_uri).get_run(run_id)
    assert run.data.params["trainer.max_epochs"] == "4"  # MLflow's, unchanged
    assert run.data.tags["medlit.resumed.trainer.max_epochs"] == "4 -> 6"
    assert run.data.params["model.added"] == "2" and "medlit.resumed.model.lr" not in run.data.tags
    assert run.data.tags["medlit.owner"] and run.data.tags["medlit.heartbeat"]


def test_last_with_the_store_down_names_the_checkpoint_it_would_use(tmp_path: Path) -> None:
    from medlit.errors import ConfigError
    from medlit.tracking import MLflowTracker
    from medlit.tracking.resume import resume_from
    from tests.helpers.shared import free_port

    tracker = MLflowTracker(
        experiment_name="x", tracking_uri=f"http://127.0.0.1:{free_port()}", retries=1
    )
    last = tmp_path / "3" / "abc123" / "checkpoints" / "last.ckpt"
    last.parent.mkdir(parents=True)
    last.write_bytes(b"")

    class Trainer:
        loggers, default_root_dir = [tracker], str(tmp_path)

    with pytest.raises(
        ConfigError,
        match=rf"cannot be reached to look up the run .* newest local last.ckpt is {last} "
        rf"\(run abc123\): pass --ckpt_path={last}",
    ):
        resume_from("last", Trainer(), ["h"])
