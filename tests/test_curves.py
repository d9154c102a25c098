"""LearningCurves: one PNG per run, from a real (tiny) Trainer, and across a resume."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from mlflow import MlflowClient
from PIL import Image
from pytorch_lightning import Trainer
from torch.utils.data import DataLoader, TensorDataset

from medlit.callbacks import LastCheckpoint
from medlit.curves import LearningCurves, best_epoch, epoch_values, plot_curves
from medlit.tasks.base import BaseTask
from medlit.tracking import MLflowTracker


class TinyTask(BaseTask):
    """A linear regression with medlit's task template: the training loss per step and
    epoch, validation rows scored per batch and logged at the stage's end, like the real
    tasks. ``val/score`` peaks at epoch 1, so that the best epoch is known."""

    monitor = "val/score"
    mode = "max"

    def __init__(self, lr: float = 0.05) -> None:
        super().__init__()
        self._losses: list[torch.Tensor] = []

    def configure_models(self) -> None:
        self.net = torch.nn.Linear(4, 1)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=self.hparams["lr"])

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        loss = F.mse_loss(self.net(x), y)
        self.log_train_loss(loss, len(x))
        return loss

    def evaluate_batch(self, batch: Any, stage: str) -> None:
        x, y = batch
        self._losses.append(F.mse_loss(self.net(x), y).detach())

    def finish_stage(self, stage: str) -> None:
        self.log(f"{stage}/loss", torch.stack(self._losses).mean())
        self.log(f"{stage}/score", -abs(self.current_epoch - 1.0))
        self._losses.clear()


def loader() -> DataLoader:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(16, 4, generator=g)
    return DataLoader(TensorDataset(x, x.sum(1, keepdim=True)), batch_size=8)


def fit(root: Path, epochs: int, curves: LearningCurves, **kwargs: Any) -> Trainer:
    ckpt_path = kwargs.pop("ckpt_path", None)
    trainer = Trainer(
        max_epochs=epochs,
        default_root_dir=root,
        accelerator="cpu",
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[curves, *kwargs.pop("callbacks", [])],
        **{"logger": False, "enable_checkpointing": False, **kwargs},
    )
    trainer.fit(TinyTask(), loader(), loader(), ckpt_path=ckpt_path)
    return trainer


def assert_png(path: Path) -> None:
    with Image.open(path) as image:
        image.verify()  # a complete, valid PNG
    with Image.open(path) as image:
        assert image.format == "PNG" and image.width >= 600 and image.height >= 300


def test_one_row_per_epoch_and_a_png_at_the_end(tmp_path: Path) -> None:
    curves = LearningCurves()
    trainer = fit(tmp_path, 3, curves)
    trainer.validate(trainer.lightning_module, loader())  # after fit: no epoch of training
    # The sanity check's validation is no epoch; each row has both stages' values.
    assert [r["epoch"] for r in curves.history] == [0, 1, 2]
    assert all(set(r) == {"epoch", "train/loss", "val/loss", "val/score"} for r in curves.history)
    assert curves.monitor == "val/score" and curves.mode == "max"
    assert best_epoch(curves.history, "val/score", "max") == 1
    assert_png(tmp_path / "learning_curves.png")  # no logger: the trainer's folder


def test_a_resumed_run_draws_every_epoch(tmp_path: Path) -> None:
    first = LearningCurves()
    fit(tmp_path, 2, first, callbacks=[LastCheckpoint()], enable_checkpointing=True)
    (last,) = tmp_path.rglob("last.ckpt")
    resumed = LearningCurves()
    fit(
        tmp_path,
        4,
        resumed,
        callbacks=[LastCheckpoint()],
        enable_checkpointing=True,
        ckpt_path=last,
    )
    assert [r["epoch"] for r in resumed.history] == [0, 1, 2, 3]
    assert resumed.history[:2] == first.history  # the first two epochs from the checkpoint
    assert_png(tmp_path / "learning_curves.png")


def test_the_png_is_a_run_artifact_and_the_monitor_a_tag(tmp_path: Path, tracking_uri: str) -> None:
    tracker = MLflowTracker(experiment_name="curves", tracking_uri=tracking_uri, log_model=False)
    fit(tmp_path, 2, LearningCurves(), logger=tracker)
    client = MlflowClient(tracking_uri)
    run = client.get_run(tracker.run_id)
    assert [a.path for a in client.list_artifacts(tracker.run_id)] == ["learning_curves.png"]
    assert run.data.tags["medlit.monitor"] == "val/score" and run.data.tags["medlit.mode"] == "max"
    assert_png(
        Path(client.download_artifacts(tracker.run_id, "learning_curves.png", str(tmp_path)))
    )


def test_state_round_trip() -> None:
    curves = LearningCurves()
    curves.history = [
        {"epoch": 0, "train/loss": 1.0},
        {"epoch": 1, "train/loss": 0.5, "val/score": 0.2},
    ]
    again = LearningCurves()
    again.load_state_dict(curves.state_dict())
    assert again.history == curves.history and again.history is not curves.history


def test_gan_losses_and_a_min_monitor_are_plotted(tmp_path: Path) -> None:
    # A GAN logs a loss per network and no validation loss; its monitor (a Fréchet
    # distance) is best at its minimum. Epoch 3's value is not finite: left out.
    metrics = {
        "train/d_loss": 0.7,
        "train/d_loss_step": 0.1,
        "train/d_loss_epoch": 0.6,
        "train/g_adv": 2.0,
    }
    assert epoch_values(metrics, "train/", losses_only=False) == {
        "train/d_loss": 0.6,
        "train/g_adv": 2.0,
    }
    assert epoch_values({"val/loss": 1.0, "val/fd": 9.0}, "val/", losses_only=True) == {
        "val/loss": 1.0
    }
    history = [
        {"epoch": e, "train/d_loss": 0.7 - 0.1 * e, "train/g_adv": 2.0 + e, "val/fd": fd}
        for e, fd in enumerate([30.0, 12.0, 9.0, float("nan"), 11.0])
    ]
    assert best_epoch(history, "val/fd", "min") == 2
    assert best_epoch(history, "val/psnr", "max") is None
    plot_curves(history, "val/fd", "min", tmp_path / "gan.png")
    assert_png(tmp_path / "gan.png")
    plot_curves(history[:1], None, "min", tmp_path / "losses_only.png")  # no monitor: one panel
    with Image.open(tmp_path / "losses_only.png") as image:
        small = image.width
    with Image.open(tmp_path / "gan.png") as image:
        assert small < image.width


@pytest.mark.parametrize("mode", ["min", "max"])
def test_ties_pick_the_first_best_epoch(mode: str) -> None:
    history = [{"epoch": 0, "m": 1.0}, {"epoch": 1, "m": 1.0}]
    assert best_epoch(history, "m", mode) == 0  # type: ignore[arg-type]
