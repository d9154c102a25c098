"""Networks no library provides, and loading of local weight files (nothing is downloaded)."""

from __future__ import annotations

import difflib
import logging
from collections.abc import Iterable
from pathlib import Path

import torch

from medlit.errors import ConfigError

log = logging.getLogger(__name__)


def load_weights(module: torch.nn.Module, path: str | Path) -> None:
    """Load a local state dict (plain, or a Lightning checkpoint's ``state_dict``) into ``module``.

    Keys may carry a prefix (``model.encoder.``, ``encoder.``, ``module.``); the longest
    prefix that makes keys match is stripped. Shapes that differ (e.g. a 3-channel stem
    for a 4-channel input) are skipped with a warning rather than failing.
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise ConfigError(f"weights file {path} does not exist (medlit never downloads weights)")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise ConfigError(f"weights file {path} is not a readable PyTorch state dict: {e}") from e
    state = state.get("state_dict", state)
    own = module.state_dict()
    best: dict[str, torch.Tensor] = {}
    for prefix in sorted({k[: i + 1] for k in state for i, c in enumerate(k) if c == "."} | {""}):
        cand = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
        cand = {k: v for k, v in cand.items() if k in own}
        if len(cand) > len(best):
            best = cand
    if not best:
        raise ConfigError(f"weights file {path}: none of its {len(state)} tensors match the model")
    fitting = {k: v for k, v in best.items() if v.shape == own[k].shape}
    if skipped := sorted(set(best) - set(fitting)):
        log.warning(
            "%s: %d tensors skipped for shape mismatch, e.g. %s", path, len(skipped), skipped[0]
        )
    module.load_state_dict(fitting, strict=False)
    log.info("loaded %d/%d tensors from %s", len(fitting), len(own), path)


def unknown_name(key: str, name: str, choices: Iterable[str], hint: str = "") -> ConfigError:
    """A ``ConfigError`` for a model name no library knows, with the nearest known names."""
    close = difflib.get_close_matches(name, sorted(set(choices)), n=3, cutoff=0.6)
    suggestion = f"; did you mean {' or '.join(map(repr, close))}?" if close else ""
    return ConfigError(f"{key}={name!r} is not a known name{suggestion}{hint}")


def smp_names(arch: str, encoder: str) -> ConfigError | None:
    """The error for an SMP architecture or encoder name that does not exist, or None."""
    import segmentation_models_pytorch as smp
    import timm

    archs = list(smp.MODEL_ARCHITECTURES_MAPPING)
    if arch.lower() not in archs:
        return unknown_name("model.arch", arch, archs, f" (SMP architectures: {', '.join(archs)})")
    encoders = list(smp.encoders.get_encoder_names())
    if encoder.startswith("tu-"):
        if not timm.is_model(encoder[3:]):
            return unknown_name(
                "model.encoder", encoder, [f"tu-{m}" for m in timm.list_models()], " (timm)"
            )
    elif encoder not in encoders:
        timm_too = [f"tu-{encoder}"] if timm.is_model(encoder) else []
        return unknown_name(
            "model.encoder",
            encoder,
            [*encoders, *timm_too],
            " (SMP's own encoders, or any timm model written 'tu-<timm name>')",
        )
    return None


def yolo_names() -> list[str]:
    """Ultralytics model YAML names, with the scale letters its YAMLs define (yolov8n.yaml)."""
    import re

    import ultralytics

    names = []
    for path in (Path(ultralytics.__file__).parent / "cfg" / "models").rglob("*.yaml"):
        names.append(path.name)
        names += [re.sub(r"^(yolov?\d+)", rf"\g<1>{s}", path.name) for s in "nsmlx"]
    return names
