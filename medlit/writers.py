"""Prediction writers: one Lightning ``BasePredictionWriter`` per output format.

A task's ``predict_step`` returns its predictions; it writes nothing. ``medlit.predict``
attaches the writer the task names (:meth:`medlit.tasks.base.BaseTask.prediction_writer`),
and the writer hands the predictions to the data module's ``write_*`` method, which
knows the dataset's own file format (BraTS NIfTI labels, ISIC mask PNGs and submission
CSVs, the LUNA16 submission CSV). Under DDP every rank predicts a share of the inputs:
per-case files are written by the rank that predicted the case, one-file outputs by
rank 0 after every rank's share is gathered.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from pytorch_lightning import LightningModule, Trainer
from pytorch_lightning.callbacks import BasePredictionWriter

from medlit.datamodules.base import BaseDataModule
from medlit.datasets.io.files import atomic_write
from medlit.datasets.io.viewers import write_label_descriptions
from medlit.errors import ConfigError


def _data(trainer: Trainer) -> BaseDataModule:
    dm = trainer.datamodule
    if not isinstance(dm, BaseDataModule):
        raise ConfigError(f"{type(dm).__name__} is not a medlit data module: no output format")
    return dm


class _Writer(BasePredictionWriter):
    """A writer into the folder ``output``, per batch or once per epoch."""

    interval_name = "batch"

    def __init__(self, output: Path) -> None:
        super().__init__(self.interval_name)
        self.output = output
        self.written: list[Path] = []  # by this process, in this run
        self.tables: list[Path] = []  # one-per-run files beside them (volumes.csv, ...)


class CaseWriter(_Writer):
    """Segmentation: each case as soon as its batch is predicted, through
    ``write_prediction`` (``prediction``: a list of ``{"case_id", "regions", "meta"}``,
    with ``measures`` for volumes and the per-case uncertainty, and ``uncertainty``, a
    per-voxel map written by ``write_map``); then the tables of the whole run."""

    def __init__(self, output: Path) -> None:
        super().__init__(output)
        self.rows: list[dict[str, Any]] = []
        self.by_case: dict[str, Path] = {}  # case id -> its label file (DICOM SEG's source)

    def write_on_batch_end(
        self,
        trainer: Trainer,
        pl_module: LightningModule,
        prediction: list[dict[str, Any]],
        batch_indices: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int,
    ) -> None:
        dm = _data(trainer)
        for case in prediction:
            path = dm.write_prediction(
                case["case_id"], case["regions"], self.output, case.get("meta")
            )
            self.written.append(path)
            self.by_case[case["case_id"]] = path
            for name, values in case.get("maps", {}).items():  # --explain
                self.written.append(
                    dm.write_map(case["case_id"], values, self.output, case.get("meta"), name)
                )
            if "uncertainty" in case:  # medlit.predict --uncertainty: the map beside it
                self.written.append(
                    dm.write_map(
                        case["case_id"], case["uncertainty"], self.output, case.get("meta")
                    )
                )
            if "measures" in case:
                self.rows.append({"case_id": case["case_id"], **case["measures"]})

    def on_predict_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """After every case: ``volumes.csv`` (each case's predicted volume in mL and
        connected components per region; with ``--uncertainty``, its mean over the case
        and over the predicted foreground) and, where the data module names its label
        values, the label descriptions ITK-SNAP and 3D Slicer load beside the label maps
        (rank 0; the rows of every rank gathered)."""
        rows = pl_module.gather_rows(self.rows)  # a collective: every rank calls it
        if not trainer.is_global_zero:
            return
        dm = _data(trainer)
        if rows:
            table = pd.DataFrame(rows).set_index("case_id")
            atomic_write(path := self.output / "volumes.csv", lambda p: table.to_csv(p))
            self.tables.append(path)
        if names := dm.label_names():
            self.tables += write_label_descriptions(self.output, names)


class _Gathered(_Writer):
    """One file of every rank's predictions (a list of dicts keyed by ``case_id`` per
    batch), written by rank 0 with :meth:`write`."""

    interval_name = "epoch"

    def write_on_epoch_end(
        self,
        trainer: Trainer,
        pl_module: LightningModule,
        predictions: list[Any],
        batch_indices: Any,
    ) -> None:
        rows = [row for batch in predictions for row in batch]
        rows = pl_module.gather_rows(rows)  # every rank's items once, sorted by id
        if trainer.is_global_zero and rows:
            self.written.append(self.write(_data(trainer), pl_module, rows))

    def write(self, dm: BaseDataModule, pl_module: LightningModule, rows: list[dict]) -> Path:
        raise NotImplementedError


class SubmissionWriter(_Gathered):
    """Classification: ``submission.csv`` of every item's class probabilities, in the
    dataset's submission format (``write_submission``); rows ``{"case_id", "probs"}``
    (and ``uncertainty``: then ``uncertainty.csv`` beside it, one value per image)."""

    def write(self, dm: BaseDataModule, pl_module: LightningModule, rows: list[dict]) -> Path:
        ids = [r["case_id"] for r in rows]
        probs = np.array([r["probs"] for r in rows], dtype=np.float64)
        path = self.output / "submission.csv"
        dm.write_submission(path, ids, probs, pl_module.class_names)
        if rows and "uncertainty" in rows[0]:  # medlit.predict --uncertainty
            kind = getattr(pl_module, "uncertainty", None) or "uncertainty"
            table = pd.DataFrame({"image": ids, kind: [r["uncertainty"] for r in rows]})
            atomic_write(
                extra := self.output / "uncertainty.csv", lambda p: table.to_csv(p, index=False)
            )
            self.tables.append(extra)
        return path


class DetectionWriter(_Gathered):
    """Detection: ``submission.csv`` of every scan's scored findings, in the dataset's
    format (``write_detections``); rows ``{"case_id", "marks"}``."""

    def write(self, dm: BaseDataModule, pl_module: LightningModule, rows: list[dict]) -> Path:
        path = self.output / "submission.csv"
        dm.write_detections(path, pd.concat([r["marks"] for r in rows]))
        return path
