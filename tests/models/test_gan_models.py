"""Shapes, value ranges, conditioning and gradient flow of the GAN networks (tiny sizes)."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils import parametrize

from medlit.models.gan import (
    DCGANDiscriminator,
    DCGANGenerator,
    PatchDiscriminator,
    UNetGenerator,
    init_weights,
)


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


def test_unet_shapes_and_output_modes() -> None:
    x = torch.randn(2, 3, 32, 32)
    net = UNetGenerator(3, 1, base_channels=8, depth=3)
    assert net(x).shape == (2, 1, 32, 32)
    assert net(x).abs().max() > 0  # linear output: not squashed, not dead
    tanh = UNetGenerator(3, 2, base_channels=8, depth=4, norm="batch", output="tanh")
    y = tanh(x)
    assert y.shape == (2, 2, 32, 32) and y.abs().max() <= 1


def test_unet_rejects_sizes_not_divisible_by_two_to_the_depth() -> None:
    net = UNetGenerator(3, 1, base_channels=8, depth=3)
    with pytest.raises(ValueError, match="divisible by 2\\*\\*depth=8"):
        net(torch.randn(1, 3, 32, 36))


def test_patch_discriminator_shape_and_70_pixel_receptive_field() -> None:
    d = PatchDiscriminator(4, base_channels=8)
    assert d(torch.randn(2, 4, 32, 32)).shape == (2, 1, 2, 2)
    # Without normalisation (which couples all pixels) one logit sees a 70×70 patch.
    d = PatchDiscriminator(1, base_channels=4, norm="none")
    x = torch.randn(1, 1, 96, 96, requires_grad=True)
    out = d(x)
    out[0, 0, out.shape[2] // 2, out.shape[3] // 2].backward()
    rows, cols = x.grad[0, 0].abs().gt(0).nonzero().unbind(1)
    assert rows.max() - rows.min() + 1 == 70 and cols.max() - cols.min() + 1 == 70


@pytest.mark.parametrize("size", [32, 64])
def test_dcgan_shapes_and_range(size: int) -> None:
    g = DCGANGenerator(latent_dim=16, out_channels=3, image_size=size, base_channels=8)
    img = g(torch.randn(2, 16))
    assert img.shape == (2, 3, size, size)
    assert img.min() >= -1 and img.max() <= 1
    d = DCGANDiscriminator(3, size, base_channels=8)
    assert d(img).shape == (2,)
    assert d.features(img).shape == (2, d.num_features) == (2, 8 * size // 8)


@pytest.mark.parametrize("size", [8, 48, 100])
def test_dcgan_rejects_bad_image_sizes(size: int) -> None:
    with pytest.raises(ValueError, match="power of two"):
        DCGANGenerator(image_size=size)
    with pytest.raises(ValueError, match="power of two"):
        DCGANDiscriminator(image_size=size)


def test_conditional_generator_output_depends_on_the_label() -> None:
    g = DCGANGenerator(16, 3, 32, base_channels=8, num_classes=3).eval()
    z = torch.randn(1, 16).expand(2, 16)
    out = g(z, torch.tensor([0, 2]))
    assert not torch.allclose(out[0], out[1])
    with pytest.raises(ValueError, match="labels"):
        g(z)


@pytest.mark.parametrize("spectral_norm", [True, False])
def test_projection_discriminator_output_depends_on_the_label(spectral_norm: bool) -> None:
    d = DCGANDiscriminator(3, 32, 8, num_classes=3, spectral_norm=spectral_norm).eval()
    x = torch.randn(1, 3, 32, 32).expand(2, -1, -1, -1)
    logits = d(x, torch.tensor([0, 1]))
    assert logits.shape == (2,) and logits[0] != logits[1]


def test_spectral_norm_parametrizes_every_weight_and_drops_batchnorm() -> None:
    for d in (
        DCGANDiscriminator(3, 32, 8, num_classes=2, spectral_norm=True),
        PatchDiscriminator(4, 8, spectral_norm=True),
    ):
        weighted = [m for m in d.modules() if isinstance(m, (nn.Conv2d, nn.Linear, nn.Embedding))]
        assert weighted and all(parametrize.is_parametrized(m, "weight") for m in weighted)
        assert not any(isinstance(m, (nn.BatchNorm2d, nn.InstanceNorm2d)) for m in d.modules())
    plain = DCGANDiscriminator(3, 32, 8, spectral_norm=False)
    assert not any(parametrize.is_parametrized(m) for m in plain.modules())
    assert sum(isinstance(m, nn.BatchNorm2d) for m in plain.modules()) == 2  # not the first


def test_init_weights_follows_dcgan() -> None:
    net = nn.Sequential(nn.Conv2d(3, 64, 3), nn.BatchNorm2d(64))
    init_weights(net, std=0.02)
    assert abs(float(net[0].weight.detach().std()) - 0.02) < 0.005 and not net[0].bias.any()
    assert abs(float(net[1].weight.detach().mean()) - 1) < 0.02 and not net[1].bias.any()


def _step(
    g: nn.Module,
    d: nn.Module,
    fake_fn: Callable[[], Tensor],
    real: Tensor,
    judge: Callable[[Tensor], Tensor],
) -> tuple[dict[str, Tensor], dict[str, Tensor | None]]:
    """One D and one G update (BCE); returns the parameters before and the grads seen."""
    before = {n: p.detach().clone() for n, p in [*g.named_parameters(), *d.named_parameters()]}
    opt_g = torch.optim.Adam(g.parameters(), lr=1e-3)
    opt_d = torch.optim.Adam(d.parameters(), lr=1e-3)
    fake = fake_fn()
    lr_, lf = judge(real), judge(fake.detach())
    d_loss = F.binary_cross_entropy_with_logits(lr_, torch.ones_like(lr_))
    d_loss = d_loss + F.binary_cross_entropy_with_logits(lf, torch.zeros_like(lf))
    opt_d.zero_grad()
    d_loss.backward()
    grads = {n: p.grad for n, p in d.named_parameters()}
    opt_d.step()
    lg = judge(fake)
    g_loss = F.binary_cross_entropy_with_logits(lg, torch.ones_like(lg)) + F.l1_loss(fake, real)
    opt_g.zero_grad()
    g_loss.backward()
    grads.update({n: p.grad for n, p in g.named_parameters()})
    opt_g.step()
    return before, grads


def _assert_all_updated(
    g: nn.Module, d: nn.Module, before: dict[str, Tensor], grads: dict[str, Tensor | None]
) -> None:
    missing = [n for n, grad in grads.items() if grad is None]
    assert not missing, f"no gradient for {missing}"
    unchanged = [
        n for n, p in [*g.named_parameters(), *d.named_parameters()] if torch.equal(p, before[n])
    ]
    assert not unchanged, f"not updated: {unchanged}"


def test_one_pix2pix_step_updates_every_parameter() -> None:
    g = UNetGenerator(3, 1, base_channels=8, depth=3)
    d = PatchDiscriminator(4, base_channels=8)
    x, y = torch.randn(2, 3, 32, 32), torch.randn(2, 1, 32, 32)
    before, grads = _step(g, d, lambda: g(x), y, lambda img: d(torch.cat([x, img], 1)))
    _assert_all_updated(g, d, before, grads)


@pytest.mark.parametrize("spectral_norm", [True, False])
def test_one_conditional_dcgan_step_updates_every_parameter(spectral_norm: bool) -> None:
    g = DCGANGenerator(16, 3, 32, base_channels=8, num_classes=2)
    d = DCGANDiscriminator(3, 32, 8, num_classes=2, spectral_norm=spectral_norm)
    labels = torch.tensor([0, 1])
    real = torch.rand(2, 3, 32, 32) * 2 - 1
    before, grads = _step(
        g, d, lambda: g(torch.randn(2, 16), labels), real, lambda img: d(img, labels)
    )
    _assert_all_updated(g, d, before, grads)
