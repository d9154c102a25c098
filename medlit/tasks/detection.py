"""DetectionTask: an Ultralytics YOLO network trained inside Lightning on 2.5D slices,
evaluated per scan as LUNA16 evaluates (slice detections merged into 3D candidates in
world mm, FROC/CPM), with optional false-positive reduction by a candidate classifier.

Ultralytics provides the network (built from its model YAML), the detection loss
(``v8DetectionLoss``: task-aligned assignment, BCE, CIoU and DFL) and NMS; its trainer,
data pipeline and plotting are not used, so nothing is downloaded (no weights, fonts or
assets) and Lightning owns the loop (devices, precision, DDP, checkpoints, logging).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from pytorch_lightning.callbacks import BasePredictionWriter
from torch import Tensor
from torchmetrics.detection import MeanAveragePrecision

from medlit.artifacts import log_file
from medlit.constraints import (
    ClosedUnitInterval,
    NonNegativeFloat,
    NonNegativeInt,
    PositiveFloat,
    PositiveInt,
)
from medlit.datamodules.base import BaseDataModule
from medlit.datasets.slices import slice_boxes, spacing_zyx, stack_slices
from medlit.deprecation import renamed
from medlit.detections import candidate_table, merge_detections
from medlit.errors import ConfigError
from medlit.metrics.froc import FROCResult, froc
from medlit.models import load_weights, unknown_name, yolo_names
from medlit.tasks.base import BaseTask
from medlit.visualize import save_detections
from medlit.writers import DetectionWriter

# Before Ultralytics is imported: no DNS probe, no settings sync, quiet model summaries.
os.environ.setdefault("YOLO_OFFLINE", "1")
os.environ.setdefault("YOLO_VERBOSE", "False")

log = logging.getLogger(__name__)


def _ultralytics():
    try:
        from ultralytics.cfg import get_cfg
        from ultralytics.nn.tasks import DetectionModel
        from ultralytics.utils.nms import non_max_suppression
    except ImportError as e:  # the AGPL dependency lives in an extra
        raise ConfigError('DetectionTask needs Ultralytics: pip install "medlit[detection]"') from e
    return DetectionModel, get_cfg, non_max_suppression


class DetectionTask(BaseTask):
    """Nodule (or any lesion) detection with an Ultralytics YOLO network.

    Args:
        model: Ultralytics model YAML: a name shipped with Ultralytics (``yolov8n.yaml``,
            ``yolo11s.yaml``: the letter picks the scale) or a path to your own YAML.
        weights: local weights (a state dict or Lightning checkpoint; convert an
            Ultralytics ``.pt`` with ``torch.save(YOLO("x.pt").model.state_dict(), ...)``).
            Tensors whose shape differs (input channels, class count) are skipped.
        in_channels: input channels (2.5D: 2·context_slices + 1).
        num_classes: detected classes (``nc`` of the model YAML is overridden).
        box_gain: weight of the box (CIoU) loss, as Ultralytics' ``box``.
        cls_gain: weight of the classification loss, as Ultralytics' ``cls``.
        dfl_gain: weight of the distribution focal loss, as Ultralytics' ``dfl``.
        lr: peak learning rate of AdamW.
        weight_decay: AdamW weight decay.
        scheduler: ``cosine`` (after ``warmup_epochs`` of linear warm-up) or ``none``.
        warmup_epochs: epochs of linear warm-up.
        grad_clip_norm: clip the gradient's norm to this before every step, as Ultralytics'
            trainer does (10); None leaves the gradient as it is. The trainer's
            ``gradient_clip_val``, when set, is used instead.
        conf_threshold: lowest box score kept at evaluation (low: FROC needs the tail).
        iou_threshold: IoU of Ultralytics' NMS within a slice.
        max_det: boxes kept per slice after NMS.
        inference_batch_size: slices per forward pass when a whole scan is evaluated.
        merge_tolerance: slices of z-distance allowed when merging boxes into 3D candidates.
        max_candidates: candidates kept per scan (the LUNA16 scorer reads at most 100).
        fpr_checkpoint: checkpoint of a ClassificationTask trained on the same data module
            with ``target: candidates``; its nodule probability re-ranks the candidates.
        fpr_weight: the re-ranked score is ``detection^(1-w) · classifier^w``.
        lung_margin_mm: drop candidates farther than this from the lungs, on scans that
            have a lung mask (``seg-lungs-LUNA16``); None keeps every candidate.
        predictions_dir: also write the test submission CSV here.
        log_images: log a PNG of test slices with reference and detected boxes.
        eval_batch_size: deprecated name of ``inference_batch_size``.
    """

    monitor = "val/cpm"
    mode = "max"
    renamed_arguments = {"inference_batch_size": "eval_batch_size"}
    ensembles = True  # the members' 3D candidates, clustered (ensemble_candidates)

    def __init__(
        self,
        model: str = "yolov8n.yaml",
        weights: str | None = None,
        in_channels: PositiveInt = 3,
        num_classes: PositiveInt = 1,
        box_gain: NonNegativeFloat = 7.5,
        cls_gain: NonNegativeFloat = 0.5,
        dfl_gain: NonNegativeFloat = 1.5,
        lr: PositiveFloat = 1e-3,
        weight_decay: NonNegativeFloat = 5e-4,
        scheduler: Literal["cosine", "none"] = "cosine",
        warmup_epochs: NonNegativeInt = 1,
        grad_clip_norm: PositiveFloat | None = 10.0,
        conf_threshold: ClosedUnitInterval = 0.01,
        iou_threshold: ClosedUnitInterval = 0.5,
        max_det: PositiveInt = 30,
        inference_batch_size: PositiveInt = 32,
        merge_tolerance: NonNegativeFloat = 1.0,
        max_candidates: PositiveInt = 100,
        fpr_checkpoint: str | None = None,
        fpr_weight: ClosedUnitInterval = 0.5,
        lung_margin_mm: NonNegativeFloat | None = None,
        predictions_dir: str | None = None,
        log_images: bool = True,
        eval_batch_size: PositiveInt | None = None,
    ) -> None:
        inference_batch_size = renamed(
            self,
            "eval_batch_size",
            eval_batch_size,
            "inference_batch_size",
            inference_batch_size,
            32,
        )
        eval_batch_size = None  # noqa: F841 - the hyperparameters keep the new name only
        super().__init__()
        self.criterion = None
        # In a list: a registered submodule would be trained, and saved with this model.
        self._fpr: list[torch.nn.Module] = []
        self._rows: list[dict[str, Any]] = []
        self._shown: list[dict[str, Any]] = []
        # Slice-level mAP@0.5. torchmetrics' own DDP sync of this metric's list states
        # needs the same number of slices on every rank (scans differ in depth), so the
        # slices are gathered as objects and scored once, on every rank alike.
        self.val_map = MeanAveragePrecision(
            iou_thresholds=[0.5], box_format="xyxy", sync_on_compute=False
        )
        self._map_inputs: dict[str, tuple[list, list]] = {}  # per scan

    def configure_models(self) -> None:
        h = self.hparams
        DetectionModel, get_cfg, _ = _ultralytics()
        try:
            self.model = DetectionModel(
                h["model"], ch=h["in_channels"], nc=h["num_classes"], verbose=False
            )
        except FileNotFoundError as e:
            raise unknown_name(
                "model.model",
                h["model"],
                yolo_names(),
                " (an Ultralytics model YAML such as yolov8n.yaml or yolo11s.yaml, or the "
                "path to your own)",
            ) from e
        # The loss reads its gains from ``model.args``, as in Ultralytics' own trainer.
        self.model.args = get_cfg(
            overrides={"box": h["box_gain"], "cls": h["cls_gain"], "dfl": h["dfl_gain"]}
        )
        if h["weights"]:
            load_weights(self.model, h["weights"])

    def setup(self, stage: str) -> None:
        dm = self.data
        classes = dm.classes if dm is not None else ()
        if classes and len(classes) != self.hparams["num_classes"]:
            raise ConfigError(
                f"model.num_classes={self.hparams['num_classes']} but the data module has "
                f"{len(classes)} classes {classes}"
            )
        if self.hparams["fpr_checkpoint"] and not self._fpr:
            if dm is None:
                raise ConfigError("model.fpr_checkpoint needs a medlit data module")
            self._fpr.append(load_fpr_classifier(self.hparams["fpr_checkpoint"], dm))

    # ---- training ------------------------------------------------------------------------

    def forward(self, x: Tensor) -> Any:
        return self.model(x)

    def _loss(self, preds: Any, batch: dict[str, Any]) -> tuple[Tensor, dict[str, Tensor]]:
        device = batch["image"].device
        if self.criterion is None or self.criterion.device != device:
            self.criterion = self.model.init_criterion()
        target = {
            "batch_idx": batch["batch_idx"].float(),
            "cls": batch["box_labels"].float(),
            "bboxes": batch["boxes"].float(),
        }
        loss, items = self.criterion(preds, target)
        # Ultralytics' scaling: (box + cls + dfl) × batch size.
        return loss.sum(), items

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> Tensor:
        loss, items = self._loss(self(batch["image"]), batch)
        n = len(batch["image"])
        self.log_train_loss(loss / n, n)
        for name, value in items.items():
            self.log(f"train/{name}", value, on_step=False, on_epoch=True, batch_size=n)
        return loss

    def configure_gradient_clipping(
        self,
        optimizer: torch.optim.Optimizer,
        gradient_clip_val: float | None = None,
        gradient_clip_algorithm: str | None = None,
    ) -> None:
        # Ultralytics' own trainer clips every step at norm 10: without it, the box loss's
        # first large gradients (once anchors start matching nodules) threw the short LUNA16
        # demo off for good on one seed (test CPM 0.04 where the clipped run reaches 0.60).
        if gradient_clip_val is None and self.hparams["grad_clip_norm"] is not None:
            gradient_clip_val, gradient_clip_algorithm = self.hparams["grad_clip_norm"], "norm"
        self.clip_gradients(optimizer, gradient_clip_val, gradient_clip_algorithm)

    # ---- whole-scan inference ------------------------------------------------------------

    def detect_slices(self, volume: Tensor) -> list[tuple[int, np.ndarray]]:
        """Boxes (n, 5) x1, y1, x2, y2, score of every axial slice of a windowed volume."""
        _, _, nms = _ultralytics()
        h = self.hparams
        context = (h["in_channels"] - 1) // 2
        depth, height, width = volume.shape
        stride = int(self.model.stride.max())
        pad = (0, -width % stride, 0, -height % stride)
        out = []
        for start in range(0, depth, h["inference_batch_size"]):
            zs = np.arange(start, min(start + h["inference_batch_size"], depth))
            x = F.pad(stack_slices(volume[None], zs, context), pad)
            preds = self.model(x.to(self.device, self.dtype))
            kept = nms(
                preds,
                conf_thres=h["conf_threshold"],
                iou_thres=h["iou_threshold"],
                max_det=h["max_det"],
            )
            for z, k in zip(zs, kept, strict=True):
                out.append((int(z), k[:, :5].float().cpu().numpy()))
        return out

    def scan_candidates(self, item: dict[str, Any], slices: list) -> pd.DataFrame:
        """3D candidates of one scan in world mm, as LUNA16 submission rows."""
        meta = item["meta"]
        merged = merge_detections(slices, spacing_zyx(meta), self.hparams["merge_tolerance"])
        if self.hparams["lung_margin_mm"] is not None and len(merged):
            merged = merged[self._near_lungs(item["case_id"], merged[:, :3], meta)]
        merged = merged[: self.hparams["max_candidates"] * 2]
        score = merged[:, 4]
        if self._fpr and len(merged):
            p = self.fpr_probability(item["case_id"], merged[:, :3], item.get("hu"))
            w = self.hparams["fpr_weight"]
            score = score ** (1 - w) * p**w
        return candidate_table(
            item["case_id"], merged, score, meta["geometry"], self.hparams["max_candidates"]
        )

    def candidates(self, item: dict[str, Any]) -> tuple[pd.DataFrame, list]:
        """A scan's scored 3D candidates, and this model's slice detections (for the
        slice mAP). An ensemble's members each find their candidates, which are then
        clustered (:func:`ensemble_candidates`)."""
        slices = self.detect_slices(item["image"])
        marks = self.scan_candidates(item, slices)
        members = self.ready_members()
        if len(members) == 1:
            return marks, slices
        tables = [marks]
        for m in members[1:]:
            m._fpr = self._fpr  # the one re-ranking classifier, loaded by this task's setup
            tables.append(m.scan_candidates(item, m.detect_slices(item["image"])))
        merged = ensemble_candidates(tables)
        return merged.head(self.hparams["max_candidates"]).round(6), slices

    def _near_lungs(self, uid: str, centres: np.ndarray, meta: dict) -> np.ndarray:
        """Candidates with a lung voxel within ``lung_margin_mm`` (a box around the centre:
        juxtapleural nodules lie on the mask's edge). All kept when the scan has no mask."""
        lungs = self.data.search_mask(uid) if self.data is not None else None
        if lungs is None:
            return np.ones(len(centres), bool)
        reach = np.ceil(self.hparams["lung_margin_mm"] / spacing_zyx(meta)).astype(int)
        keep = []
        for c in np.round(centres).astype(int):
            lo = np.clip(c - reach, 0, lungs.shape)
            hi = np.clip(c + reach + 1, 0, lungs.shape)
            keep.append(bool(lungs[lo[0] : hi[0], lo[1] : hi[1], lo[2] : hi[2]].any()))
        return np.asarray(keep, bool)

    @torch.no_grad()
    def fpr_probability(
        self, uid: str, centres: np.ndarray, volume: np.ndarray | None = None
    ) -> np.ndarray:
        """The false-positive-reduction classifier's nodule probability at each centre.
        ``volume``: the scan's HU array when it is not one of the data module's."""
        assert self.data is not None  # setup refused an fpr_checkpoint without one
        fpr = self._fpr[0].to(self.device)
        x = torch.from_numpy(self.data.candidate_inputs(uid, centres, volume)).to(self.device)
        probs = [fpr(x[i : i + 256]).float().softmax(1)[:, -1] for i in range(0, len(x), 256)]
        return torch.cat(probs).cpu().numpy()

    def evaluate_batch(self, item: dict[str, Any], stage: str) -> None:
        marks, slices = self.candidates(item)
        nodules = item["nodules"].cpu().numpy()
        if stage == "val":
            spacing = spacing_zyx(item["meta"])
            preds, target = [], []
            for z, boxes in slices:
                preds.append(
                    {
                        "boxes": torch.from_numpy(boxes[:, :4]),
                        "scores": torch.from_numpy(boxes[:, 4]),
                        "labels": torch.zeros(len(boxes), dtype=torch.long),
                    }
                )
                ref = slice_boxes(nodules, z, spacing)
                target.append(
                    {
                        "boxes": torch.from_numpy(ref),
                        "labels": torch.zeros(len(ref), dtype=torch.long),
                    }
                )
            self._map_inputs[item["case_id"]] = (preds, target)
        self._rows.append(
            {
                "case_id": item["case_id"],
                "marks": marks.drop(columns="diameter_mm").to_dict("list"),
                "nodules": len(nodules),
            }
        )
        if stage == "test" and self.hparams["log_images"] and len(self._shown) < 4 and len(nodules):
            z = int(round(nodules[0, 0]))
            shown_boxes = dict(slices).get(z, np.zeros((0, 5)))
            self._shown.append(
                {
                    "image": item["image"][z].cpu().numpy(),
                    "ref": slice_boxes(nodules, z, spacing_zyx(item["meta"])),
                    "pred": shown_boxes[shown_boxes[:, 4] >= 0.1],
                    "title": f"{item['case_id'][-12:]} z={z}",
                }
            )

    def prediction_writer(self, output: Path) -> BasePredictionWriter:
        return DetectionWriter(output)

    def predict_step(self, batch: dict[str, Any], batch_idx: int) -> list[dict[str, Any]]:
        """The scan's scored 3D candidates (:class:`~medlit.writers.DetectionWriter`
        writes every rank's scans as one submission CSV). A scan from outside the data
        module (``medlit.predict``) brings its HU array (``hu``) for the
        false-positive-reduction patches."""
        marks, _ = self.candidates(batch)
        return [{"case_id": batch["case_id"], "marks": marks.drop(columns="diameter_mm")}]

    # ---- scan-level scoring --------------------------------------------------------------

    def finish_stage(self, stage: str) -> FROCResult | None:
        rows = self.gather_rows(self._rows)  # every scan once, whatever the world size
        self._rows = []
        if not rows:
            return None
        marks = pd.concat([pd.DataFrame(r["marks"]) for r in rows], ignore_index=True)
        uids = [r["case_id"] for r in rows]
        if self.data is None:
            raise ConfigError("scoring detections needs a medlit data module")
        annotations, excluded = self.data.reference(uids)
        result = froc(marks, annotations, excluded, uids)
        for name, value in result.metrics().items():
            self.log(f"{stage}/{name}", value, sync_dist=True)
        if self.trainer.sanity_checking:
            return result
        per_scan = pd.DataFrame(
            {
                "case_id": uids,
                "nodules": [r["nodules"] for r in rows],
                "marks": [len(r["marks"]["seriesuid"]) for r in rows],
            }
        ).set_index("case_id")
        log_file(self.trainer, f"{stage}_per_case.csv", per_scan.to_csv)
        if stage == "test":
            self._write_outputs(marks, uids, result)
        return result

    def _write_outputs(self, marks: pd.DataFrame, uids: list[str], result: FROCResult) -> None:
        dm = self.data
        if dm is None:
            raise ConfigError("scoring detections needs a medlit data module")
        seriesuids = pd.Series(uids)
        log_file(self.trainer, "test_submission.csv", lambda p: dm.write_detections(p, marks))
        log_file(
            self.trainer,
            "test_seriesuids.csv",
            lambda p: seriesuids.to_csv(p, index=False, header=False),
        )
        log_file(self.trainer, "test_froc.png", result.plot)
        if self.hparams["log_images"] and self._shown:
            shown, self._shown = self._shown, []
            log_file(self.trainer, "test_detections.png", lambda p: save_detections(shown, p))
        if self.hparams["predictions_dir"] and self.trainer.is_global_zero:
            dm.write_detections(Path(self.hparams["predictions_dir"]) / "submission.csv", marks)

    def on_validation_epoch_end(self) -> None:
        # Every rank's slices (a rank may have none when there are fewer scans than ranks).
        inputs = {k: v for part in self.all_ranks(self._map_inputs) for k, v in part.items()}
        self._map_inputs = {}
        for uid in sorted(inputs):  # each scan once, whatever the world size
            self.val_map.update(*inputs[uid])
        if inputs:
            # Slice-level mAP@0.5: a check of the 2D detector, not the challenge metric.
            self.log("val/map50", self.val_map.compute()["map"], sync_dist=True)
        self.val_map.reset()
        self.finish_stage("val")


def ensemble_candidates(tables: list[pd.DataFrame], max_radius_mm: float = 16.0) -> pd.DataFrame:
    """One scan's 3D candidates from K models (LUNA16 submission rows in world mm, with
    ``diameter_mm``), clustered as slice boxes merge into candidates
    (:func:`merge_detections`): in descending probability, a candidate joins the nearest
    cluster whose centre lies within the larger of its and the cluster's radius (at most
    ``max_radius_mm``) and that holds no candidate of its own model yet, else it starts
    one. A cluster's probability is the mean over the K models of each one's probability
    there, 0 for a model without a candidate there (agreement ranks up, a lone model's
    finding down); its centre and diameter are those of its most probable candidate.
    Sorted by probability."""
    k = len(tables)
    pool = pd.concat(
        [t.assign(member=i) for i, t in enumerate(tables)], ignore_index=True
    ).sort_values("probability", ascending=False, kind="stable")
    clusters: list[dict[str, Any]] = []
    for row in pool.itertuples(index=False):
        p = np.array([row.coordX, row.coordY, row.coordZ])
        best, best_d = None, np.inf
        for c in clusters:
            if row.member in c["probs"]:
                continue
            d = float(np.linalg.norm(c["centre"] - p))
            reach = min(max(c["radius"], row.diameter_mm / 2), max_radius_mm)
            if d <= reach and d < best_d:
                best, best_d = c, d
        if best is None:
            clusters.append({"row": row, "centre": p, "radius": row.diameter_mm / 2, "probs": {}})
            best = clusters[-1]
        best["probs"][row.member] = row.probability
    columns = ["seriesuid", "coordX", "coordY", "coordZ", "probability", "diameter_mm"]
    out = pd.DataFrame(
        [
            {
                "seriesuid": c["row"].seriesuid,
                "coordX": c["row"].coordX,
                "coordY": c["row"].coordY,
                "coordZ": c["row"].coordZ,
                "probability": sum(c["probs"].values()) / k,
                "diameter_mm": c["row"].diameter_mm,
            }
            for c in clusters
        ],
        columns=columns,
    )
    return out.sort_values("probability", ascending=False, kind="stable").reset_index(drop=True)


def load_fpr_classifier(path: str, datamodule: BaseDataModule) -> torch.nn.Module:
    """The network of a false-positive-reduction ClassificationTask checkpoint, in eval mode.

    Loaded with ``weights_only=True``. Its candidate inputs must be made as this data
    module makes them (spacing, window, patch size and kind), or its scores mean nothing.
    """
    from medlit.tasks.classification import ClassificationTask

    file = Path(path).expanduser()
    if not file.is_file():
        raise ConfigError(f"model.fpr_checkpoint: {file} does not exist")
    ckpt = torch.load(file, map_location="cpu", weights_only=True)
    trained = ckpt.get("datamodule_hyper_parameters", {})
    own = dict(datamodule.hparams)
    keys = ("spacing", "hu_window", "candidate_size", "candidate_input", "context_slices")
    if diff := [
        k
        for k in keys
        if k in trained and k in own and list(np.ravel(trained[k])) != list(np.ravel(own[k]))
    ]:
        raise ConfigError(
            f"model.fpr_checkpoint {file} was trained with data "
            + ", ".join(f"{k}={trained[k]}" for k in diff)
            + " but this data module uses "
            + ", ".join(f"{k}={own[k]}" for k in diff)
        )
    # LightningCLI adds its own bookkeeping keys (``_class_path``...) to the hyperparameters.
    hparams = {k: v for k, v in ckpt["hyper_parameters"].items() if not k.startswith("_")}
    with torch.random.fork_rng():  # building it must not shift this run's random streams
        task = ClassificationTask(**hparams)
    task.load_state_dict(ckpt["state_dict"])
    return task.model.eval()
