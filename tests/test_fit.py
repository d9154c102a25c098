"""The real entry point, ``medlit.fit``, on tiny generated BraTS data, on CPU."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import mlflow
import pytest
import torch
import yaml

from medlit.datasets.io.volume import read_volume, write_volume
from medlit.errors import ConfigError, DatasetNotFoundError, InvalidCaseError, NonFiniteLossError
from medlit.fit import main
from medlit.tasks import SegmentationTask
from medlit.usage import UsageError
from tests.helpers.shared import Trained

REPO = Path(__file__).resolve().parents[1]
DEMO = str(REPO / "experiments/demo/brats_unet.yaml")


def tiny(root: Path, tracking_uri: str, *extra: str) -> list[str]:
    """The demo experiment shrunk to seconds: a tiny timm encoder, 32 px patches."""
    return [
        DEMO,
        f"--trainer.default_root_dir={root.parent}",
        f"--data.root={root}",
        "--data.demo=false",
        "--data.patch_size=32",
        "--data.loader.batch_size=4",
        "--data.samples_per_epoch=8",
        "--data.loader.num_workers=0",
        "--data.split.val_fraction=0.25",
        "--data.split.test_fraction=0.25",
        "--model.encoder=tu-test_resnet",
        "--model.model_kwargs={decoder_channels: [32, 16, 16, 8, 8]}",
        "--model.inference_batch_size=8",
        f"--trainer.logger.init_args.tracking_uri={tracking_uri}",
        "--trainer.logger.init_args.experiment_name=test",
        "--trainer.enable_progress_bar=false",
        "--trainer.enable_model_summary=false",
        *extra,
    ]


def cli_args(root: Path, tracking_uri: str, *extra: str) -> list[str]:
    """Overrides every integration test shares: its own data root (no demo writing), runs
    in its own tracking store, no worker processes, quiet output."""
    return [
        f"--trainer.default_root_dir={root.parent}",
        f"--data.root={root}",
        "--data.demo=false",
        "--data.loader.num_workers=0",
        f"--trainer.logger.init_args.tracking_uri={tracking_uri}",
        "--trainer.logger.init_args.experiment_name=test",
        "--trainer.enable_progress_bar=false",
        "--trainer.enable_model_summary=false",
        *extra,
    ]


def tiny_classifier(root: Path, tracking_uri: str, *extra: str) -> list[str]:
    """The ISIC classifier demo shrunk to seconds on an ISIC 2019 layout at ``root``: 32 px
    images, timm's ``test_resnet``, no Grad-CAM."""
    return [
        str(REPO / "experiments/demo/isic_classifier.yaml"),
        *cli_args(root, tracking_uri),
        "--data.image_size=32",
        "--data.loader.batch_size=8",
        "--model.model=test_resnet",
        "--model.num_classes=8",
        "--model.num_cam_images=0",
        *extra,
    ]


def _runs(tracking_uri: str) -> list[mlflow.entities.Run]:
    client = mlflow.MlflowClient(tracking_uri)
    return client.search_runs([e.experiment_id for e in client.search_experiments()])


def _artifacts(tracking_uri: str, run_id: str, path: str | None = None) -> list[str]:
    client = mlflow.MlflowClient(tracking_uri)
    out = []
    for f in client.list_artifacts(run_id, path):
        out += _artifacts(tracking_uri, run_id, f.path) if f.is_dir else [f.path]
    return out


