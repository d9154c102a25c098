"""Evaluate a checkpoint on an experiment's validation or test cases.

    python -m medlit.evaluate CONFIG --ckpt_path PATH [--split val|test] [overrides ...]
    python -m medlit.evaluate CONFIG --cv_run RUN_ID --split test   (the folds' ensemble)

The metrics are the task's own (BraTS per-case Dice/HD95, LUNA16 FROC/CPM, ISIC AUCs, ...),
computed exactly as during training, and logged to a new MLflow run with the resolved
config. ``--trainer.devices=N --trainer.strategy=ddp`` splits the cases between N
processes; every case is still counted once. The checkpoint is loaded with
``weights_only=True``.

``--ckpt_path`` given several times, or ``--cv_run`` with a ``medlit.cv`` parent run,
scores the ensemble of the checkpoints (every fold's, for ``--cv_run``): their
probabilities averaged (:mod:`medlit.ensemble`). The evaluation run of a ``--cv_run``
ensemble is a child of the parent run (tag ``medlit.cv.role=ensemble``), and the parent
gets its metrics as ``ensemble/<split>/<metric>``.

Segmentations are postprocessed (``--postprocessing``): by default with the steps that
``--cv_run``'s cross-validation chose on its out-of-fold cases (:mod:`medlit.postprocessing`),
``none`` for the raw output, or a ``postprocessing.json``. ``--save_regions DIR`` keeps
each case's raw predicted and reference regions there (``medlit.cv`` chooses the
postprocessing on them).
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from medlit.cli import build, normalise_args, prepare
from medlit.cvruns import record_ensemble
from medlit.datamodules.base import BaseDataModule
from medlit.ensemble import checkpoint_paths, load_members, set_postprocessing
from medlit.errors import ConfigError, exit_process, run_main
from medlit.fit import summary
from medlit.overview import maybe_overview
from medlit.tasks.base import BaseTask
from medlit.tasks.segmentation import SegmentationTask
from medlit.tracking import MLflowTracker

log = logging.getLogger("medlit")


def main(argv: list[str] | None = None) -> dict[str, float]:
    """Returns the metrics of the chosen split (identical on every rank)."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    parser = argparse.ArgumentParser(prog="python -m medlit.evaluate", add_help=False)
    parser.add_argument("--ckpt_path", action="append")
    parser.add_argument("--cv_run", default=None)
    parser.add_argument("--split", choices=("val", "test"), default="val")
    parser.add_argument("--postprocessing", default="auto")
    parser.add_argument("--save_regions", default=None)
    args = list(sys.argv[1:] if argv is None else argv)
    if maybe_overview("medlit.evaluate", args):  # before --ckpt_path is required
        return {}
    ours, rest = parser.parse_known_args(args)
    paths = checkpoint_paths(ours.ckpt_path, ours.cv_run, rest)
    experiment = build(rest)
    model, datamodule, trainer = experiment.model, experiment.datamodule, experiment.trainer
    run = trainer.validate if ours.split == "val" else trainer.test
    applied = set_postprocessing(model, ours.postprocessing, ours.cv_run, rest)
    if ours.save_regions:
        if not isinstance(model, SegmentationTask):
            raise ConfigError("--save_regions: only a segmentation task predicts regions")
        model.regions_dir = Path(ours.save_regions).expanduser()
    if len(paths) == 1:
        prepare(datamodule)  # check and cache, as medlit.fit does
        kwargs = {"ckpt_path": str(paths[0]), "weights_only": True}
        label = paths[0].name
    else:
        if not isinstance(model, BaseTask) or not isinstance(datamodule, BaseDataModule):
            raise ConfigError("an ensemble needs a medlit task and data module")
        # before prepare: the members' data state (a fingerprint) decides the cache
        load_members(model, datamodule, paths, normalise_args(rest)[1])
        prepare(datamodule)
        kwargs = {}
        label = f"an ensemble of {len(paths)} checkpoints"
    results = run(model, datamodule=datamodule, verbose=False, **kwargs)
    metrics = {k: float(v) for k, v in (results[0] if results else {}).items()}
    if trainer.is_global_zero:
        trackers = [lg for lg in trainer.loggers if isinstance(lg, MLflowTracker)]
        for t in trackers:
            t.log_hyperparams(
                {
                    "evaluate.ckpt_path": ",".join(map(str, paths))[:6000],
                    "evaluate.split": ours.split,
                    "evaluate.members": len(paths),
                    "evaluate.postprocessing": applied,
                }
            )
        if ours.cv_run:
            record_ensemble(rest, ours.cv_run, trackers, ours.split, metrics)
        print(summary(metrics, trackers, f"{ours.split} results ({label})"))
    return metrics


if __name__ == "__main__":
    exit_process(run_main(main))
