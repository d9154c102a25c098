"""Loading a checkpoint safely: every checkpoint medlit writes holds tensors and plain
values only, so each is loaded with ``weights_only=True`` (no pickled code runs)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from medlit.errors import ConfigError


def load_checkpoint(path: Path) -> dict[str, Any]:
    """A checkpoint loaded with ``weights_only=True`` (tensors and plain values only), or a
    ``ConfigError`` naming the file."""
    import torch

    if not path.is_file():
        raise ConfigError(f"--ckpt_path {path}: no such checkpoint file")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - not a checkpoint medlit can load safely
        raise ConfigError(
            f"--ckpt_path {path}: not a checkpoint that loads with weights_only=True "
            f"({type(e).__name__}: {str(e).splitlines()[0][:200]})"
        ) from None


def run_id_of(checkpoint: dict[str, Any]) -> str | None:
    """The MLflow run a checkpoint was written by (``ResumeState`` records it)."""
    return (checkpoint.get("medlit") or {}).get("mlflow_run_id")
