"""SegmentationTask: any segmentation-models-pytorch network, trained on 2D/2.5D slices,
evaluated on whole 3D cases with per-case Dice and HD95 (mm)."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any, Literal

import numpy as np
import segmentation_models_pytorch as smp
import torch
import torch.nn.functional as F
from pytorch_lightning.callbacks import BasePredictionWriter
from torch import Tensor

from medlit.artifacts import log_file, log_folder
from medlit.constraints import (
    ClosedUnitInterval,
    NonNegativeFloat,
    NonNegativeInt,
    PositiveFloat,
    PositiveInt,
)
from medlit.errors import ConfigError
from medlit.explain import normalise, region_index, seg_grad_cam
from medlit.metrics.brats_lesionwise import lesionwise
from medlit.metrics.segmentation import region_metrics, structure_measures, volume_diagonal
from medlit.models import load_weights, smp_names
from medlit.postprocessing import Postprocessing, save_case
from medlit.tasks.base import BaseTask, predict_slices, uncertainty_map
from medlit.visualize import save_overlays
from medlit.writers import CaseWriter


def create_network(
    arch: str, encoder: str, in_channels: int, classes: int, **kwargs: Any
) -> torch.nn.Module:
    """``smp.create_model`` without network access (no hub weights), with a clear error."""
    if error := smp_names(arch, encoder):
        raise error
    try:
        return smp.create_model(
            arch,
            encoder_name=encoder,
            encoder_weights=None,
            in_channels=in_channels,
            classes=classes,
            **kwargs,
        )
    except (KeyError, RuntimeError) as e:  # SMP's messages already list the valid names
        raise ConfigError(
            f"model.arch={arch!r} / model.encoder={encoder!r}: {e} "
            "(timm encoders are written 'tu-<timm name>')"
        ) from e


class SegmentationTask(BaseTask):
    """Semantic segmentation with an SMP network.

    Training sees 2D (or 2.5D: neighbouring slices as extra channels) patches; validation
    and test predict every slice of each whole case, reassemble the 3D volume and score it
    per case, so metrics are volume metrics, not slice averages.

    Args:
        arch: SMP architecture: unet, unetplusplus, deeplabv3plus, fpn, pspnet, linknet,
            manet, pan, upernet, segformer, dpt, ...
        encoder: SMP encoder name (resnet34, efficientnet-b0, ...) or a timm encoder as
            ``tu-<timm name>``.
        encoder_weights: path of a local state-dict file for the encoder (nothing is
            downloaded); None trains from scratch.
        in_channels: input channels = modalities × (2 × context slices + 1).
        num_classes: output channels: one per region (``target: regions``) or one per
            class including background (``target: labels``).
        target: ``regions``: independent sigmoid masks (multi-label, e.g. nested BraTS
            WT/TC/ET); ``labels``: mutually exclusive classes with a softmax.
        region_names: names of the evaluated regions (metrics are ``dice_<name>``,
            ``hd95_<name>``).
        class_to_region: with ``target: labels``, the class indices that make up each
            evaluated region (BraTS: [[1, 2, 3], [1, 3], [3]]); default one region per
            foreground class.
        loss: ``dice_ce``: Dice + (B)CE; ``dice``; ``ce``: (B)CE alone.
        lr: peak learning rate of AdamW.
        weight_decay: AdamW weight decay.
        scheduler: ``cosine`` (after ``warmup_epochs`` of linear warm-up) or ``none``.
        warmup_epochs: epochs of linear warm-up.
        threshold: probability above which a voxel belongs to a region (``regions``).
        inference_batch_size: slices per forward pass when predicting a whole case.
        model_kwargs: extra arguments of the SMP constructor (e.g. decoder_channels).
        display_channel: input channel shown in the logged overlays (e.g. FLAIR).
        log_images: log PNG overlays of validation/test slices; turn off for data that
            must not leave the site.
        num_log_cases: cases shown in each overlay figure.
        metrics: per-case metrics of each region: ``dice``, ``hd95`` (mm), ``jaccard``,
            ``threshold_jaccard`` (ISIC 2018: Jaccard < 0.65 counts 0), ``lesionwise``
            (BraTS 2023's lesion-wise Dice and HD95 with the lesion counts,
            ``lesion_dice_<R>``, ``lesion_hd95_<R>``, ``lesion_tp|fp|fn_<R>``; on by
            default, with ``metrics`` unset, for the data modules whose challenge ranks by
            them: BraTS 2023 and later). The first of them that is neither hd95 nor
            lesionwise picks the best checkpoint (``val/<metric>_mean``).
        predictions_dir: when set, the test stage writes each case's prediction there in
            the dataset's own format (the data module's ``write_prediction``: BraTS NIfTI in
            the release's labels with the input's geometry, ISIC 0/255 PNG masks) and
            attaches them to the run as ``test_predictions/``.
        explain: a region to explain (``ET``): the logged validation and test overlays get
            its Seg-Grad-CAM (:mod:`medlit.explain`) beside them; off by default (a
            backward pass per shown case).
    """

    # monitor is set per instance from ``metrics`` (val/<first ranking metric>_mean)
    mode = "max"

    # Volumes and component counts: read per case in the tables, not averaged into metrics.
    table_only = ("volume_ml_", "components_")

    ensembles = True
    output_hparams = ("num_classes", "target", "class_to_region", "region_names")

    def __init__(
        self,
        arch: str = "unet",
        encoder: str = "resnet18",
        encoder_weights: str | None = None,
        in_channels: PositiveInt = 4,
        num_classes: PositiveInt = 3,
        target: Literal["regions", "labels"] = "regions",
        region_names: list[str] | None = None,
        class_to_region: list[list[NonNegativeInt]] | None = None,
        loss: Literal["dice_ce", "dice", "ce"] = "dice_ce",
        lr: PositiveFloat = 1e-3,
        weight_decay: NonNegativeFloat = 1e-4,
        scheduler: Literal["cosine", "none"] = "cosine",
        warmup_epochs: NonNegativeInt = 1,
        threshold: ClosedUnitInterval = 0.5,
        inference_batch_size: PositiveInt = 32,
        model_kwargs: dict[str, Any] | None = None,
        display_channel: int = -1,
        log_images: bool = True,
        num_log_cases: NonNegativeInt = 3,
        metrics: list[Literal["dice", "hd95", "jaccard", "threshold_jaccard", "lesionwise"]]
        | None = None,
        predictions_dir: str | None = None,
        explain: str | None = None,
    ) -> None:
        self.setup_regions(target, num_classes, class_to_region, region_names, metrics)
        super().__init__()
        self._rows: list[dict[str, Any]] = []
        self._shown: list[dict[str, np.ndarray]] = []

    def setup_regions(
        self,
        target: str,
        num_classes: int,
        class_to_region: list[list[int]] | None,
        region_names: list[str] | None,
        metrics: list[str] | None,
    ) -> None:
        """The evaluated regions' names, the metrics, and the monitored one."""
        # Volumes and components of each case's reference, measured once per run.
        self._ref_measures: dict[str, dict[str, float]] = {}
        # Set by medlit.evaluate / medlit.predict: the postprocessing applied to every
        # prediction, and where evaluation keeps each case's raw predicted and reference
        # regions (medlit.cv's out-of-fold cases, to choose the postprocessing on).
        self.postprocessing: Postprocessing | None = None
        self.regions_dir: Path | None = None
        n_regions = num_classes if target == "regions" else num_classes - 1
        if class_to_region is not None:
            n_regions = len(class_to_region)
        names = region_names or [f"class{i + 1}" for i in range(n_regions)]
        if len(names) != n_regions:
            raise ConfigError(
                f"region_names has {len(names)} names, the task evaluates {n_regions} regions"
            )
        self.region_names = names
        self.metric_names = list(metrics or ["dice", "hd95"])
        ranking = [m for m in self.metric_names if m not in ("hd95", "lesionwise")]
        if not ranking:
            raise ConfigError("metrics must include one of dice, jaccard, threshold_jaccard")
        self.monitor = f"val/{ranking[0]}_mean"

    def setup(self, stage: str) -> None:
        """Lesion-wise metrics where the data module's challenge ranks by them (BraTS
        2023 and later), unless ``metrics`` is set."""
        dm = self.data
        if (
            self.hparams["metrics"] is None
            and dm is not None
            and dm.lesionwise()[1]
            and "lesionwise" not in self.metric_names
        ):
            self.metric_names.append("lesionwise")

    def configure_models(self) -> None:
        h = self.hparams
        self.model = create_network(
            h["arch"], h["encoder"], h["in_channels"], h["num_classes"], **(h["model_kwargs"] or {})
        )
        if h["encoder_weights"]:
            load_weights(self.model.encoder, h["encoder_weights"])

    def configure_losses(self) -> None:
        mode = "multilabel" if self.hparams["target"] == "regions" else "multiclass"
        self.dice_loss = smp.losses.DiceLoss(mode, from_logits=True)
        self.ce_loss = (
            torch.nn.BCEWithLogitsLoss() if mode == "multilabel" else torch.nn.CrossEntropyLoss()
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.model(x)

    def compute_loss(self, logits: Tensor, target: Tensor) -> Tensor:
        kind = self.hparams["loss"]
        ce_target = target.float() if self.hparams["target"] == "regions" else target.long()
        loss = logits.new_zeros(())
        if kind in ("dice_ce", "dice"):
            loss = loss + self.dice_loss(logits, target)
        if kind in ("dice_ce", "ce"):
            loss = loss + self.ce_loss(logits, ce_target)
        return loss

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> Tensor:
        if batch["image"].shape[1] != self.hparams["in_channels"]:
            raise ConfigError(
                f"the data yields {batch['image'].shape[1]} input channels, the model expects "
                f"in_channels={self.hparams['in_channels']} (modalities × (2·context_slices+1))"
            )
        loss = self.compute_loss(self(batch["image"]), batch["mask"])
        self.log_train_loss(loss, batch["image"].shape[0])
        return loss

    # ---- whole-case inference and evaluation -----------------------------------------

    @torch.no_grad()
    def predict_volume(self, volume: Tensor) -> Tensor:
        """(C, Z, Y, X) volume -> (K, Z, Y, X) probabilities of this model, or the mean of
        its ensemble's (:meth:`~medlit.tasks.base.BaseTask.set_ensemble`)."""
        return self.ensemble_mean(lambda m: m.volume_probabilities(volume))

    @property
    def explain_region(self) -> str | None:
        """The region explained (``explain``, or ``medlit.predict --explain``)."""
        return getattr(self, "_explain", None) or self.hparams.get("explain")

    @explain_region.setter
    def explain_region(self, region: str | None) -> None:
        if region is not None:
            region_index(self.region_names, region)  # refused here when it is not one
        self._explain = region

    def explain_volume(self, volume: Tensor) -> Tensor:
        """(C, Z, Y, X) -> (Z, Y, X) Seg-Grad-CAM of :attr:`explain_region`, in [0, 1]
        (2D/2.5D: slice by slice, each slice with its context)."""
        h = self.hparams
        k = region_index(self.region_names, self.explain_region)
        cam = predict_slices(
            volume,
            lambda x: seg_grad_cam(self.model, x, k, h["target"] == "regions", h["threshold"]),
            h["in_channels"],
            h["inference_batch_size"],
            32,
        )[0]
        return torch.from_numpy(normalise(cam))

    @torch.no_grad()
    def volume_probabilities(self, volume: Tensor) -> Tensor:
        """(C, Z, Y, X) volume -> (K, Z, Y, X) probabilities, slice by slice along z."""
        h = self.hparams
        return predict_slices(
            volume,
            self,
            h["in_channels"],
            h["inference_batch_size"],
            32,  # SMP encoders downsample 32×
            (lambda y: y.sigmoid()) if h["target"] == "regions" else (lambda y: y.softmax(1)),
        )

    def to_regions(self, probs: Tensor) -> np.ndarray:
        """Probabilities (K, Z, Y, X) -> boolean evaluation regions (R, Z, Y, X)."""
        h = self.hparams
        if h["target"] == "regions":
            return (probs > h["threshold"]).cpu().numpy()
        classes = probs.argmax(0).cpu().numpy()
        groups = h["class_to_region"] or [[c] for c in range(1, h["num_classes"])]
        return np.stack([np.isin(classes, g) for g in groups])

    @staticmethod
    def to_grid(
        probs: Tensor, shape: tuple[int, ...], scale: tuple[float, ...] | None = None
    ) -> Tensor:
        """(K, Z, Y, X) probabilities resampled to the (Z, Y, X) grid of the labels or the
        file: bilinearly in-plane for resized slices; trilinearly for a volume cached at
        another spacing, where ``scale`` (the source's spacing / the cache's, per axis)
        puts every source voxel exactly where the cache's resampling took it from (both
        grids start at the same voxel centre, as SimpleITK's resampler keeps the
        origin); unchanged when the grids agree."""
        shape = tuple(int(n) for n in shape)
        if tuple(probs.shape[-3:]) == shape:
            return probs
        if scale is None or all(abs(f - 1) < 1e-9 for f in scale):
            if probs.shape[-3] == shape[0]:
                return F.interpolate(probs, size=shape[1:], mode="bilinear", align_corners=False)
            out = F.interpolate(probs[None], size=shape, mode="trilinear", align_corners=False)
            return out[0]
        # Trilinear, as three 1D passes (a full sampling grid would take 3 floats per output
        # voxel: gigabytes for a CT); positions clamped to the end voxels (border).
        out = probs.float()
        for axis, (n, f) in enumerate(zip(shape, scale, strict=True), start=1):
            out = _linear_along(out, axis, n, f)
        return out.to(probs.dtype)

    def evaluate_batch(self, batch: dict[str, Any], stage: str) -> None:
        probs = self.predict_volume(batch["image"][0])
        ref = batch["mask"][0].cpu().numpy().astype(bool)
        # Resized or resampled input: scored at the label's resolution.
        probs = self.to_grid(probs, ref.shape[-3:], _scale(batch["spacing"][0], batch, 0))
        pred = self.to_regions(probs)
        if self.data is not None:  # as the label files hold them (BraTS: nested)
            pred = self.data.written_regions(pred)
        spacing = batch["spacing"][0].tolist()
        if self.regions_dir is not None:
            case_id = str(batch["case_id"][0])
            save_case(self.regions_dir, case_id, pred, ref, spacing, self.region_names)
        if self.postprocessing is not None:
            pred = self.postprocessing.apply(pred, spacing)
        diagonal = volume_diagonal(batch["shape"][0].tolist(), spacing)
        plain = [m for m in self.metric_names if m != "lesionwise"]
        row = {
            "case_id": batch["case_id"][0],
            **region_metrics(pred, ref, self.region_names, spacing, diagonal, plain),
        }
        if "lesionwise" in self.metric_names and ref.shape[-3] > 1:
            challenge = self.data.lesionwise()[0] if self.data is not None else "BraTS-GLI"
            row |= lesionwise(pred, ref, self.region_names, spacing, challenge)
        if ref.shape[-3] > 1:  # a volume (not a 2D image): its structures' sizes
            row |= structure_measures(pred, self.region_names, spacing, "pred")
            if row["case_id"] not in self._ref_measures:
                self._ref_measures[row["case_id"]] = structure_measures(
                    ref, self.region_names, spacing, "ref"
                )
            row |= self._ref_measures[row["case_id"]]
        self._rows.append(row)
        if self.hparams["predictions_dir"] and self.trainer.testing:
            if self.data is None:
                raise ConfigError("predictions_dir needs a medlit data module; unset it")
            self.data.write_prediction(row["case_id"], pred, Path(self.hparams["predictions_dir"]))
        if self.hparams["log_images"] and len(self._shown) < self.hparams["num_log_cases"]:
            z = int(ref[0].reshape(ref.shape[1], -1).sum(1).argmax())
            depth = batch["image"].shape[2]  # differs from the labels' when resampled
            image = batch["image"][0, self.hparams["display_channel"], z * depth // ref.shape[1]]
            image = image.float()
            image = F.interpolate(image[None, None], size=ref.shape[-2:])[0, 0].cpu().numpy()
            shown = {
                "case_id": row["case_id"],
                "z": z,
                "image": image,
                "ref": ref[:, z],
                "pred": pred[:, z],
            }
            if self.explain_region and not self.trainer.sanity_checking:
                cam = self.to_grid(self.explain_volume(batch["image"][0])[None], ref.shape[-3:])
                shown["cam"] = cam[0, z].cpu().numpy()
                shown["cam_region"] = self.explain_region
            self._shown.append(shown)

    def prediction_writer(self, output: Path) -> BasePredictionWriter:
        return CaseWriter(output)

    def predict_step(self, batch: dict[str, Any], batch_idx: int) -> list[dict[str, Any]]:
        """Segment whole cases; :class:`~medlit.writers.CaseWriter` writes each at once in
        the data module's format (BraTS: NIfTI on the input's grid; ISIC: a mask PNG at
        the image's size)."""
        out = []
        kind = self.uncertainty
        for i, case_id in enumerate(batch["case_id"]):
            volume = batch["image"][i]
            maps: list[Tensor] = []  # travel with the probabilities, as more channels
            if kind:
                probs, var = self.ensemble_moments(
                    lambda m, v=volume: m.volume_probabilities(v), variance=kind == "variance"
                )
                maps.append(uncertainty_map(probs, var, kind, self.hparams["target"] == "regions"))
            else:
                probs = self.predict_volume(volume)
            if self.explain_region:
                maps.append(self.explain_volume(volume).to(probs.device, probs.dtype))
            if maps:
                probs = torch.cat([probs, *(m[None] for m in maps)])
            meta = batch["meta"][i] if "meta" in batch else None
            if "size" in batch:  # resized input: back to the file's own size
                size = tuple(int(v) for v in batch["size"][i])
                probs = F.interpolate(probs, size=size, mode="bilinear", align_corners=False)
            elif (bbox := _crop_box(batch, i, meta)) is not None:
                # a volume cached at another spacing: back to the source's cropped grid
                native = (
                    list(reversed(meta["geometry"]["spacing"])) if meta else batch["spacing"][i]
                )
                probs = self.to_grid(
                    probs, tuple(b - a for a, b in bbox), _scale(native, batch, i, meta)
                )
            extra = {}
            if maps:
                names = [
                    n for n, on in (("uncertainty", kind), ("explain", self.explain_region)) if on
                ]
                extra = {
                    n: m.float().cpu().numpy()
                    for n, m in zip(names, probs[-len(maps) :], strict=True)
                }
                probs = probs[: -len(maps)]
            umap = extra.get("uncertainty")
            regions = self.to_regions(probs)
            if meta is not None and "geometry" in meta:
                spacing = list(reversed(meta["geometry"]["spacing"]))
            elif "spacing" in batch:
                spacing = [float(v) for v in batch["spacing"][i]]
            else:
                spacing = [1.0] * (regions.ndim - 1)
            if self.postprocessing is not None:
                regions = self.postprocessing.apply(regions, spacing)
            case = {"case_id": case_id, "regions": regions, "meta": meta}
            if meta is not None and "geometry" in meta and regions.shape[-3] > 1:
                case["measures"] = structure_measures(regions, self.region_names, spacing, "pred")
            if "explain" in extra:
                case["maps"] = {f"explain_{self.explain_region}": extra["explain"]}
            if umap is not None:
                case["uncertainty"] = umap
                foreground = regions.any(0)
                case["measures"] = {
                    **case.get("measures", {}),
                    f"{kind}_mean": float(umap.mean()),
                    f"{kind}_mean_foreground": (
                        float(umap[foreground].mean()) if foreground.any() else float("nan")
                    ),
                }
            out.append(case)
        return out

    def finish_stage(self, stage: str) -> None:
        rows = self.gather_rows(self._rows)
        means = self.log_case_table(stage, rows)
        stems = [m for m in self.metric_names if m != "lesionwise"]
        if "lesionwise" in self.metric_names:
            stems += ["lesion_dice", "lesion_hd95"]
        for metric in stems:  # mean over regions of the per-region means
            values = [
                means[f"{stage}/{metric}_{n}"]
                for n in self.region_names
                if f"{stage}/{metric}_{n}" in means
            ]
            if values:
                self.log(f"{stage}/{metric}_mean", float(np.mean(values)), sync_dist=True)
        if self._shown and not self.trainer.sanity_checking:
            name = (
                f"{stage}_slices/epoch_{self.current_epoch:03d}.png"
                if stage == "val"
                else f"{stage}_slices.png"
            )
            shown = self._shown
            log_file(self.trainer, name, lambda p: save_overlays(shown, self.region_names, p))
        if stage == "test" and self.hparams["predictions_dir"] and not self.trainer.sanity_checking:
            folder = Path(self.hparams["predictions_dir"])  # complete: gather_rows synced ranks
            log_folder(
                self.trainer,
                "test_predictions",
                lambda out: shutil.copytree(folder, out, dirs_exist_ok=True),
            )
        self._rows, self._shown = [], []


def _linear_along(x: Tensor, axis: int, n: int, scale: float) -> Tensor:
    """``x`` sampled linearly at ``n`` points ``i * scale`` (i = 0 .. n-1) along ``axis``,
    the points clamped to the axis's first and last voxels."""
    m = x.shape[axis]
    pos = (torch.arange(n, device=x.device, dtype=torch.float64) * scale).clamp(0, m - 1)
    lo = pos.floor().long()
    hi = (lo + 1).clamp(max=m - 1)
    view = [1] * x.ndim
    view[axis] = n
    w = (pos - lo).to(x.dtype).view(view)
    return x.index_select(axis, lo) * (1 - w) + x.index_select(axis, hi) * w


def _scale(
    native: Any, batch: dict[str, Any], i: int, meta: dict | None = None
) -> tuple[float, ...] | None:
    """Source spacing / cached spacing per axis (z, y, x) of item ``i``, when the item
    says what grid it is cached on (``grid_spacing``, or its metadata's ``spacing_zyx``)."""
    if meta is not None and "spacing_zyx" in meta:
        grid = meta["spacing_zyx"]
    elif "grid_spacing" in batch:
        grid = batch["grid_spacing"][i].tolist()
    else:
        return None
    native = native.tolist() if isinstance(native, Tensor) else list(native)
    return tuple(float(a) / float(b) for a, b in zip(native, grid, strict=True))


def _crop_box(batch: dict[str, Any], i: int, meta: dict | None) -> list[tuple[int, int]] | None:
    """The (start, stop) per axis of item ``i``'s crop in its source volume, when known."""
    if meta is not None and "bbox" in meta:
        return [tuple(pair) for pair in meta["bbox"]]
    if "bbox" in batch:
        flat = [int(v) for v in batch["bbox"][i]]
        return list(zip(flat[::2], flat[1::2], strict=True))
    return None
