"""GANTask: image synthesis with adversarial training under manual optimisation.

Two modes share one loop:

* ``paired`` (pix2pix): a U-Net generator maps input images to a target image (e.g.
  BraTS T1, T1ce, T2 -> FLAIR), a PatchGAN discriminator judges (input, output) pairs;
  loss = adversarial + ``l1_weight`` · L1. ``adversarial_weight: 0`` trains the same
  generator with L1 alone (the pix2pix ablation). Evaluation is on whole validation
  cases, within the brain: PSNR, SSIM, MAE of the generator and of a trivial baseline
  (one input channel taken as the estimate, e.g. the normalised T2 for FLAIR).
* ``unconditional`` (DCGAN-style, optionally class-conditional with a projection
  discriminator): noise (and a class) -> image. Evaluation: the Fréchet distance between
  generated and real validation images in the feature space of a local network (named
  for that network, never "FID": no Inception weights are available offline), and the
  mean pairwise feature distance of samples vs real images (mode-collapse check).

Training: one discriminator update per step, one generator update every ``d_steps``
steps (the update ratio); optional R1 gradient penalty and spectral normalisation; an
exponential moving average of the generator's weights is what evaluation and sampling
use (``ema_decay``).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from pytorch_lightning.callbacks import BasePredictionWriter
from torch import Tensor
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from medlit.artifacts import log_file
from medlit.constraints import (
    ClosedUnitInterval,
    Fraction,
    NonNegativeFloat,
    NonNegativeInt,
    PositiveFloat,
    PositiveInt,
)
from medlit.errors import ConfigError
from medlit.metrics.synthesis import (
    FeatureExtractor,
    frechet_distance,
    masked_image_metrics,
    mean_pairwise_distance,
)
from medlit.models.gan import DCGANDiscriminator, DCGANGenerator, PatchDiscriminator, UNetGenerator
from medlit.tasks.base import BaseTask, predict_slices, warmup_cosine


def adversarial_loss(kind: str, logits: Tensor, real: bool, for_generator: bool = False) -> Tensor:
    """``bce`` (pix2pix/DCGAN), ``hinge`` (SN-GAN) or ``lsgan`` losses on logits."""
    if kind == "bce":
        target = torch.ones_like(logits) if real else torch.zeros_like(logits)
        return F.binary_cross_entropy_with_logits(logits, target)
    if kind == "lsgan":
        return F.mse_loss(logits, torch.full_like(logits, 1.0 if real else 0.0))
    if for_generator:  # hinge: the generator maximises the critic's score
        return -logits.mean()
    return F.relu(1 - logits).mean() if real else F.relu(1 + logits).mean()


class GANTask(BaseTask):
    """Paired (pix2pix) or unconditional (DCGAN) image synthesis.

    Args:
        mode: ``paired`` (input images -> target image) or ``unconditional`` (noise ->
            image, class-conditional when ``num_classes`` > 0).
        in_channels: generator input channels (paired: inputs × (2·context + 1)).
        out_channels: channels of the generated image.
        image_size: side of generated images (unconditional; a power of two >= 16).
        latent_dim: noise dimension (unconditional).
        num_classes: classes of a class-conditional model (0: unconditional).
        base_channels: width of the first layer of both networks.
        depth: U-Net levels (paired); inputs must be divisible by 2**depth.
        disc_layers: PatchGAN layers (paired; 3 gives 70×70 patches).
        loss: adversarial loss: ``bce``, ``hinge`` or ``lsgan``.
        adversarial_weight: weight of the generator's adversarial loss; 0 trains with
            L1 alone and skips the discriminator (paired ablation).
        l1_weight: weight of the L1 loss to the target (paired).
        d_steps: discriminator updates per generator update.
        r1_gamma: R1 gradient penalty on real inputs (0: off).
        spectral_norm: spectral normalisation in the discriminator.
        ema_decay: decay of the generator's weight average used for evaluation and
            sampling (0: use the raw generator).
        lr_g: Adam learning rate of the generator.
        lr_d: Adam learning rate of the discriminator.
        beta1: Adam beta1 (0.5 in pix2pix/DCGAN).
        scheduler: ``cosine`` decay per epoch of both learning rates, or ``none``.
        baseline_channel: paired: which input channel (of the centre slice) is the
            trivial baseline estimate of the target (e.g. 2 = T2 for FLAIR).
        fd_model: timm model whose pooled features define the Fréchet distance.
        fd_weights: local weights for ``fd_model``; default a fixed seeded random
            initialisation (the metric is named after what it is).
        fd_samples: generated images compared with the real validation images.
        sample_every_n_epochs: log a grid of samples every N epochs (at validation
            epochs; also after the first).
        num_samples: images in the sample grid.
        inference_batch_size: slices per forward pass on whole cases (paired).
        log_images: log sample grids / slices as PNG.
    """

    # Under DDP: each of the two backward passes of a step reaches only one network, so
    # ``strategy: ddp`` becomes ``ddp_find_unused_parameters_true`` (medlit.cli).
    ddp_find_unused_parameters = True

    def __init__(
        self,
        mode: Literal["paired", "unconditional"] = "paired",
        in_channels: PositiveInt = 3,
        out_channels: PositiveInt = 1,
        image_size: PositiveInt = 64,
        latent_dim: PositiveInt = 128,
        num_classes: NonNegativeInt = 0,
        base_channels: PositiveInt = 64,
        depth: PositiveInt = 4,
        disc_layers: PositiveInt = 3,
        loss: Literal["bce", "hinge", "lsgan"] = "bce",
        adversarial_weight: NonNegativeFloat = 1.0,
        l1_weight: NonNegativeFloat = 100.0,
        d_steps: PositiveInt = 1,
        r1_gamma: NonNegativeFloat = 0.0,
        spectral_norm: bool = False,
        ema_decay: ClosedUnitInterval = 0.999,
        lr_g: PositiveFloat = 2e-4,
        lr_d: PositiveFloat = 2e-4,
        beta1: Fraction = 0.5,
        scheduler: Literal["cosine", "none"] = "cosine",
        baseline_channel: NonNegativeInt | None = None,
        fd_model: str = "resnet18",
        fd_weights: str | None = None,
        fd_samples: PositiveInt = 256,
        sample_every_n_epochs: PositiveInt = 1,
        num_samples: PositiveInt = 64,
        inference_batch_size: PositiveInt = 32,
        log_images: bool = True,
    ) -> None:
        super().__init__()
        self.automatic_optimization = False
        self._rows: list[dict[str, Any]] = []
        self._real_feats: Tensor | None = None
        self._real_images: list[Tensor] = []
        self._real_ids: list[str] = []
        self._shown: dict[str, Any] | None = None
        if mode == "paired":
            self.monitor, self.mode = "val/psnr", "max"
        else:
            self.monitor, self.mode = f"val/{self.features.name}", "min"

    def prediction_writer(self, output: Path) -> BasePredictionWriter:
        raise ConfigError("a GAN writes its images with python -m medlit.generate, not predict")

    def configure_models(self) -> None:
        h = self.hparams
        if h["d_steps"] < 1:
            raise ConfigError(f"model.d_steps={h['d_steps']} must be at least 1")
        if h["mode"] == "paired":
            self.generator = UNetGenerator(
                h["in_channels"], h["out_channels"], h["base_channels"], h["depth"]
            )
            self.discriminator = PatchDiscriminator(
                h["in_channels"] + h["out_channels"],
                h["base_channels"],
                h["disc_layers"],
                norm="none" if h["spectral_norm"] else "instance",
                spectral_norm=h["spectral_norm"],
            )
        else:
            self.generator = DCGANGenerator(
                h["latent_dim"],
                h["out_channels"],
                h["image_size"],
                h["base_channels"],
                h["num_classes"],
            )
            self.discriminator = DCGANDiscriminator(
                h["out_channels"],
                h["image_size"],
                h["base_channels"],
                h["num_classes"],
                spectral_norm=h["spectral_norm"],
            )
            # Not a registered submodule: fixed, never trained, not saved with the model.
            self.__dict__["features"] = FeatureExtractor(
                h["fd_model"], h["fd_weights"], image_size=max(h["image_size"], 64)
            )
        self.generator_ema = (
            AveragedModel(self.generator, multi_avg_fn=get_ema_multi_avg_fn(h["ema_decay"]))
            if h["ema_decay"] > 0
            else None
        )

    @property
    def sampler(self) -> torch.nn.Module:
        """The generator used for evaluation and sampling (its EMA when enabled)."""
        return self.generator_ema.module if self.generator_ema is not None else self.generator

    def configure_optimizers(self) -> Any:
        h = self.hparams
        betas = (h["beta1"], 0.999)
        opt_g = torch.optim.Adam(self.generator.parameters(), lr=h["lr_g"], betas=betas)
        opt_d = torch.optim.Adam(self.discriminator.parameters(), lr=h["lr_d"], betas=betas)
        if h["scheduler"] == "none":
            return [opt_g, opt_d]
        total = max(int(self.trainer.max_epochs or 1), 1)
        return [opt_g, opt_d], [warmup_cosine(opt_g, total), warmup_cosine(opt_d, total)]

    # ---- training ------------------------------------------------------------------------

    def _generate(self, batch: dict[str, Any], net: torch.nn.Module | None = None) -> Tensor:
        net = net or self.generator
        if self.hparams["mode"] == "paired":
            return net(batch["image"])
        n = len(batch["image"])
        z = torch.randn(n, self.hparams["latent_dim"], device=self.device)
        return net(z, batch.get("label") if self.hparams["num_classes"] else None)

    def _judge(self, batch: dict[str, Any], image: Tensor) -> Tensor:
        if self.hparams["mode"] == "paired":
            return self.discriminator(torch.cat([batch["image"], image], 1))
        labels = batch.get("label") if self.hparams["num_classes"] else None
        return self.discriminator(image, labels)

    def _real(self, batch: dict[str, Any]) -> Tensor:
        return batch["target_image"] if self.hparams["mode"] == "paired" else batch["image"]

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> dict[str, Tensor]:
        h = self.hparams
        opt_g, opt_d = self.optimizers()
        real = self._real(batch)
        n = len(real)
        fake = self._generate(batch)
        adversarial = h["adversarial_weight"] > 0
        if adversarial:
            real_in = real.detach().requires_grad_(h["r1_gamma"] > 0)
            logits_real = self._judge(batch, real_in)
            d_loss = adversarial_loss(h["loss"], logits_real, True) + adversarial_loss(
                h["loss"], self._judge(batch, fake.detach()), False
            )
            if h["r1_gamma"] > 0:  # R1: penalise the critic's gradient on real data
                (grad,) = torch.autograd.grad(logits_real.sum(), real_in, create_graph=True)
                d_loss = d_loss + h["r1_gamma"] / 2 * grad.pow(2).flatten(1).sum(1).mean()
            opt_d.zero_grad(set_to_none=True)
            self.manual_backward(d_loss)
            opt_d.step()
            self.log("train/d_loss", d_loss, on_step=True, on_epoch=True, batch_size=n)
        if batch_idx % h["d_steps"]:
            return {"loss": d_loss.detach()}  # FiniteLossGuard checks what a step returns
        g_loss = torch.zeros((), device=self.device)
        if adversarial:
            g_adv = adversarial_loss(h["loss"], self._judge(batch, fake), True, for_generator=True)
            g_loss = g_loss + h["adversarial_weight"] * g_adv
            self.log("train/g_adv", g_adv, on_step=False, on_epoch=True, batch_size=n)
        if h["mode"] == "paired":
            l1 = F.l1_loss(fake, real)
            g_loss = g_loss + h["l1_weight"] * l1
            self.log("train/l1", l1, on_step=False, on_epoch=True, batch_size=n)
        opt_g.zero_grad(set_to_none=True)
        self.manual_backward(g_loss)
        opt_g.step()
        if self.generator_ema is not None:
            self.generator_ema.update_parameters(self.generator)
            # BatchNorm statistics are copied, not averaged: an average still dominated by
            # the initial (0, 1) statistics makes a DCGAN generator emit one flat image.
            for ema_buffer, buffer in zip(
                self.generator_ema.module.buffers(), self.generator.buffers(), strict=True
            ):
                ema_buffer.copy_(buffer)
        self.log_train_loss(g_loss, n)
        return {"loss": g_loss.detach()}

    def on_train_epoch_end(self) -> None:
        for scheduler in self.lr_schedulers() or []:
            scheduler.step()

    # ---- paired evaluation on whole cases -----------------------------------------------

    @torch.no_grad()
    def synthesise_volume(self, volume: Tensor) -> Tensor:
        """(C, Z, Y, X) inputs -> (out_channels, Z, Y, X), slice by slice along z."""
        h = self.hparams
        return predict_slices(
            volume, self.sampler, h["in_channels"], h["inference_batch_size"], 2 ** h["depth"]
        )

    def _evaluate_case(self, batch: dict[str, Any], stage: str) -> None:
        image, target = batch["image"][0], batch["target_image"][0]
        brain = batch["brain"][0]
        pred = self.synthesise_volume(image)
        row = {"case_id": batch["case_id"][0]}
        row.update(masked_image_metrics(pred[0].float(), target[0].float(), brain))
        k = self.hparams["baseline_channel"]
        if k is not None:
            base = masked_image_metrics(image[k].float(), target[0].float(), brain)
            row.update({f"baseline_{m}": v for m, v in base.items()})
        self._rows.append(row)
        if self._shown is None and self.hparams["log_images"]:
            z = int(brain.flatten(1).sum(1).argmax())
            self._shown = {
                "input": image[:, z].cpu(),
                "target": target[0, z].cpu(),
                "pred": pred[0, z].cpu(),
                "case_id": row["case_id"],
            }

    # ---- unconditional evaluation --------------------------------------------------------

    def _collect_real(self, batch: dict[str, Any]) -> None:
        if self._real_feats is None:
            self._real_images.append(batch["image"].detach().cpu())
            self._real_ids.extend(batch["case_id"])

    @torch.no_grad()
    def _sample(self, n: int, seed: int = 0) -> tuple[Tensor, Tensor | None]:
        """``n`` images from the sampling generator with fixed noise (comparable epochs);
        class-conditional models cycle through the classes."""
        h = self.hparams
        g = torch.Generator().manual_seed(seed)
        z = torch.randn(n, h["latent_dim"], generator=g).to(self.device)
        labels = (torch.arange(n) % h["num_classes"]).to(self.device) if h["num_classes"] else None
        net = self.sampler
        out = [
            net(z[i : i + 64], None if labels is None else labels[i : i + 64])
            for i in range(0, n, 64)
        ]
        return torch.cat(out).clamp(-1, 1), labels

    def _features(self, images: Tensor) -> Tensor:
        f = self.features.to(self.device)
        return torch.cat(
            [f(images[i : i + 64].to(self.device)) for i in range(0, len(images), 64)]
        ).cpu()

    def _finish_unconditional(self, stage: str) -> None:
        if self.trainer.sanity_checking:  # a few batches: not the real image distribution
            self._real_images, self._real_ids = [], []
            return
        if self._real_feats is None:
            # Under DDP each rank saw a disjoint share of the real images: the reference
            # statistics are those of all of them.
            feats = self._features(torch.cat(self._real_images)) if self._real_images else []
            local = dict(zip(self._real_ids, feats, strict=True))
            self._real_images, self._real_ids = [], []
            by_id = {k: v for part in self.all_ranks(local) for k, v in part.items()}
            if not by_id:
                return
            self._real_feats = torch.stack([by_id[k] for k in sorted(by_id)])
        n = self.hparams["fd_samples"]
        fake, _ = self._sample(n)
        fake_feats = self._features(fake)
        name = self.features.name
        self.log(f"{stage}/{name}", frechet_distance(fake_feats, self._real_feats), sync_dist=True)
        self.log(f"{stage}/diversity", mean_pairwise_distance(fake_feats), sync_dist=True)
        self.log(
            f"{stage}/diversity_real", mean_pairwise_distance(self._real_feats), sync_dist=True
        )
        every = self.hparams["sample_every_n_epochs"]
        if (
            self.hparams["log_images"]
            and not self.trainer.sanity_checking
            and (
                stage == "test" or self.current_epoch == 0 or (self.current_epoch + 1) % every == 0
            )
        ):
            grid, _ = self._sample(self.hparams["num_samples"], seed=1)
            name = (
                "test_samples.png"
                if stage == "test"
                else f"samples/epoch_{self.current_epoch:03d}.png"
            )
            log_file(self.trainer, name, lambda p: save_grid(grid, p))

    # ---- hooks ---------------------------------------------------------------------------

    def evaluate_batch(self, batch: dict[str, Any], stage: str) -> None:
        if self.hparams["mode"] == "paired":
            self._evaluate_case(batch, stage)
        else:
            self._collect_real(batch)

    def finish_stage(self, stage: str) -> None:
        if self.hparams["mode"] == "unconditional":
            self._finish_unconditional(stage)
            return
        rows = self.gather_rows(self._rows)
        self._rows = []
        self.log_case_table(stage, rows)
        shown, self._shown = self._shown, None
        if shown is not None and not self.trainer.sanity_checking:
            name = (
                "test_slices.png"
                if stage == "test"
                else f"val_slices/epoch_{self.current_epoch:03d}.png"
            )
            log_file(self.trainer, name, lambda p: save_synthesis(shown, p))

    def on_test_epoch_start(self) -> None:
        self._real_feats, self._real_images, self._real_ids = None, [], []  # test images

    # ---- outputs -------------------------------------------------------------------------

    @torch.no_grad()
    def generate_images(self, n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray | None]:
        """``n`` samples as uint8 (N, H, W, C) RGB, and their classes when conditional."""
        images, labels = self._sample(n, seed)
        pixels = ((images + 1) * 127.5).round().clamp(0, 255).byte().permute(0, 2, 3, 1)
        return pixels.cpu().numpy(), None if labels is None else labels.cpu().numpy()


def save_grid(images: Tensor, path: str | Path) -> None:
    """A square grid of images in [-1, 1] as PNG."""
    from torchvision.utils import save_image

    save_image(
        images.float().cpu(),
        str(path),
        nrow=int(math.ceil(math.sqrt(len(images)))),
        normalize=True,
        value_range=(-1, 1),
    )


def save_synthesis(shown: dict[str, Any], path: str | Path) -> None:
    """Inputs, target and synthesised slice side by side (same grey scale for the last two)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    inputs = list(shown["input"])
    panels = [*inputs, shown["target"], shown["pred"]]
    titles = [f"input {i}" for i in range(len(inputs))] + ["target", "synthesised"]
    lo, hi = float(shown["target"].min()), float(shown["target"].max())
    fig, axes = plt.subplots(1, len(panels), figsize=(2.4 * len(panels), 2.6))
    for k, (ax, img, title) in enumerate(zip(axes, panels, titles, strict=True)):
        ax.imshow(
            img.numpy(), cmap="gray", **({"vmin": lo, "vmax": hi} if k >= len(inputs) else {})
        )
        ax.set_title(f"{shown['case_id']} {title}" if k == 0 else title, fontsize=7)
        ax.set_axis_off()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
