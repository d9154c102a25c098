"""EpochLine: one line per validation with the monitored metric and its best so far, the
best carried across a resume; the progress bar's metrics fit 80 columns."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from medlit.callbacks import LastCheckpoint
from medlit.curves import LearningCurves
from medlit.progress import EpochLine, MedlitTQDMProgressBar
from tests.test_curves import TinyTask, fit, loader

LINE = re.compile(
    r"epoch (\d+)/(\d+)  train/loss [\d.]+  val/loss [\d.]+  val/score (-?[\d.]+)  "
    r"best (-?[\d.]+) \(epoch (\d+)\)  [\d.]+ s"
)


def lines(out: str) -> list[tuple[int, int, float, float, int]]:
    found = [LINE.fullmatch(ln) for ln in out.splitlines() if ln.startswith("epoch ")]
    assert all(found), out
    return [(int(m[1]), int(m[2]), float(m[3]), float(m[4]), int(m[5])) for m in found if m]


def test_one_line_per_validation_with_the_best_so_far(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    line = EpochLine()
    fit(tmp_path, 3, LearningCurves(), callbacks=[line])
    seen = lines(capsys.readouterr().out)
    # val/score is -|epoch - 1|: it peaks at the second epoch (counted from 1: epoch 2).
    assert [(n, total) for n, total, *_ in seen] == [(1, 3), (2, 3), (3, 3)]
    assert [v for _, _, v, _, _ in seen] == [-1.0, 0.0, -1.0]
    assert [(b, e) for *_, b, e in seen] == [(-1.0, 1), (0.0, 2), (0.0, 2)]
    assert (line.best, line.best_epoch) == (0.0, 1)  # Lightning's count, from 0


def test_a_resumed_run_goes_on_from_the_real_best(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    last = LastCheckpoint()
    first = fit(
        tmp_path, 2, LearningCurves(), callbacks=[EpochLine(), last], enable_checkpointing=True
    )
    assert first.current_epoch == 2
    capsys.readouterr()
    fit(
        tmp_path,
        3,
        LearningCurves(),
        callbacks=[EpochLine(), LastCheckpoint()],
        enable_checkpointing=True,
        ckpt_path=last.last_model_path,
    )
    [(n, _, value, best, at)] = lines(capsys.readouterr().out)
    assert (n, value, best, at) == (3, -1.0, 0.0, 2)  # the best of the first run's epochs


def test_the_bar_shows_the_step_loss_only() -> None:
    from pytorch_lightning import Trainer

    bar = MedlitTQDMProgressBar()
    trainer = Trainer(max_epochs=1, callbacks=[bar], logger=False, enable_checkpointing=False)
    trainer.fit(TinyTask(), loader())
    shown = bar.get_metrics(trainer, trainer.lightning_module)
    assert "v_num" not in shown and "train/loss_epoch" not in shown
    assert set(shown) <= {"loss"}