def test_fit_tests_the_best_checkpoint_and_tracks_the_run(brats_unet: Trained) -> None:
    metrics = brats_unet.metrics  # what main() returned (the session's trained U-Net)
    assert {f"test/{m}_{r}" for m in ("dice", "hd95") for r in ("WT", "TC", "ET")} <= set(metrics)
    assert 0 <= metrics["test/dice_mean"] <= 1
    out = brats_unet.stdout
    assert "Test results (best checkpoint)" in out and "mlflow ui --backend-store-uri" in out
    assert "#/experiments/" in out and "best val/" in out and "viewStateShareKey" in out

    tracking_uri = brats_unet.tracking_uri
    client = mlflow.MlflowClient(tracking_uri)
    [run] = client.search_runs([client.get_experiment_by_name(brats_unet.experiment).experiment_id])
    assert run.info.status == "FINISHED"
    assert run.data.tags["data"] == "synthetic"
    assert run.data.tags["task"] == "SegmentationTask"
    assert len(run.data.tags["git_commit"]) >= 7 and "version.torch" in run.data.tags
    assert run.data.params["model.init_args.lr"] == "0.003"  # the short override landed
    assert run.data.params["data.init_args.patch_size"] == "32"
    history = client.get_metric_history(run.info.run_id, "val/dice_WT")
    assert len(history) == 2  # one value per epoch
    assert client.get_metric_history(run.info.run_id, "train/loss_epoch")
    assert run.data.metrics["test/dice_mean"] == pytest.approx(metrics["test/dice_mean"])

    files = _artifacts(tracking_uri, run.info.run_id)
    assert {
        "config.yaml",
        "versions.yaml",
        "val_per_case.csv",
        "test_per_case.csv",
        "test_slices.png",
        "val_slices/epoch_000.png",
    } <= set(files)
    assert any(f.endswith(".ckpt") for f in files)
    # The run finished: its last.ckpt (read only to resume) is gone, and the best
    # checkpoint's artifact is the file in checkpoints/ (a hard link), not a second copy.
    best = brats_unet.ckpt
    assert not (best.parent / "last.ckpt").exists()
    assert (Path(run.info.artifact_uri) / best.stem / best.name).samefile(best)
    local = Path(client.download_artifacts(run.info.run_id, "config.yaml"))
    config = yaml.safe_load(local.read_text())
    assert config["model"]["class_path"] == "medlit.tasks.SegmentationTask"
    table = Path(client.download_artifacts(run.info.run_id, "test_per_case.csv")).read_text()
    assert len(table.strip().splitlines()) == 1 + 2  # header + the 2 held-out test cases


def test_image_artefacts_can_be_switched_off(brats_root: Path, tracking_uri: str) -> None:
    """Also: ``--keep_last_checkpoint=true`` keeps a finished run's last.ckpt."""
    main(
        tiny(
            brats_root,
            tracking_uri,
            "--trainer.max_epochs=1",
            "--model.log_images=false",
            "--keep_last_checkpoint=true",
        )
    )
    [run] = _runs(tracking_uri)
    files = _artifacts(tracking_uri, run.info.run_id)
    # No picture of the data; the learning curves show none (losses and metrics only).
    pictures = [f for f in files if f.endswith(".png") and f != "learning_curves.png"]
    assert "test_per_case.csv" in files and not pictures
    store = Path(tracking_uri.removeprefix("sqlite:///")).parent
    assert (store / run.info.experiment_id / run.info.run_id / "checkpoints/last.ckpt").is_file()


@pytest.mark.parametrize(
    "extra",
    [
        ["--model.arch=deeplabv3plus", "--model.model_kwargs={decoder_channels: 32}"],
        ["--model.arch=unetplusplus", "--model.model_kwargs={decoder_channels: [16, 16, 8, 8, 8]}"],
        ["--data.context_slices=1", "--model.in_channels=12"],  # 2.5D
        [
            "--data.target=labels",
            "--model.target=labels",
            "--model.num_classes=4",
            "--model.class_to_region=[[1, 2, 3], [1, 3], [3]]",
        ],
    ],
)
def test_fast_dev_run_variants(brats_root: Path, tracking_uri: str, extra: list[str]) -> None:
    metrics = main(tiny(brats_root, tracking_uri, "--trainer.fast_dev_run=1", *extra))
    assert {"test/dice_WT", "test/dice_TC", "test/dice_ET", "test/hd95_WT"} <= set(metrics)


def test_unknown_key_fails_at_parse_time(
    brats_root: Path, tracking_uri: str, capsys: pytest.CaptureFixture
) -> None:
    with pytest.raises(UsageError) as e:  # the command prints it and exits with 2
        main(tiny(brats_root, tracking_uri, "--model.init_args.lrr=0.1"))
    assert "unknown key model.lrr (from flag --model.init_args.lrr=0.1)" in str(e.value)


def test_invalid_value_fails_at_parse_time(
    brats_root: Path, tracking_uri: str, capsys: pytest.CaptureFixture
) -> None:
    with pytest.raises(UsageError) as e:
        main(tiny(brats_root, tracking_uri, "--model.target=voxels"))
    assert str(e.value).startswith("model.target=voxels (from flag --model.target=voxels): ")


