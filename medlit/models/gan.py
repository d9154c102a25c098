"""GAN networks no library provides: the pix2pix U-Net generator and PatchGAN discriminator
(paired image-to-image synthesis), and DCGAN-style generator / discriminator for noise ->
image synthesis, optionally class-conditional (projection discriminator, Miyato & Koyama 2018).
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize
from torch.nn.utils.parametrizations import spectral_norm as _spectral_norm

_WEIGHTED = (
    *(getattr(nn, f"{kind}{d}d") for kind in ("Conv", "ConvTranspose") for d in (1, 2, 3)),
    nn.Linear,
)
_NORMS = (
    *(getattr(nn, f"{kind}{d}d") for kind in ("BatchNorm", "InstanceNorm") for d in (1, 2, 3)),
    nn.GroupNorm,
    nn.LayerNorm,
)


def init_weights(module: nn.Module, std: float = 0.02) -> None:
    """DCGAN / pix2pix initialisation of ``module`` and all its submodules, in place.

    Convolution and linear weights ~ N(0, ``std``), affine normalisation weights ~ N(1, ``std``),
    all their biases zero. Embeddings are left alone. For a spectrally normalised layer the
    unnormalised weight (``parametrizations.weight.original``) is initialised.
    """
    for m in module.modules():
        if isinstance(m, _WEIGHTED):
            if parametrize.is_parametrized(m, "weight"):
                weight = m.parametrizations.weight.original
            else:
                weight = m.weight
            nn.init.normal_(weight, 0.0, std)
        elif isinstance(m, _NORMS) and getattr(m, "weight", None) is not None:
            nn.init.normal_(m.weight, 1.0, std)
        else:
            continue
        if getattr(m, "bias", None) is not None:
            nn.init.zeros_(m.bias)


def apply_spectral_norm(module: nn.Module) -> None:
    """Wrap the weight of every convolution, linear layer and embedding of ``module`` in
    ``torch.nn.utils.parametrizations.spectral_norm`` (in place)."""
    for m in [m for m in module.modules() if isinstance(m, (*_WEIGHTED, nn.Embedding))]:
        _spectral_norm(m)


def _norm(kind: str, channels: int) -> nn.Module:
    if kind == "batch":
        return nn.BatchNorm2d(channels)
    if kind == "instance":
        return nn.InstanceNorm2d(channels, affine=True)
    raise ValueError(f"norm={kind!r}: expected 'batch' or 'instance'")


def _check_labels(labels: Tensor | None, num_classes: int, n: int, who: str) -> None:
    if num_classes > 0 and labels is None:
        raise ValueError(f"{who} is class-conditional (num_classes={num_classes}): labels needed")
    if num_classes == 0 and labels is not None:
        raise ValueError(f"{who} is unconditional (num_classes=0) but labels were given")
    if labels is not None and labels.shape != (n,):
        raise ValueError(f"{who}: labels must have shape ({n},), got {tuple(labels.shape)}")


def _power_of_two_levels(image_size: int, who: str) -> int:
    """log2(image_size) - 2: the stride-2 stages between 4×4 and ``image_size``."""
    if image_size < 16 or image_size & (image_size - 1):
        raise ValueError(f"{who}: image_size={image_size} must be a power of two >= 16")
    return int(math.log2(image_size)) - 2


class UNetGenerator(nn.Module):
    """The pix2pix U-Net (Isola et al. 2017): (N, in_channels, H, W) -> (N, out_channels, H, W).

    Encoder level i: Conv 4×4 stride 2 -> norm -> LeakyReLU(0.2), with ``base_channels · 2^i``
    channels capped at ``8 · base_channels`` (no norm on the outermost and innermost levels,
    as in pix2pix). Decoder: ConvTranspose 4×4 stride 2 -> norm -> ReLU, concatenated with the
    encoder features of the same resolution; dropout after the (up to) three innermost decoder
    blocks (pix2pix's noise source; active in training mode only); a last ConvTranspose maps
    to ``out_channels``.

    Args:
        in_channels: input channels.
        out_channels: output channels.
        base_channels: channels of the first encoder level.
        depth: levels (stride-2 stages); H and W must be divisible by ``2**depth``.
        norm: ``instance`` (affine) or ``batch`` normalisation.
        dropout: dropout probability in the innermost decoder blocks (0: none).
        output: ``linear`` (unbounded, e.g. z-scored intensities) or ``tanh`` (in [-1, 1]).
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        base_channels: int = 64,
        depth: int = 4,
        norm: Literal["batch", "instance"] = "instance",
        dropout: float = 0.5,
        output: Literal["linear", "tanh"] = "linear",
    ) -> None:
        super().__init__()
        if depth < 1:
            raise ValueError(f"UNetGenerator: depth={depth} must be at least 1")
        if output not in ("linear", "tanh"):
            raise ValueError(f"UNetGenerator: output={output!r}: expected 'linear' or 'tanh'")
        self.depth = depth
        chans = [min(base_channels * 2**i, 8 * base_channels) for i in range(depth)]
        self.down = nn.ModuleList()
        prev = in_channels
        for i, c in enumerate(chans):
            normed = 0 < i < depth - 1
            layers = [nn.Conv2d(prev, c, 4, 2, 1, bias=not normed)]
            layers += [_norm(norm, c)] if normed else []
            self.down.append(nn.Sequential(*layers, nn.LeakyReLU(0.2)))
            prev = c
        self.up = nn.ModuleList()
        for k, i in enumerate(range(depth - 1, 0, -1)):
            c = chans[i - 1]
            layers = [nn.ConvTranspose2d(prev, c, 4, 2, 1, bias=False), _norm(norm, c), nn.ReLU()]
            layers += [nn.Dropout(dropout)] if dropout > 0 and k < 3 else []
            self.up.append(nn.Sequential(*layers))
            prev = 2 * c
        self.final = nn.ConvTranspose2d(prev, out_channels, 4, 2, 1)
        self.activation = nn.Tanh() if output == "tanh" else nn.Identity()
        init_weights(self)

    def forward(self, x: Tensor) -> Tensor:
        """(N, in_channels, H, W) -> (N, out_channels, H, W); H, W divisible by 2**depth."""
        multiple = 2**self.depth
        if x.shape[-2] % multiple or x.shape[-1] % multiple:
            raise ValueError(
                f"UNetGenerator (depth={self.depth}): input size {tuple(x.shape[-2:])} is not "
                f"divisible by 2**depth={multiple}; pad or crop the input"
            )
        skips = []
        for down in self.down:
            x = down(x)
            skips.append(x)
        x = skips.pop()
        for up in self.up:
            x = torch.cat([up(x), skips.pop()], 1)
        return self.activation(self.final(x))


