"""Networks no library provides, and loading of local weight files (nothing is downloaded)."""

from __future__ import annotations

import logging
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
