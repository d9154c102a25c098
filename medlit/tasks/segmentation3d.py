"""Segmentation3DTask: MONAI 3D networks trained on 3D patches (nnU-Net's recipe), with
deep supervision, Gaussian sliding-window inference and mirroring TTA; evaluation, tables,
overlays and written predictions are :class:`~medlit.tasks.SegmentationTask`'s."""

from __future__ import annotations

import logging
from typing import Any, Literal

import torch
from pytorch_lightning.trainer.states import TrainerFn
from torch import Tensor

from medlit.constraints import (
    ClosedUnitInterval,
    NonNegativeFloat,
    NonNegativeInt,
    PositiveFloat,
    PositiveInt,
)
from medlit.datamodules.base import BaseDataModule
from medlit.errors import ConfigError
from medlit.explain import normalise, region_index, seg_grad_cam
from medlit.models.volumetric import Arch3D, create_network_3d
from medlit.sliding import MIRROR_AXES, Mirrored, sliding_window
from medlit.tasks.base import warmup_cosine
from medlit.tasks.segmentation import SegmentationTask

log = logging.getLogger(__name__)


def deep_supervision_weights(outputs: int) -> list[float]:
    """nnU-Net's weights of the main output and its deep-supervision heads, highest
    resolution first: 1/2^i, normalised to sum 1. (nnU-Net also has a lowest-resolution
    head weighted 0; :func:`~medlit.models.volumetric.create_network_3d` does not build
    it, which leaves the loss the same and skips its computation.)"""
    weights = [1 / 2**i for i in range(outputs)]
    return [w / sum(weights) for w in weights]


