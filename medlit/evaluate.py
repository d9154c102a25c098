"""Evaluate a checkpoint on an experiment's validation or test cases.

    python -m medlit.evaluate CONFIG --ckpt_path PATH [--split val|test] [overrides ...]

The metrics are the task's own (BraTS per-case Dice/HD95, LUNA16 FROC/CPM, ISIC AUCs, ...),
computed exactly as during training, and logged to a new MLflow run with the resolved
config. ``--trainer.devices=N --trainer.strategy=ddp`` splits the cases between N
processes; every case is still counted once. The checkpoint is loaded with
``weights_only=True``.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from medlit.checkpoints import load_checkpoint
from medlit.cli import build, prepare
from medlit.errors import run_main
from medlit.fit import summary
from medlit.overview import maybe_overview
from medlit.tracking import MLflowTracker

log = logging.getLogger("medlit")


def main(argv: list[str] | None = None) -> dict[str, float]:
    """Returns the metrics of the chosen split (identical on every rank)."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    parser = argparse.ArgumentParser(prog="python -m medlit.evaluate", add_help=False)
    parser.add_argument("--ckpt_path", required=True)
    parser.add_argument("--split", choices=("val", "test"), default="val")
    args = list(sys.argv[1:] if argv is None else argv)
    if maybe_overview("medlit.evaluate", args):  # before --ckpt_path is required
        return {}
    ours, rest = parser.parse_known_args(args)
    ckpt = Path(ours.ckpt_path).expanduser()
    load_checkpoint(ckpt)  # refused here, naming the file, if it is not safe to load
    experiment = build(rest)
    model, datamodule, trainer = experiment.model, experiment.datamodule, experiment.trainer
    prepare(datamodule)  # check and cache, as medlit.fit does
    run = trainer.validate if ours.split == "val" else trainer.test
    results = run(
        model, datamodule=datamodule, ckpt_path=str(ckpt), verbose=False, weights_only=True
    )
    metrics = {k: float(v) for k, v in (results[0] if results else {}).items()}
    if trainer.is_global_zero:
        trackers = [lg for lg in trainer.loggers if isinstance(lg, MLflowTracker)]
        for t in trackers:
            t.log_hyperparams({"evaluate.ckpt_path": str(ckpt), "evaluate.split": ours.split})
        print(summary(metrics, trackers, f"{ours.split} results ({ckpt.name})"))
    return metrics


if __name__ == "__main__":
    sys.exit(run_main(main))
