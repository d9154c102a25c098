"""Smoke test of the benchmark suite (``python -m benchmarks``): it runs end to end on tiny
sizes and its table has every comparison with a numeric ratio. The numbers themselves
are not checked: at these sizes they mean nothing."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

from benchmarks.__main__ import main
from benchmarks.inference3d import PEER

ROWS = (
    "medlit vs per-sample reader",
    "medlit vs MONAI CacheDataset + DataLoader",
    "medlit vs MONAI CacheDataset + ThreadDataLoader (one thread",
    "medlit vs MONAI CacheDataset + ThreadDataLoader (thread workers",
    "data pipeline memory",
    "medlit.fit vs a hand-written PyTorch loop",
    "medlit `predict_volume` vs MONAI `SliceInferer`",
    "no mirroring: medlit `predict_volume` vs MONAI `SlidingWindowInferer`",
    "medlit vs the official scorer (brats-evaluation, its GLI config",
    "medlit vs the official scorer trimmed to the same work",
    "medlit vs MONAI `compute_dice`",
    "values equal to the official scorer's",
    "LUNA16 CT",
    "Start-up growth, LUNA16",
    "Start-up growth, BraTS",
    "Start-up growth, ISIC 2019",
    "every sample from its own augmented volume): medlit vs torchio's `Queue`",
    "medlit's MLflowTracker vs Lightning's MLFlowLogger",
    "One `medlit.sweep` trial beyond its training",
    "training step, medlit (Lightning) vs Ultralytics `model.train`",
    "test CPM of the final weights (medlit's LUNA16 evaluation)",
)
# nnU-Net v2's rows need its environment (bash benchmarks/peers/nnunet.sh; .ci/run makes it).
NNUNET_ROWS = (
    "a third foreground): medlit vs nnU-Net v2's data loader",
    "8 mirrorings: medlit `predict_volume` vs nnU-Net v2 `nnUNetPredictor`",
)


@pytest.mark.slow
def test_the_suite_runs_on_tiny_sizes_and_reports_every_comparison(tmp_path: Path) -> None:
    report = main(["--tiny", "--output", str(tmp_path / "benchmarks.md")]).read_text()
    table = [line for line in report.splitlines() if line.startswith("| ") and " | " in line]
    with_nnunet = PEER.exists() or os.environ.get("MEDLIT_REQUIRE_SERVICES") == "1"
    for name in (*ROWS, *NNUNET_ROWS) if with_nnunet else ROWS:
        [row] = [line for line in table if name in line]
        cells = [c.strip() for c in row.strip("|").split(" | ")]
        assert len(cells) == 6, row
        assert re.fullmatch(r"-?\d+(\.\d+)?", cells[3]), f"ratio of {name!r} is {cells[3]!r}"
        assert cells[5] in ("yes", "**no**"), row
    assert "GPU rows were not measured" in report
    assert "HD95 definitions and measured differences" in report


@pytest.mark.slow
def test_the_gpu_module_runs_its_training_steps(tmp_path: Path) -> None:
    """``--only gpu`` on this CPU machine: ``--tiny`` runs each network's demo for a few
    fp32 steps on the CPU (the same processes and step clock a GPU run has), and the
    report has a row per network with its share of time waiting for data."""
    report = main(
        [
            "--tiny",
            "--only",
            "gpu",
            "--gpu-output",
            str(tmp_path / "gpu.md"),
            "--workdir",
            str(tmp_path / "work"),
        ]
    ).read_text()
    from benchmarks.gpu import MODELS

    for name in MODELS:
        [row] = [line for line in report.splitlines() if line.startswith(f"| {name} training")]
        cells = [c.strip() for c in row.strip("|").split(" | ")]
        assert re.fullmatch(r"\d+ images/s; \d+\.\d % waiting", cells[1]), row
        assert 0 <= float(cells[3]) < 1, row


def test_quality_targets_margins_and_report() -> None:
    """``--only quality``'s pieces without its hour of training: a criterion's margin in
    units of the span to the trivial baseline, both directions, and the report's rows."""
    from benchmarks import quality as q

    [dice] = q.DEMOS[0].criteria
    good = dice.check(q.Outcome({"test/dice_WT": 0.9}))
    assert good.met and good.margin == pytest.approx(0.125)  # (0.9 - 0.8) / (0.8 - 0)
    assert not dice.check(q.Outcome({"test/dice_WT": 0.79})).met
    gan = next(d for d in q.DEMOS if d.name == "ISIC GAN")
    fd, diversity = gan.criteria
    curves = {
        "val/fd_resnet18_random": [100.0, 40.0, 20.0, 25.0, 30.0],
        "val/diversity": [1.0, 3.0, 3.2, 3.1],
        "val/diversity_real": [4.0],
    }
    done = q.Outcome({}, curves)
    assert fd.check(done).value == pytest.approx(0.2) and fd.check(done).met  # lower wins
    assert fd.check(done).margin == pytest.approx(0.1 / 0.7)
    assert diversity.check(done).value == pytest.approx(3.0 / 4.0)
    with pytest.raises(KeyError, match="val/diversity was not logged"):
        diversity.check(q.Outcome({}, {}))
    results = [
        q.Result(q.DEMOS[0], [good], 61.0, (0.5, 1.5)),
        q.Result(q.SWEEP, [], 5.0, (1.0, 1.0), "exit 2: no such study"),
    ]
    report = q.render(results, 66.0, "python -m benchmarks --only quality")
    [row] = [line for line in report.splitlines() if line.startswith("| BraTS U-Net |")]
    assert "| test WT Dice | 0.9 | ≥ 0.80 (0.8) | 0 | yes | 1.0 min | 0.5 → 1.5 |" in row
    assert "| BraTS sweep |" in report and "**no**" in report and "no such study" in report
