"""Explanations of segmentation networks: Seg-Grad-CAM (Vinogradova et al., 2020) of one
region, through captum's ``LayerGradCam``, for 2D/2.5D and 3D networks.

The score explained is the region's logit summed over the voxels the network assigns to
it, as Seg-Grad-CAM defines it (a slice or window where it assigns none has nothing to
explain: its map is 0); Grad-CAM
weighs the feature maps of a late decoder stage by the gradient of that score,
keeps the positive part and brings it to the input's resolution (:func:`explained_layer`). A 2D
network is explained slice by slice along z (with its 2.5D context), a 3D one window by
window with the task's Gaussian sliding window, so that any volume fits; each case's map
is scaled to [0, 1].

Written here: captum has the Grad-CAM, but no notion of a
segmentation target or of a volume too large for one pass.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from medlit.errors import ConfigError

HEADS = ("segmentation_head", "output_block", "conv_final", "out")


def explained_layer(network: torch.nn.Module) -> tuple[torch.nn.Module, bool]:
    """The layer Grad-CAM explains, and whether it is that layer's input: the decoder's
    second-to-last stage (half the input's resolution), where the features are both
    semantic and sharp enough to point at a lesion: SMP's ``decoder.blocks[-2]``,
    DynUNet's ``upsamples[-2]``, SegResNet's ``up_layers[-2]``, SwinUNETR's ``decoder2``.
    On the BraTS demo's 2.5D U-Net (a fold of its 3-fold run) the ET map averages 0.35
    inside the enhancing tumour, 0.11 in the rest of the tumour and 0.003 outside; the
    encoder's last convolution (1/32 of the input: 3 × 3 for a 96-voxel slice) gives
    0.10 / 0.07 / 0.03, the full-resolution last stage nothing (its weighted features are
    negative everywhere). Otherwise: the encoder's last convolution (other SMP decoders),
    then the input of the segmentation head."""
    decoder = getattr(network, "decoder", None)
    for stages in (
        getattr(decoder, "blocks", None),
        getattr(network, "upsamples", None),
        getattr(network, "up_layers", None),
    ):
        if isinstance(stages, torch.nn.ModuleList) and len(stages) >= 2:
            return stages[-2], False
    layer = getattr(network, "decoder2", None)
    if isinstance(layer, torch.nn.Module):
        return layer, False
    encoder = getattr(network, "encoder", None)
    if isinstance(encoder, torch.nn.Module):
        convs = [m for m in encoder.modules() if isinstance(m, torch.nn.Conv2d | torch.nn.Conv3d)]
        if convs:
            return convs[-1], False
    return head_layer(network), True


def head_layer(network: torch.nn.Module) -> torch.nn.Module:
    """The network's segmentation head."""
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
        return (chosen * mask.detach()).flatten(1).sum(1)  # 0 where none is predicted

    # Evaluation runs under inference mode, where nothing has gradients: switched off, the
    # input copied out of it.
    with torch.inference_mode(False), torch.enable_grad():
        inputs = x.detach().clone().requires_grad_(True)
        layer, to_input = explained_layer(network)
        cam = LayerGradCam(score, layer).attribute(
            inputs, attribute_to_layer_input=to_input, relu_attributions=True
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