class PatchDiscriminator(nn.Module):
    """The pix2pix PatchGAN: (N, in_channels, H, W) -> (N, 1, h, w) real/fake logits per patch.

    Conv 4×4 stride 2 + LeakyReLU(0.2), then ``n_layers - 1`` more stride-2 and one stride-1
    Conv 4×4 + norm + LeakyReLU (channels doubling, capped at ``8 · base_channels``), then a
    stride-1 Conv 4×4 to one channel. ``n_layers=3`` gives 70×70 patches (h = H/8 - 2).

    Args:
        in_channels: input channels (paired use: inputs and output concatenated).
        base_channels: channels of the first layer.
        n_layers: stride-2 stages.
        norm: ``instance`` (affine), ``batch`` or ``none``.
        spectral_norm: spectrally normalise every convolution; no normalisation layers are
            used then, whatever ``norm`` says.
    """

    def __init__(
        self,
        in_channels: int,
        base_channels: int = 64,
        n_layers: int = 3,
        norm: Literal["batch", "instance", "none"] = "instance",
        spectral_norm: bool = False,
    ) -> None:
        super().__init__()
        if n_layers < 1:
            raise ValueError(f"PatchDiscriminator: n_layers={n_layers} must be at least 1")
        if norm not in ("batch", "instance", "none"):
            raise ValueError(f"norm={norm!r}: expected 'batch', 'instance' or 'none'")
        normed = norm != "none" and not spectral_norm
        layers: list[nn.Module] = [
            nn.Conv2d(in_channels, base_channels, 4, 2, 1),
            nn.LeakyReLU(0.2),
        ]
        mult = 1
        for n in range(1, n_layers + 1):
            prev, mult = mult, min(2**n, 8)
            stride = 2 if n < n_layers else 1
            layers.append(
                nn.Conv2d(base_channels * prev, base_channels * mult, 4, stride, 1, bias=not normed)
            )
            layers += [_norm(norm, base_channels * mult)] if normed else []
            layers.append(nn.LeakyReLU(0.2))
        layers.append(nn.Conv2d(base_channels * mult, 1, 4, 1, 1))
        self.net = nn.Sequential(*layers)
        init_weights(self)
        if spectral_norm:
            apply_spectral_norm(self)

    def forward(self, x: Tensor) -> Tensor:
        """(N, in_channels, H, W) -> (N, 1, h, w) logits (unbounded)."""
        return self.net(x)


