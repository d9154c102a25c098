"""Explanations of segmentation networks: Seg-Grad-CAM (Vinogradova et al., 2020) of one
region, through captum's ``LayerGradCam``, for 2D/2.5D and 3D networks.

The score explained is the region's logit summed over the voxels the network assigns to
it (over the whole input when it assigns none), as Seg-Grad-CAM defines it; Grad-CAM
weighs the feature maps that enter the network's segmentation head by the gradient of
that score, keeps the positive part and brings it to the input's resolution. A 2D
network is explained slice by slice along z (with its 2.5D context), a 3D one window by
window with the task's Gaussian sliding window, so that any volume fits; each case's map
is scaled to [0, 1].

The layer is the one each library names for its head's input: SMP's
``segmentation_head``, MONAI DynUNet's ``output_block``, SegResNet's ``conv_final``,
SwinUNETR's ``out``. Written here: captum has the Grad-CAM, but no notion of a
segmentation target or of a volume too large for one pass.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import Tensor

from medlit.errors import ConfigError

HEADS = ("segmentation_head", "output_block", "conv_final", "out")


def head_layer(network: torch.nn.Module) -> torch.nn.Module:
    """The module whose input Grad-CAM explains: the network's segmentation head."""
    for name in HEADS:
        layer = getattr(network, name, None)
        if isinstance(layer, torch.nn.Module):
            return layer
    raise ConfigError(
        f"{type(network).__name__} has none of the segmentation heads medlit explains "
        f"({', '.join(HEADS)})"
    )


def seg_grad_cam(
    network: torch.nn.Module, x: Tensor, region: int, sigmoid: bool, threshold: float = 0.5
) -> Tensor:
    """Seg-Grad-CAM of ``region`` for a batch ``x`` (B, C, *spatial) -> (B, 1, *spatial),
    not yet scaled. ``sigmoid``: independent regions (thresholded probabilities), else
    softmax classes (the argmax)."""
    from captum.attr import LayerAttribution, LayerGradCam

    def score(inputs: Tensor) -> Tensor:
        logits = network(inputs)
        if logits.ndim == inputs.ndim + 1:  # deep supervision heads: the main output
            logits = logits[:, 0]
        chosen = logits[:, region]
        mask = chosen.sigmoid() > threshold if sigmoid else logits.argmax(1) == region
        flat = mask.flatten(1).any(1)
        mask = torch.where(flat.view(-1, *([1] * (mask.ndim - 1))), mask, torch.ones_like(mask))
        return (chosen * mask.detach()).flatten(1).sum(1)

    # Evaluation runs under inference mode, where nothing has gradients: switched off, the
    # input copied out of it.
    with torch.inference_mode(False), torch.enable_grad():
        inputs = x.detach().clone().requires_grad_(True)
        cam = LayerGradCam(score, head_layer(network)).attribute(
            inputs, attribute_to_layer_input=True, relu_attributions=True
        )
        mode = "bilinear" if x.ndim == 4 else "trilinear"
        cam = LayerAttribution.interpolate(cam, tuple(x.shape[2:]), interpolate_mode=mode)
    return cam.detach().float()


def normalise(cam: Tensor) -> np.ndarray:
    """A case's map scaled to [0, 1] (all 0 when the network has nothing to show)."""
    arr = cam.float().cpu().numpy()
    top = float(arr.max()) if arr.size else 0.0
    return arr / top if top > 0 else np.zeros_like(arr)


def region_index(names: list[str], region: str | None) -> int:
    if region is None:
        raise ConfigError("name the region to explain")
    if region not in names:
        raise ConfigError(f"explain {region!r}: the model's regions are {names}")
    return names.index(region)


def describe(task: Any) -> str:
    return f"Seg-Grad-CAM on {type(head_layer(task.model)).__name__}'s input"
