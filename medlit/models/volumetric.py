"""3D segmentation networks from MONAI, chosen by name in the config.

``dynunet`` is MONAI's implementation of the nnU-Net architecture (with deep-supervision
heads); ``segresnet`` and ``swinunetr`` are MONAI's own. nnU-Net's
``dynamic-network-architectures`` is not offered here: it pins ``timm<1.0.23``, older than
medlit's timm, so it lives only in the benchmarks' peer environment (``benchmarks/peers``).

What MONAI does not give is nnU-Net's *planning*: the kernel sizes and strides of each
stage, derived from the patch size and the voxel spacing. :func:`plan_unet` writes that rule
down (MONAI keeps it only in a tutorial notebook, not in the library).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, Literal

import torch

from medlit.errors import ConfigError

Arch3D = Literal["dynunet", "segresnet", "swinunetr"]
ARCHS_3D: tuple[str, ...] = ("dynunet", "segresnet", "swinunetr")

# nnU-Net's 3D planning constants (ExperimentPlanner): the lowest resolution keeps at least
# 4 voxels along an axis, an axis is not pooled while it is more than twice as coarse as the
# finest one, filters start at 32 and double per stage up to 320.
MIN_FEATURE_SIZE = 4
MAX_FILTERS_3D = 320


def plan_unet(
    patch_size: Sequence[int], spacing: Sequence[float] | None = None
) -> tuple[list[list[int]], list[list[int]]]:
    """Kernel sizes and strides of a U-Net for ``patch_size`` (z, y, x) voxels at
    ``spacing`` (z, y, x) mm, by nnU-Net v2's rule (``get_pool_and_conv_props``; the test
    compares the two).

    A stage pools (stride 2) every axis that is still at least ``2 * MIN_FEATURE_SIZE``
    voxels long and less than twice as coarse as the finest such axis (a lone axis only
    while at least ``3 * MIN_FEATURE_SIZE`` long). An axis's kernel is 1 until its spacing
    comes within 2× of the finest (nnU-Net's in-plane convolutions of anisotropic data),
    3 from then on; the bottleneck's is 3 along every axis. The first stage has stride 1.
    Returns ``(kernels, strides)``, one entry per stage.
    """
    size = [float(s) for s in patch_size]
    spacing_now = [float(s) for s in (spacing or [1.0] * len(size))]
    dims = range(len(size))
    kernel = [1] * len(size)
    kernels: list[list[int]] = []
    strides: list[list[int]] = [[1] * len(size)]
    while True:
        long_enough = [d for d in dims if size[d] >= 2 * MIN_FEATURE_SIZE]
        if not long_enough:
            break
        finest = min(spacing_now[d] for d in long_enough)
        pooled = [d for d in long_enough if spacing_now[d] / finest < 2]
        if len(pooled) == 1 and size[pooled[0]] < 3 * MIN_FEATURE_SIZE:
            break
        if not pooled:
            break
        kernel = [3 if kernel[d] == 3 or spacing_now[d] / min(spacing_now) < 2 else 1 for d in dims]
        kernels.append(list(kernel))
        strides.append([2 if d in pooled else 1 for d in dims])
        for d in pooled:
            spacing_now[d] *= 2
            size[d] = math.ceil(size[d] / 2)
    kernels.append([3] * len(size))  # the bottleneck
    return kernels, strides


def downsampling(arch: str, strides: list[list[int]] | None, levels: int) -> list[int]:
    """Total downsampling per axis: what a patch's sides must be multiples of."""
    if arch == "dynunet" and strides is not None:
        return [math.prod(s[i] for s in strides) for i in range(len(strides[0]))]
    return [2**levels] * 3


def nnunet_filters(stages: int, base: int = 32) -> list[int]:
    """nnU-Net's features per stage: ``base`` doubling per stage, capped at 320."""
    return [min(base * 2**i, MAX_FILTERS_3D) for i in range(stages)]


def create_network_3d(
    arch: str,
    in_channels: int,
    out_channels: int,
    patch_size: Sequence[int],
    spacing: Sequence[float] | None = None,
    filters: Sequence[int] | None = None,
    deep_supervision: bool = True,
    **kwargs: Any,
) -> tuple[torch.nn.Module, int]:
    """A MONAI 3D network for (B, in_channels, *patch_size) inputs.

    Returns ``(network, deep_supervision_heads)``: the number of auxiliary outputs a
    training forward pass stacks behind the main one (DynUNet only; 0 otherwise).
    A patch the network cannot take (a side not a multiple of its downsampling) is a
    ConfigError that names the nearest sizes that work.
    """
    from monai.networks import nets  # imported here: MONAI takes ~2 s to import

    patch = [int(p) for p in patch_size]
    if len(patch) != 3:
        raise ConfigError(f"model.patch_size={patch} must be three sides (z, y, x)")
    heads = 0
    if arch == "dynunet":
        kernels, strides = plan_unet(patch, spacing)
        stages = len(strides)
        if stages < 3:
            raise ConfigError(
                f"model.patch_size={patch} allows {stages} U-Net stages; a DynUNet needs 3 "
                f"(each side at least {4 * MIN_FEATURE_SIZE} voxels along two axes)"
            )
        features = list(filters) if filters else nnunet_filters(stages)
        if len(features) != stages:
            raise ConfigError(
                f"model.filters has {len(features)} entries; the U-Net planned for patch "
                f"{patch} has {stages} stages (strides {strides})"
            )
        # nnU-Net's deep supervision has an output per decoder stage (stages - 1), the
        # lowest-resolution one weighted 0: the main output and stages - 3 heads carry
        # all the weight, so the zero-weight head is not built.
        heads = max(stages - 3, 0) if deep_supervision else 0
        network = nets.DynUNet(
            spatial_dims=3,
            in_channels=in_channels,
            out_channels=out_channels,
            kernel_size=kernels,
            strides=strides,
            upsample_kernel_size=strides[1:],
            filters=features,
            norm_name=("INSTANCE", {"affine": True}),
            act_name=("leakyrelu", {"inplace": True, "negative_slope": 0.01}),
            deep_supervision=heads > 0,
            deep_supr_num=max(heads, 1),
            **kwargs,
        )
        multiple = downsampling(arch, strides, 0)
    elif arch == "segresnet":
        blocks_down = tuple(kwargs.pop("blocks_down", (1, 2, 2, 4)))
        network = nets.SegResNet(
            spatial_dims=3,
            in_channels=in_channels,
            out_channels=out_channels,
            init_filters=int(filters[0]) if filters else 16,
            blocks_down=blocks_down,
            **kwargs,
        )
        multiple = downsampling(arch, None, len(blocks_down) - 1)
    elif arch == "swinunetr":
        network = nets.SwinUNETR(
            in_channels=in_channels,
            out_channels=out_channels,
            feature_size=int(filters[0]) if filters else 24,
            spatial_dims=3,
            **kwargs,
        )
        multiple = downsampling(arch, None, 5)
    else:
        raise ConfigError(f"model.arch={arch!r}: 3D networks are {', '.join(ARCHS_3D)}")
    if bad := [(p, m) for p, m in zip(patch, multiple, strict=True) if p % m]:
        fixes = ", ".join(f"{p} -> {p - p % m} or {p + m - p % m}" for p, m in bad)
        raise ConfigError(
            f"model.patch_size={patch}: {arch} downsamples each axis by {multiple}, so every "
            f"side must be a multiple of it ({fixes})"
        )
    return network, heads
