"""Smoke test of the benchmark suite (``python -m benchmarks``): it runs end to end on tiny
sizes and its table has every comparison with a numeric ratio. The numbers themselves
are not checked: at these sizes they mean nothing."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from benchmarks.__main__ import main

ROWS = (
    "medlit vs per-sample reader",
    "medlit vs MONAI CacheDataset + DataLoader",
    "medlit vs MONAI CacheDataset + ThreadDataLoader",
    "data pipeline memory",
    "medlit.fit vs a hand-written PyTorch loop",
    "medlit `predict_volume` vs MONAI `SliceInferer`",
    "medlit vs the official scorer",
    "medlit vs MONAI `compute_dice`",
    "values equal to the official scorer's",
    "LUNA16 CT",
)


@pytest.mark.slow
def test_the_suite_runs_on_tiny_sizes_and_reports_every_comparison(tmp_path: Path) -> None:
    report = main(["--tiny", "--output", str(tmp_path / "benchmarks.md")]).read_text()
    table = [line for line in report.splitlines() if line.startswith("| ") and " | " in line]
    for name in ROWS:
        [row] = [line for line in table if name in line]
        cells = [c.strip() for c in row.strip("|").split(" | ")]
        assert len(cells) == 6, row
        assert re.fullmatch(r"\d+(\.\d+)?", cells[3]), f"ratio of {name!r} is {cells[3]!r}"
        assert cells[5] in ("yes", "**no**"), row
    assert "GPU rows were not measured" in report
    assert "HD95 definitions and measured differences" in report