class DCGANGenerator(nn.Module):
    """DCGAN-style generator: noise (N, latent_dim) [+ class] -> (N, out_channels, S, S) in [-1, 1].

    z is projected to 4×4 × ``base_channels · 2^(k-1)`` (ConvTranspose 4×4 on the 1×1 noise,
    BatchNorm, ReLU; k = log2(S) - 2), then ConvTranspose 4×4 stride 2 + BatchNorm + ReLU
    halve the channels while doubling the size, and a last ConvTranspose + tanh gives the
    image. Class-conditional when ``num_classes`` > 0: z is multiplied element-wise by a
    learned class embedding (``nn.Embedding(num_classes, latent_dim)``, N(0, 1) init).

    Args:
        latent_dim: noise dimension.
        out_channels: image channels.
        image_size: image side S, a power of two >= 16 (e.g. 64 or 128).
        base_channels: channels of the last hidden layer.
        num_classes: classes of a class-conditional generator (0: unconditional).
    """

    def __init__(
        self,
        latent_dim: int = 128,
        out_channels: int = 3,
        image_size: int = 64,
        base_channels: int = 64,
        num_classes: int = 0,
    ) -> None:
        super().__init__()
        levels = _power_of_two_levels(image_size, "DCGANGenerator")
        self.latent_dim, self.num_classes = latent_dim, num_classes
        c = base_channels * 2 ** (levels - 1)
        layers: list[nn.Module] = [
            nn.ConvTranspose2d(latent_dim, c, 4, 1, 0, bias=False),
            nn.BatchNorm2d(c),
            nn.ReLU(),
        ]
        for _ in range(levels - 1):
            layers += [nn.ConvTranspose2d(c, c // 2, 4, 2, 1, bias=False), nn.BatchNorm2d(c // 2)]
            layers.append(nn.ReLU())
            c //= 2
        layers += [nn.ConvTranspose2d(c, out_channels, 4, 2, 1), nn.Tanh()]
        self.net = nn.Sequential(*layers)
        self.embed = nn.Embedding(num_classes, latent_dim) if num_classes > 0 else None
        init_weights(self)

    def forward(self, z: Tensor, labels: Tensor | None = None) -> Tensor:
        """(N, latent_dim) noise and (N,) int64 classes (conditional only) -> (N, C, S, S)."""
        z = z.reshape(len(z), -1)
        if z.shape[1] != self.latent_dim:
            raise ValueError(f"DCGANGenerator: z has {z.shape[1]} dims, expected {self.latent_dim}")
        _check_labels(labels, self.num_classes, len(z), "DCGANGenerator")
        if self.embed is not None:
            z = z * self.embed(labels)
        return self.net(z[:, :, None, None])


class DCGANDiscriminator(nn.Module):
    """DCGAN-style discriminator with an optional projection head: (N, C, S, S) -> (N,) logits.

    Conv 4×4 stride 2 + LeakyReLU(0.2) from S down to 4×4 (channels ``base_channels · 2^i``;
    BatchNorm after every conv but the first unless ``spectral_norm``), global average
    pooling to F = ``base_channels · 2^(k-1)`` features (k = log2(S) - 2), a linear logit and,
    when class-conditional, the projection term ``sum(embed(y) * features)``.

    Args:
        in_channels: image channels.
        image_size: image side S, a power of two >= 16.
        base_channels: channels of the first layer.
        num_classes: classes of a projection discriminator (0: unconditional).
        spectral_norm: spectrally normalise every conv, the linear head and the class
            embedding (SN-GAN); no BatchNorm then.
    """

    def __init__(
        self,
        in_channels: int = 3,
        image_size: int = 64,
        base_channels: int = 64,
        num_classes: int = 0,
        spectral_norm: bool = True,
    ) -> None:
        super().__init__()
        levels = _power_of_two_levels(image_size, "DCGANDiscriminator")
        self.num_classes = num_classes
        layers: list[nn.Module] = []
        prev = in_channels
        for i in range(levels):
            c = base_channels * 2**i
            normed = i > 0 and not spectral_norm
            layers.append(nn.Conv2d(prev, c, 4, 2, 1, bias=not normed))
            layers += [nn.BatchNorm2d(c)] if normed else []
            layers.append(nn.LeakyReLU(0.2))
            prev = c
        self.body = nn.Sequential(*layers)
        self.num_features = prev
        self.head = nn.Linear(prev, 1)
        self.embed = nn.Embedding(num_classes, prev) if num_classes > 0 else None
        init_weights(self)
        if self.embed is not None:
            nn.init.normal_(self.embed.weight, 0.0, 0.02)
        if spectral_norm:
            apply_spectral_norm(self)

    def features(self, x: Tensor) -> Tensor:
        """(N, C, S, S) images -> (N, num_features) pooled penultimate features."""
        return self.body(x).mean((2, 3))

    def forward(self, x: Tensor, labels: Tensor | None = None) -> Tensor:
        """(N, C, S, S) images and (N,) int64 classes (conditional only) -> (N,) logits."""
        _check_labels(labels, self.num_classes, len(x), "DCGANDiscriminator")
        f = self.features(x)
        logits = self.head(f).squeeze(1)
        if self.embed is not None:
            logits = logits + (self.embed(labels) * f).sum(1)
        return logits
