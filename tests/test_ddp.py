"""DDP trains every task, and evaluates exactly what one process does: for every task, a
2-process CPU (gloo) fit of one epoch writes a checkpoint, and its validation (of those
same weights) gives the metrics and per-case tables of ``medlit.evaluate`` of that
checkpoint in one process; each rank evaluated a disjoint share of the cases, the shares
together are all of them, and only rank 0 wrote artifacts. ``medlit.evaluate`` on 2
processes is checked the same way for BraTS, under torchrun; the fits run under
Lightning's launcher."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import mlflow
import pandas as pd
import pytest

from medlit.evaluate import main as evaluate
from tests.data.isic.data import make_isic
from tests.data.luna16.data import make_luna16
from tests.test_fit import REPO, cli_args, tiny
from tests.test_fit_3d import tiny3d

SHARES = "tests.helpers.shares.RecordShares"


def brats_segmentation(tmp: Path, uri: str, brats_root: Path) -> list[str]:
    return tiny(
        brats_root, uri, "--data.split.val_fraction=0.375", "--data.split.test_fraction=0.125"
    )


def brats_pix2pix(tmp: Path, uri: str, brats_root: Path) -> list[str]:
    return [
        str(REPO / "experiments/demo/brats_pix2pix.yaml"),
        *cli_args(brats_root, uri),
        "--data.patch_size=32",
        "--data.loader.batch_size=4",
        "--data.samples_per_epoch=8",
        "--data.split.val_fraction=0.375",
        "--data.split.test_fraction=0.125",
        "--model.base_channels=8",
        "--model.depth=3",
    ]


def isic_classifier(tmp: Path, uri: str, brats_root: Path) -> list[str]:
    root = tmp / "isic"
    make_isic(root, "2018_task3", lesions=24, seed=4)
    return [
        str(REPO / "experiments/demo/isic_classifier.yaml"),
        *cli_args(root, uri),
        "--data.image_size=32",
        "--data.split.val_fraction=0.3",
        "--data.split.test_fraction=0.2",
        "--data.loader.batch_size=4",
        "--model.model=test_resnet",
        "--model.num_cam_images=0",
    ]


def isic_gan(tmp: Path, uri: str, brats_root: Path) -> list[str]:
    root = tmp / "isic"
    make_isic(root, "2018_task3", lesions=24, seed=4)
    return [
        str(REPO / "experiments/demo/isic_gan.yaml"),
        *cli_args(root, uri),
        "--data.image_size=32",
        "--data.split.val_fraction=0.3",
        "--data.split.test_fraction=0.2",
        "--data.loader.batch_size=4",
        "--model.image_size=32",
        "--model.base_channels=8",
        "--model.fd_model=resnet10t",
        "--model.fd_samples=16",
        "--model.num_samples=4",
        "--trainer.check_val_every_n_epoch=1",
    ]


def luna16_detector(tmp: Path, uri: str, brats_root: Path) -> list[str]:
    root = tmp / "LUNA16"
    make_luna16(root, scans=10, seed=0)  # one scan per subset
    return [
        str(REPO / "experiments/demo/luna16_yolo.yaml"),
        *cli_args(root, uri),
        "--data.spacing=null",
        "--data.split.train=[0, 1, 2, 3, 4, 5]",
        "--data.split.val=[6, 7, 8]",
        "--data.split.test=[9]",
        "--data.patch_size=64",
        "--data.loader.batch_size=4",
        "--data.samples_per_epoch=8",
        "--model.conf_threshold=0.001",
    ]


def brats_segmentation3d(tmp: Path, uri: str, brats_root: Path) -> list[str]:
    return tiny3d(
        brats_root, uri, "--data.split.val_fraction=0.375", "--data.split.test_fraction=0.125"
    )


TASKS: dict[str, Callable[[Path, str, Path], list[str]]] = {
    "segmentation-brats": brats_segmentation,
    "segmentation3d-brats": brats_segmentation3d,
    "gan-paired-brats": brats_pix2pix,
    "classification-isic": isic_classifier,
    "gan-unconditional-isic": isic_gan,
    "detection-luna16": luna16_detector,
}


def _run_of(uri: str, experiment: str) -> mlflow.entities.Run:
    client = mlflow.MlflowClient(uri)
    [run] = client.search_runs([client.get_experiment_by_name(experiment).experiment_id])
    return run


def _artifacts(uri: str, run_id: str, path: str | None = None) -> dict[str, Path]:
    """Every artifact file of the run, downloaded: relative name -> local path."""
    client = mlflow.MlflowClient(uri)
    out: dict[str, Path] = {}
    for f in client.list_artifacts(run_id, path):
        if f.is_dir:
            out.update(_artifacts(uri, run_id, f.path))
        else:
            out[f.path] = Path(client.download_artifacts(run_id, f.path))
    return out


def _launch(
    module: str, args: list[str], tmp_path: Path, torchrun: bool = False
) -> subprocess.CompletedProcess:
    """``python -m module args`` on 2 CPU processes (gloo): Lightning's own launcher
    starts rank 1, or torchrun (the README's multi-node launcher, on one node) starts
    every rank itself."""
    launch = [sys.executable, "-m"]
    if torchrun:
        launch += ["torch.distributed.run", "--nnodes=1", "--nproc_per_node=2", "-m"]
    ddp = ["--trainer.accelerator=cpu", "--trainer.devices=2", "--trainer.strategy=ddp"]
    proc = subprocess.run(
        [*launch, module, *args, *ddp],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        timeout=900,
    )
    (tmp_path / f"{module}.log").write_text(proc.stderr)
    assert proc.returncode == 0, proc.stderr[-4000:]
    for rank in (0, 1):  # both ranks joined
        assert f"GLOBAL_RANK: {rank}, MEMBER: {rank + 1}/2" in proc.stderr
    return proc


def _shares(folder: Path) -> list[str]:
    return [f"--trainer.callbacks+={SHARES}", f"--trainer.callbacks.folder={folder}"]


def _agree(uri: str, one: str, two: str, folder: Path) -> None:
    """Runs ``one`` (one process) and ``two`` (two processes) validated the same weights:
    two saw disjoint shares whose union is what one saw, and their ``val/*`` metrics and
    per-case tables are equal."""
    [everything] = [json.loads(p.read_text()) for p in sorted((folder / one).glob("*.json"))]
    ranks = [json.loads(p.read_text()) for p in sorted((folder / two).glob("*.json"))]
    assert len(ranks) == 2 and all(ranks), ranks
    assert len(everything) == len(set(everything)) >= 3
    assert not set(ranks[0]) & set(ranks[1]), ranks
    assert sorted(ranks[0] + ranks[1]) == sorted(everything)

    runs = {name: _run_of(uri, name) for name in (one, two)}
    val = {
        name: {k: v for k, v in run.data.metrics.items() if k.startswith("val/")}
        for name, run in runs.items()
    }
    assert val[one] and set(val[one]) == set(val[two])
    assert val[two] == {k: pytest.approx(v, rel=1e-5, abs=1e-6) for k, v in val[one].items()}
    # The tables, written once (by rank 0) with every case: equal to one process's.
    files = {name: _artifacts(uri, run.info.run_id) for name, run in runs.items()}
    tables = [n for n in files[one] if n.endswith(".csv")]
    assert set(tables) <= set(files[two]), (tables, sorted(files[two]))  # GANs: none
    for name in tables:
        a, b = (pd.read_csv(files[k][name]) for k in (one, two))
        key = a.columns[0]
        pd.testing.assert_frame_equal(
            a.sort_values(key).reset_index(drop=True),
            b.sort_values(key).reset_index(drop=True),
            rtol=1e-5,
        )


@pytest.mark.slow
@pytest.mark.parametrize("task", list(TASKS))
def test_two_processes_train_and_evaluate_every_case_once_as_one_does(
    task: str, tmp_path: Path, tracking_uri: str, brats_root: Path
) -> None:
    """A 2-process fit of one epoch trains the task under DDP; its validation, of the
    weights its checkpoint holds, is a 2-process evaluation, compared with
    ``medlit.evaluate`` of that checkpoint in one process. For BraTS, ``medlit.evaluate``
    itself also runs on 2 processes, under torchrun."""
    base = TASKS[task](tmp_path, tracking_uri, brats_root)
    name = "--trainer.logger.init_args.experiment_name="
    fit = _launch(
        "medlit.fit",
        [*base, "--trainer.max_epochs=1", f"{name}fit", *_shares(tmp_path / "fit")],
        tmp_path,
    )
    assert fit.stdout.count("Test results") == 1  # the summary: rank 0 only
    [ckpt] = sorted(tmp_path.rglob("checkpoints/best-*.ckpt"))
    with_ckpt = [*base, "--ckpt_path", str(ckpt)]
    single = evaluate([*with_ckpt, f"{name}one", *_shares(tmp_path / "one")])
    assert {k: pytest.approx(v) for k, v in single.items()} == {
        k: v for k, v in _run_of(tracking_uri, "one").data.metrics.items() if k.startswith("val/")
    }
    _agree(tracking_uri, "one", "fit", tmp_path)
    if task == "segmentation-brats":
        two = _launch(
            "medlit.evaluate",
            [*with_ckpt, f"{name}two", *_shares(tmp_path / "two")],
            tmp_path,
            torchrun=True,
        )
        assert two.stdout.count("val results") == 1
        _agree(tracking_uri, "one", "two", tmp_path)
        files = {
            n: set(_artifacts(tracking_uri, _run_of(tracking_uri, n).info.run_id))
            for n in ("one", "two")
        }
        assert files["one"] == files["two"]


@pytest.mark.slow
def test_two_nodes_each_cache_their_own_data_and_evaluate_every_case_once(
    tmp_path: Path, tracking_uri: str, brats_root: Path
) -> None:
    """Multi-node as the README runs it: two torchrun launchers on this machine (``--nnodes
    2``, c10d rendezvous on 127.0.0.1, one gloo process each), each "node" with its own
    ``MEDLIT_CACHE_DIR`` (node-local disk). Each node prepares its own cache (once: its
    only process is its local rank 0), the validation of the trained weights covers every
    case exactly once across the nodes, and equals ``medlit.evaluate`` in one process."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    base = brats_segmentation(tmp_path, tracking_uri, brats_root)
    name = "--trainer.logger.init_args.experiment_name="
    command = [
        "-m",
        "medlit.fit",
        *base,
        "--trainer.max_epochs=1",
        f"{name}nodes",
        *_shares(tmp_path / "nodes"),
        "--trainer.accelerator=cpu",
        "--trainer.devices=1",
        "--trainer.num_nodes=2",
        "--trainer.strategy=ddp",
    ]
    launchers = []
    for node in (0, 1):
        rdzv = [
            "--nnodes=2",
            "--nproc_per_node=1",
            f"--node_rank={node}",
            "--rdzv_backend=c10d",
            f"--rdzv_endpoint=127.0.0.1:{port}",
            "--rdzv_id=medlit-two-nodes",
        ]
        env = {
            **os.environ,
            "PYTHONPATH": str(REPO),
            "MEDLIT_CACHE_DIR": str(tmp_path / f"node{node}-cache"),
            "OMP_NUM_THREADS": "1",
        }
        launchers.append(
            subprocess.Popen(
                [sys.executable, "-m", "torch.distributed.run", *rdzv, *command],
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
                cwd=tmp_path,
                env=env,
            )
        )
    outputs = [p.communicate(timeout=900) for p in launchers]
    for p, (_, err) in zip(launchers, outputs, strict=True):
        assert p.returncode == 0, err[-4000:]
    err = "".join(e for _, e in outputs)
    for rank in (0, 1):
        assert f"GLOBAL_RANK: {rank}, MEMBER: {rank + 1}/2" in err
    # Each node built its own cache of every case of the run, and only once.
    for node in (0, 1):
        entries = [p for p in (tmp_path / f"node{node}-cache").glob("brats-*/*/*") if p.is_dir()]
        assert len(entries) == 8, (node, entries)
    [ckpt] = sorted(tmp_path.rglob("checkpoints/best-*.ckpt"))
    evaluate([*base, "--ckpt_path", str(ckpt), f"{name}one", *_shares(tmp_path / "one")])
    _agree(tracking_uri, "one", "nodes", tmp_path)
