"""ClassificationTask: any timm model, scored as the ISIC challenges score (balanced
multiclass accuracy, per-class and macro ROC AUC), with Grad-CAM explanations."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pandas as pd
import timm
import torch
from pytorch_lightning.callbacks import BasePredictionWriter
from pytorch_lightning.trainer.states import TrainerFn
from torch import Tensor

from medlit.artifacts import log_file
from medlit.constraints import (
    Fraction,
    NonNegativeFloat,
    NonNegativeInt,
    PositiveFloat,
    PositiveInt,
)
from medlit.deprecation import renamed
from medlit.errors import ConfigError
from medlit.metrics.classification import balanced_accuracy, confusion, per_class_auc
from medlit.models import load_weights, unknown_name
from medlit.tasks.base import BaseTask, uncertainty_map
from medlit.visualize import save_confusion, save_gradcam
from medlit.writers import SubmissionWriter


class ClassificationTask(BaseTask):
    """Image classification with ``timm.create_model``.

    Args:
        model: any timm model name (``resnet50``, ``efficientnet_b3``, ``convnext_tiny``...).
        weights: path of a local weights file (timm/torchvision state dict or a Lightning
            checkpoint); nothing is downloaded. A classifier of another size is skipped.
        in_channels: input channels.
        num_classes: output classes.
        class_names: names of the classes, for metrics and the submission CSV; default
            the data module's (``classes``) or class0, class1, ...
        freeze_backbone: train only the classifier head.
        label_smoothing: cross-entropy label smoothing.
        class_weights: ``balanced`` weighs the loss by inverse training-class frequency
            (from the data module's ``class_counts``); a list gives the weights; ``none``.
        drop_rate: dropout before the classifier.
        lr: peak learning rate of AdamW.
        weight_decay: AdamW weight decay.
        scheduler: ``cosine`` (after ``warmup_epochs`` of linear warm-up) or ``none``.
        warmup_epochs: epochs of linear warm-up.
        log_images: log the confusion matrix and Grad-CAM overlays (PNG); turn off for data
            that must not leave the site.
        num_cam_images: validation images explained with Grad-CAM at the end of training.
        in_chans: deprecated name of ``in_channels``.
    """

    monitor = "val/balanced_accuracy"
    mode = "max"
    renamed_arguments = {"in_channels": "in_chans"}
    ensembles = True
    output_hparams = ("num_classes", "class_names")

    def __init__(
        self,
        model: str = "resnet18",
        weights: str | None = None,
        in_channels: PositiveInt = 3,
        num_classes: PositiveInt = 7,
        class_names: list[str] | None = None,
        freeze_backbone: bool = False,
        label_smoothing: Fraction = 0.0,
        class_weights: Literal["none", "balanced"] | list[NonNegativeFloat] = "none",
        drop_rate: Fraction = 0.0,
        lr: PositiveFloat = 1e-3,
        weight_decay: NonNegativeFloat = 1e-4,
        scheduler: Literal["cosine", "none"] = "cosine",
        warmup_epochs: NonNegativeInt = 1,
        log_images: bool = True,
        num_cam_images: NonNegativeInt = 6,
        in_chans: PositiveInt | None = None,
    ) -> None:
        in_channels = renamed(self, "in_chans", in_chans, "in_channels", in_channels, 3)
        in_chans = None  # noqa: F841 - the hyperparameters keep the new name only
        super().__init__()
        self._outputs: list[dict[str, Any]] = []
        self._best_val: float | None = None

    def configure_models(self) -> None:
        h = self.hparams
        try:
            self.model = timm.create_model(
                h["model"],
                pretrained=False,
                in_chans=h["in_channels"],
                num_classes=h["num_classes"],
                drop_rate=h["drop_rate"],
            )
        except RuntimeError as e:  # timm: "Unknown model (...)"
            if timm.is_model(h["model"]):
                raise ConfigError(f"model.model={h['model']!r}: {e}") from e
            raise unknown_name(
                "model.model", h["model"], timm.list_models(), " (timm; see timm.list_models())"
            ) from e
        if h["weights"]:
            load_weights(self.model, h["weights"])
        if h["freeze_backbone"]:
            head = {id(p) for p in self.model.get_classifier().parameters()}
            for p in self.model.parameters():
                p.requires_grad = id(p) in head

    def configure_losses(self) -> None:
        w = self.hparams["class_weights"]
        weight = torch.tensor(w, dtype=torch.float) if isinstance(w, list) else None
        if weight is not None and len(weight) != self.hparams["num_classes"]:
            raise ConfigError(
                f"class_weights has {len(weight)} values for {self.hparams['num_classes']} classes"
            )
        self.loss = torch.nn.CrossEntropyLoss(
            weight=weight, label_smoothing=self.hparams["label_smoothing"]
        )

    @property
    def class_names(self) -> list[str]:
        if self.hparams["class_names"]:
            return list(self.hparams["class_names"])
        names = list(self.data.classes) if self.data is not None else []
        return (
            names
            if len(names) == self.hparams["num_classes"]
            else [f"class{k}" for k in range(self.hparams["num_classes"])]
        )

    def setup(self, stage: str) -> None:
        if self.hparams["class_weights"] == "balanced" and stage == "fit":
            counts = self.data.class_counts if self.data is not None else []
            counts = torch.tensor(counts, dtype=torch.float)
            if counts.numel() != self.hparams["num_classes"]:
                raise ConfigError(
                    "class_weights: balanced needs the data module's class_counts "
                    f"for {self.hparams['num_classes']} classes"
                )
            weight = counts.sum() / (len(counts) * counts.clamp(min=1))
            self.loss = torch.nn.CrossEntropyLoss(
                weight=weight, label_smoothing=self.hparams["label_smoothing"]
            )

    def forward(self, x: Tensor) -> Tensor:
        return self.model(x)

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> Tensor:
        logits = self(batch["image"])
        loss = self.loss(logits, batch["label"])
        self.log_train_loss(loss, len(batch["label"]))
        return loss

    @torch.no_grad()
    def probabilities(self, images: Tensor) -> Tensor:
        """(B, K) class probabilities on the CPU: this model's softmax, or the mean of its
        ensemble's (:meth:`~medlit.tasks.base.BaseTask.set_ensemble`)."""
        return self.ensemble_mean(lambda m: m(images).float().softmax(1)).cpu()

    def _collect(self, batch: dict[str, Any]) -> None:
        probs = self.probabilities(batch["image"])
        for i, case in enumerate(batch["case_id"]):
            self._outputs.append(
                {"case_id": case, "target": int(batch["label"][i]), "probs": probs[i].tolist()}
            )

    def evaluate_batch(self, batch: dict[str, Any], stage: str) -> None:
        self._collect(batch)

    def finish_stage(self, stage: str) -> None:
        rows = self.gather_rows(self._outputs)  # every image once, whatever the world size
        self._outputs = []
        if not rows:
            return
        probs = torch.tensor([r["probs"] for r in rows])
        target = torch.tensor([r["target"] for r in rows])
        names = self.class_names
        metrics = {"balanced_accuracy": balanced_accuracy(probs, target)}
        aucs = per_class_auc(probs, target)
        metrics.update(
            {f"auc_{n}": a for n, a in zip(names, aucs, strict=True) if not math.isnan(a)}
        )
        if any(not math.isnan(a) for a in aucs):
            metrics["auc_macro"] = float(np.nanmean(aucs))
        if len(names) == 2 and not math.isnan(aucs[1]):
            metrics["roc_auc"] = aucs[1]  # binary (ISIC 2020): AUC of the positive class
        ids = [r["case_id"] for r in rows]
        # A data module whose challenge scores its items differently (LUNA16 candidates:
        # FROC/CPM over scans) scores them itself.
        dm = self.data
        scored = dm.score_predictions(ids, probs.numpy()) if dm is not None else None
        if scored is not None:
            metrics.update(scored.metrics())
        for k, v in metrics.items():
            self.log(f"{stage}/{k}", v, sync_dist=True)
        if self.trainer.sanity_checking:
            return
        if scored is not None and stage == "test":
            log_file(self.trainer, "test_froc.png", scored.plot)
        # The validation tables are those of the best epoch so far (the epoch of the best
        # checkpoint), not of whichever epoch came last; a validation on its own
        # (medlit.evaluate --split val, medlit.cv's out-of-fold runs) always has them.
        alone = self.trainer.state.fn == TrainerFn.VALIDATING
        best = stage == "val" and (self._new_best(metrics) or alone)
        if stage == "test" or best:
            table = prediction_table(ids, probs, target, names)
            table.insert(0, "epoch", self.current_epoch)
            log_file(
                self.trainer, f"{stage}_predictions.csv", lambda p: table.to_csv(p, index=False)
            )
        if stage == "test" and dm is not None:  # the challenge's own submission format
            log_file(
                self.trainer,
                "test_submission.csv",
                lambda p: dm.write_submission(p, ids, probs.numpy(), names),
            )
        if self.hparams["log_images"] and (stage == "test" or best):
            matrix = confusion(probs, target).numpy()
            title = f"{stage}, {len(ids)} images, " + (
                "best checkpoint" if stage == "test" else f"epoch {self.current_epoch}"
            )
            log_file(
                self.trainer,
                f"{stage}_confusion.png",
                lambda p: save_confusion(matrix, names, p, title=title),
            )
        if stage == "test":
            self._log_gradcam()

    def _new_best(self, metrics: dict[str, float]) -> bool:
        """Whether this validation's monitored value is the best of the run so far."""
        value = metrics.get(self.monitor.split("/", 1)[-1])
        if value is None or math.isnan(value):
            return False
        old = self._best_val
        if old is not None and not (value > old if self.mode == "max" else value < old):
            return False
        self._best_val = float(value)
        return True

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_save_checkpoint(checkpoint)
        checkpoint["medlit_best_val"] = self._best_val  # a resumed run goes on comparing

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_load_checkpoint(checkpoint)
        self._best_val = checkpoint.get("medlit_best_val", self._best_val)

    def _log_gradcam(self) -> None:
        """Grad-CAM overlays of a few validation images, by the weights being tested: the
        best checkpoint (``medlit.fit`` tests it), not the final weights."""
        n = self.hparams["num_cam_images"]
        dm = self.data
        if not self.hparams["log_images"] or n <= 0 or dm is None or "val" not in dm.datasets:
            return
        # Testing runs under inference mode, which Grad-CAM's backward pass cannot: the
        # images are read (and the overlays computed) with it switched off.
        with torch.inference_mode(False), torch.enable_grad():
            items = [dm.datasets["val"][i] for i in range(min(n, len(dm.datasets["val"])))]
            if items:
                log_file(
                    self.trainer,
                    "gradcam.png",
                    lambda p: save_gradcam(self, items, self.class_names, p),
                )

    def prediction_writer(self, output: Path) -> BasePredictionWriter:
        return SubmissionWriter(output)

    def predict_step(self, batch: dict[str, Any], batch_idx: int) -> list[dict[str, Any]]:
        """Class probabilities of each image (:class:`~medlit.writers.SubmissionWriter`
        writes the release's submission CSV of every rank's images)."""
        kind = self.uncertainty
        if not kind:
            probs = self.probabilities(batch["image"])
            return [
                {"case_id": c, "probs": p.tolist()}
                for c, p in zip(batch["case_id"], probs, strict=True)
            ]
        images = batch["image"]
        with torch.no_grad():
            probs, var = self.ensemble_moments(
                lambda m: m(images).float().softmax(1), variance=kind == "variance"
            )
        values = uncertainty_map(probs, var, kind, regions=False, dim=1).cpu()
        return [
            {"case_id": c, "probs": p.tolist(), "uncertainty": float(u)}
            for c, p, u in zip(batch["case_id"], probs.cpu(), values, strict=True)
        ]


def prediction_table(
    ids: list[str], probs: Tensor, target: Tensor, names: list[str]
) -> pd.DataFrame:
    """One row per image: the truth beside the prediction (class names), whether they
    agree, and each class's probability."""
    predicted = probs.argmax(1)
    table = pd.DataFrame(probs.numpy(), columns=[f"p_{n}" for n in names])
    table.insert(0, "correct", (predicted == target).numpy())
    table.insert(0, "prediction", [names[int(i)] for i in predicted])
    table.insert(0, "truth", [names[int(i)] for i in target])
    table.insert(0, "image", ids)
    return table