def test_print_config_shows_overrides(capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as e:
        main([DEMO, "--model.lr=3e-4", "--print_config"])
    assert e.value.code == 0
    config = yaml.safe_load(capsys.readouterr().out)
    assert config["model"]["init_args"]["lr"] == 3e-4
    assert config["data"]["class_path"] == "medlit.datamodules.BraTSDataModule"


def test_help_lists_documented_arguments(capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit):
        main([DEMO, "--model.help", "medlit.tasks.SegmentationTask"])
    out = capsys.readouterr().out
    assert "--model.encoder_weights" in out and "local state-dict file" in out


def test_broken_case_stops_before_any_run(
    brats_root: Path, tracking_uri: str, _private_cache: Path
) -> None:
    seg = sorted(brats_root.glob("*/*_seg.nii.gz"))[4]
    array, geom = read_volume(seg)
    array[array == 4] = 3  # a 2023 label in a 2021 case
    write_volume(array, geom, seg)
    with pytest.raises(InvalidCaseError, match=r"label values \[3\]") as e:
        main(tiny(brats_root, tracking_uri, "--trainer.max_epochs=1"))
    assert e.value.path == seg
    db = Path(tracking_uri.removeprefix("sqlite:///"))
    if db.exists():
        assert sqlite3.connect(db).execute("select count(*) from runs").fetchone()[0] == 0
    assert not list(_private_cache.rglob(f"{seg.parent.name}-*"))


def test_nan_loss_stops_the_run(
    brats_root: Path, tracking_uri: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = SegmentationTask.compute_loss

    def nan_after_two(self, logits, target):
        loss = real(self, logits, target)
        return loss * torch.nan if self.global_step >= 2 else loss

    monkeypatch.setattr(SegmentationTask, "compute_loss", nan_after_two)
    with pytest.raises(NonFiniteLossError, match="training loss is nan at epoch 0, batch 2"):
        main(
            tiny(brats_root, tracking_uri, "--trainer.max_epochs=3", "--data.samples_per_epoch=40")
        )
    [run] = _runs(tracking_uri)
    assert run.info.status == "FAILED"


def test_channel_mismatch_is_refused_before_training(brats_root: Path, tracking_uri: str) -> None:
    with pytest.raises(ConfigError, match="in_channels=4 but the data module yields 12"):
        main(tiny(brats_root, tracking_uri, "--data.context_slices=1"))


@pytest.mark.parametrize("extra", [[], ["--trainer.max_steps=50"]], ids=["forever", "steps"])
def test_max_epochs_forever_is_refused_before_a_run_opens(
    brats_root: Path, tracking_uri: str, extra: list[str]
) -> None:
    """Lightning's max_epochs=-1 gave the per-epoch cosine schedule a length of one epoch:
    the learning rate flipped between its peak and its floor every epoch."""
    before = len(_runs(tracking_uri))
    with pytest.raises(ConfigError, match=r"trainer.max_epochs=-1.* leaves the cosine"):
        main(tiny(brats_root, tracking_uri, "--trainer.max_epochs=-1", *extra))
    assert len(_runs(tracking_uri)) == before


def test_real_data_experiments_point_to_the_demo(
    tmp_path: Path, tracking_uri: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)  # data/BraTS2021 does not exist here
    for name in ("brats_unet", "brats_deeplabv3plus"):
        with pytest.raises(DatasetNotFoundError, match="synapse.*medlit.fit experiments/demo"):
            main(
                [
                    str(REPO / f"experiments/{name}.yaml"),
                    f"--trainer.logger.init_args.tracking_uri={tracking_uri}",
                ]
            )


def test_command_line_error_is_one_clear_line(tmp_path: Path) -> None:
    """``python -m medlit.fit`` with a missing dataset: exit code 2, no traceback."""
    import subprocess
    import sys

    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "medlit.fit",
            str(REPO / "experiments/brats_unet.yaml"),
            f"--data.root={tmp_path}/missing",
            f"--trainer.logger.init_args.tracking_uri=sqlite:///{tmp_path}/mlflow.db",
        ],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=300,
    )
    assert proc.returncode == 2
    assert f"medlit: error: BraTS root {tmp_path}/missing does not exist" in proc.stderr
    assert "Traceback" not in proc.stderr