class Segmentation3DTask(SegmentationTask):
    """Volumetric segmentation with a MONAI 3D network (nnU-Net's recipe by default).

    Training takes (B, C, Z, Y, X) patches (the data module's ``patch_size: [z, y, x]``);
    validation and test segment each whole case by a sliding window and score it as
    :class:`~medlit.tasks.SegmentationTask` does (per-case Dice, HD95, tables, overlays,
    NIfTI predictions).

    Args:
        arch: ``dynunet`` (MONAI's nnU-Net architecture: stages, kernels and strides
            planned from ``patch_size`` and ``spacing`` by nnU-Net's rule), ``segresnet``
            or ``swinunetr``.
        patch_size: (z, y, x) voxels of a training patch and of an inference window; the
            data module's ``patch_size`` must be the same.
        spacing: (z, y, x) mm of the data the network sees (the cache's grid), for
            DynUNet's planning; None plans for isotropic voxels.
        filters: features per stage (DynUNet; default nnU-Net's 32, 64, ... up to 320),
            or the first stage's features (SegResNet ``init_filters``, SwinUNETR
            ``feature_size``).
        deep_supervision: DynUNet only: train every decoder stage but the lowest against
            the labels, with nnU-Net's weights 1/2^i (normalised). MONAI's DynUNet
            upsamples its heads to the patch size, so the loss compares them with the
            full-resolution labels (nnU-Net instead downsamples the labels); that keeps
            each region's small parts (enhancing tumour) in every target and costs one
            loss per head at full size.
        in_channels: modalities of the input.
        num_classes: output channels: one per region (``target: regions``) or one per
            class including background (``target: labels``).
        target: ``regions``: sigmoid masks (nested BraTS WT/TC/ET); ``labels``: softmax.
        region_names: names of the evaluated regions.
        class_to_region: with ``target: labels``, the classes of each evaluated region.
        loss: ``dice_ce`` (nnU-Net's), ``dice`` or ``ce``.
        optimizer: ``sgd`` (nnU-Net's: Nesterov momentum 0.99) or ``adamw``.
        lr: peak learning rate (nnU-Net: 0.01 with SGD).
        weight_decay: weight decay (nnU-Net: 3e-5).
        scheduler: ``poly`` (nnU-Net's (1 - epoch / max_epochs)^0.9), ``cosine`` (after
            ``warmup_epochs``) or ``none``.
        warmup_epochs: linear warm-up epochs of ``cosine``.
        threshold: probability above which a voxel belongs to a region (``regions``).
        overlap: share of a window's side that neighbouring windows overlap (nnU-Net 0.5).
        tta: ``mirror``: average the logits over all 8 combinations of axis flips (8× the
            inference time) in test (a fit's, ``medlit.evaluate --split test``) and
            ``medlit.predict``, over the axes the data module allows (LUNA16 lungs: not
            the left-right one, 4 passes); ``none``. Validation runs without it unless ``val_tta``, as
            nnU-Net's per-epoch validation does.
        val_tta: mirror in validation as well (8× its cost; the best checkpoint is then
            picked on mirrored scores).
        sw_batch_size: windows per forward pass.
        stitch_limit_mb: when the logits of a whole volume would take more than this on
            the accelerator, they are stitched on the CPU instead.
        model_kwargs: extra arguments of the MONAI constructor.
        display_channel: input channel shown in the logged overlays.
        log_images: log PNG overlays of validation/test slices.
        num_log_cases: cases shown in each overlay figure.
        metrics: per-case metrics of each region, as :class:`SegmentationTask`'s (the
            first that is neither hd95 nor lesionwise picks the best checkpoint).
        predictions_dir: where the test stage writes each case's prediction (NIfTI).
        explain: a region whose Seg-Grad-CAM the logged overlays show (off by default).
    """

    def __init__(
        self,
        arch: Arch3D = "dynunet",
        patch_size: list[PositiveInt] | None = None,
        spacing: list[PositiveFloat] | None = None,
        filters: list[PositiveInt] | None = None,
        deep_supervision: bool = True,
        in_channels: PositiveInt = 4,
        num_classes: PositiveInt = 3,
        target: Literal["regions", "labels"] = "regions",
        region_names: list[str] | None = None,
        class_to_region: list[list[NonNegativeInt]] | None = None,
        loss: Literal["dice_ce", "dice", "ce"] = "dice_ce",
        optimizer: Literal["sgd", "adamw"] = "sgd",
        lr: PositiveFloat = 1e-2,
        weight_decay: NonNegativeFloat = 3e-5,
        scheduler: Literal["poly", "cosine", "none"] = "poly",
        warmup_epochs: NonNegativeInt = 0,
        threshold: ClosedUnitInterval = 0.5,
        overlap: ClosedUnitInterval = 0.5,
        tta: Literal["none", "mirror"] = "none",
        val_tta: bool = False,
        sw_batch_size: PositiveInt = 2,
        stitch_limit_mb: PositiveFloat = 2048,
        model_kwargs: dict[str, Any] | None = None,
        display_channel: int = -1,
        log_images: bool = True,
        num_log_cases: NonNegativeInt = 3,
        metrics: list[Literal["dice", "hd95", "jaccard", "threshold_jaccard", "lesionwise"]]
        | None = None,
        predictions_dir: str | None = None,
        explain: str | None = None,
    ) -> None:
        if not 0 <= overlap < 1:
            raise ConfigError(f"model.overlap={overlap} must be in [0, 1)")
        patch = list(patch_size or [128, 128, 128])
        if len(patch) != 3:
            raise ConfigError(f"model.patch_size={patch} must be three sides (z, y, x)")
        self.patch = tuple(int(p) for p in patch)
        self.setup_regions(target, num_classes, class_to_region, region_names, metrics)
        # BaseTask's __init__, past SegmentationTask's (SMP's arguments); through super(),
        # whose __class__ cell is how Lightning's save_hyperparameters finds this frame.
        super(SegmentationTask, self).__init__()
        self._rows, self._shown = [], []

    def configure_models(self) -> None:
        h = self.hparams
        self.model, self.heads = create_network_3d(
            h["arch"],
            h["in_channels"],
            h["num_classes"],
            self.patch,
            h["spacing"],
            h["filters"],
            deep_supervision=h["deep_supervision"],
            **(h["model_kwargs"] or {}),
        )
        self.ds_weights = deep_supervision_weights(self.heads + 1)

    def on_fit_start(self) -> None:
        """A DynUNet planned for isotropic voxels on anisotropic data trains, but not as
        nnU-Net would plan it (anisotropic kernels and strides): say what to set."""
        dm = getattr(self.trainer, "datamodule", None)
        grid = dm.grid_spacing() if isinstance(dm, BaseDataModule) else None
        h = self.hparams
        if h["arch"] == "dynunet" and h["spacing"] is None and grid and max(grid) > 2 * min(grid):
            log.warning(
                "the data are cached at %s mm (z, y, x) but model.spacing is unset, so the "
                "DynUNet is planned for isotropic voxels; set --model.spacing=%s to plan it "
                "as nnU-Net does",
                [round(g, 4) for g in grid],
                [round(g, 4) for g in grid],
            )

    def configure_optimizers(self) -> dict[str, Any]:
        h = self.hparams
        if h["optimizer"] == "adamw":
            optimizer = torch.optim.AdamW(
                self.parameters(), lr=h["lr"], weight_decay=h["weight_decay"]
            )
        else:
            optimizer = torch.optim.SGD(
                self.parameters(),
                lr=h["lr"],
                momentum=0.99,
                nesterov=True,
                weight_decay=h["weight_decay"],
            )
        total = max(int(self.trainer.max_epochs or 1), 1)
        if h["scheduler"] == "none":
            return {"optimizer": optimizer}
        if h["scheduler"] == "poly":
            scheduler = torch.optim.lr_scheduler.PolynomialLR(optimizer, total, power=0.9)
        else:
            scheduler = warmup_cosine(optimizer, total, min(h["warmup_epochs"], total - 1))
        return {
            "optimizer": optimizer,
            "lr_scheduler": {"scheduler": scheduler, "interval": "epoch"},
        }

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> Tensor:
        image, target = batch["image"], batch["mask"]
        if image.ndim != 5:
            raise ConfigError(
                f"a 3D network trains on (batch, channel, z, y, x) patches; the data yields "
                f"{tuple(image.shape)}: set the data module's patch_size to [z, y, x] "
                f"(model.patch_size is {list(self.patch)})"
            )
        if tuple(image.shape[2:]) != self.patch:
            raise ConfigError(
                f"the data yields patches of {list(image.shape[2:])} voxels, "
                f"model.patch_size is {list(self.patch)}: set both to the same size"
            )
        if image.shape[1] != self.hparams["in_channels"]:
            raise ConfigError(
                f"the data yields {image.shape[1]} input channels, the model expects "
                f"in_channels={self.hparams['in_channels']}"
            )
        out = self(image)
        if self.heads:  # (B, 1 + heads, K, Z, Y, X), main output first
            loss = sum(
                w * self.compute_loss(o, target)
                for w, o in zip(self.ds_weights, out.unbind(1), strict=True)
            )
        else:
            loss = self.compute_loss(out, target)
        self.log_train_loss(loss, image.shape[0])
        return loss

    def mirroring(self) -> bool:
        """Whether inference now averages the 8 flips: ``tta: mirror`` in test and predict;
        validation (a fit's, or ``medlit.evaluate --split val``, which scores as the fit
        did) only with ``val_tta``."""
        h = self.hparams
        if h["tta"] != "mirror":
            return False
        trainer = self._trainer  # None outside a Trainer (a task used on its own)
        if trainer is None or trainer.state.fn in (TrainerFn.TESTING, TrainerFn.PREDICTING):
            return True
        return bool(h["val_tta"])

    def explain_volume(self, volume: Tensor) -> Tensor:
        """(C, Z, Y, X) -> (Z, Y, X) Seg-Grad-CAM of :attr:`explain_region` in [0, 1],
        window by window with the Gaussian sliding window (no mirroring)."""
        h = self.hparams
        k = region_index(self.region_names, self.explain_region)
        cam = sliding_window(
            volume[None],
            lambda x: seg_grad_cam(self.model, x, k, h["target"] == "regions", h["threshold"]),
            self.patch,
            h["overlap"],
            h["sw_batch_size"],
        )[0, 0]
        return torch.from_numpy(normalise(cam))

    @torch.no_grad()
    def volume_probabilities(self, volume: Tensor) -> Tensor:
        """(C, Z, Y, X) volume -> (K, Z, Y, X) probabilities: Gaussian-weighted sliding
        window (mirrored when ``tta: mirror``), logits stitched, then the activation."""
        h = self.hparams
        logits_mb = h["num_classes"] * volume[0].numel() * 4 / 2**20
        on_accelerator = volume.device.type != "cpu"
        out_device = "cpu" if on_accelerator and logits_mb > h["stitch_limit_mb"] else None
        predictor = self.model
        if self.mirroring():
            dm = getattr(self._trainer, "datamodule", None)
            axes = dm.mirror_axes() if isinstance(dm, BaseDataModule) else MIRROR_AXES
            predictor = Mirrored(self.model, axes)
        logits = sliding_window(
            volume[None], predictor, self.patch, h["overlap"], h["sw_batch_size"], out_device
        )[0].float()
        return logits.sigmoid() if h["target"] == "regions" else logits.softmax(0)
