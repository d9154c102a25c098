"""The speed switches work for every task on CPU: ``trainer.precision: bf16-mixed`` (CPU
autocast to bfloat16), ``channels_last: true`` and ``compile: true``."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from medlit.fit import main as fit
from tests.test_ddp import TASKS

PROBE = "tests.helpers.probe.RecordRuntime"


def probe(folder: Path) -> list[str]:
    return [f"--trainer.callbacks+={PROBE}", f"--trainer.callbacks.folder={folder}"]


@pytest.mark.parametrize("task", list(TASKS))
def test_bf16_mixed_and_channels_last_train_and_evaluate_every_task(
    task: str, tmp_path: Path, tracking_uri: str, brats_root: Path
) -> None:
    base = TASKS[task](tmp_path, tracking_uri, brats_root)
    metrics = fit(
        [
            *base,
            "--trainer.fast_dev_run=1",
            "--trainer.precision=bf16-mixed",
            "--channels_last=true",
            *probe(tmp_path / "probe"),
        ]
    )
    assert metrics and all(v == v for v in metrics.values()), metrics  # evaluated, no NaN
    seen = json.loads((tmp_path / "probe" / "runtime.json").read_text())
    assert seen["autocast"] and seen["autocast_dtype"] == "torch.bfloat16"
    assert seen["weights_channels_last"]
    assert seen["image_channels_last"]


@pytest.mark.slow
def test_compile_compiles_the_networks_in_place(
    tmp_path: Path, tracking_uri: str, brats_root: Path
) -> None:
    torch._dynamo.reset()
    base = TASKS["classification-isic"](tmp_path, tracking_uri, brats_root)
    fit(
        [
            *base,
            "--trainer.max_epochs=1",
            "--trainer.limit_train_batches=2",
            "--trainer.limit_val_batches=1",
            "--trainer.limit_test_batches=1",
            "--compile=true",
            *probe(tmp_path / "probe"),
        ]
    )
    seen = json.loads((tmp_path / "probe" / "runtime.json").read_text())
    assert seen["compiled"] == ["model"]
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] >= 1
    # Checkpoints keep the plain parameter names (no _orig_mod.), loadable without compile.
    [ckpt] = sorted(tmp_path.rglob("checkpoints/best-*.ckpt"))
    state = torch.load(ckpt, map_location="cpu", weights_only=True)["state_dict"]
    assert state and not any("_orig_mod" in k for k in state)
