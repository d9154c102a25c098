"""Loading a checkpoint safely: every checkpoint medlit writes holds tensors and plain
values only, so each is loaded with ``weights_only=True`` (no pickled code runs)."""

from __future__ import annotations

import re
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
        text = str(e)
        with open(path, "rb") as f:
            head = f.read(4)
        # torch.save's zip container, or a bare pickle (protocol 2+): a real checkpoint
        # whose contents need unpickling; anything else is not a checkpoint at all.
        if "Weights only load failed" in text and head.startswith((b"PK\x03\x04", b"\x80")):
            found = re.search(r"Unsupported global: GLOBAL ([\w.]+)", text)
            what = f" ({found.group(1)})" if found else ""
            raise ConfigError(
                f"--ckpt_path {path}: the file holds pickled Python objects{what}, not only "
                "tensors and plain values, and unpickling it could run code from the file, so "
                "it is refused. If you trust where it came from, keep its weights in a file "
                "that loads safely: python -c \"import torch; c = torch.load('IN', "
                "weights_only=False); torch.save({'state_dict': c['state_dict']}, 'OUT')\" "
                "(enough for predict and evaluate; resuming needs a checkpoint medlit wrote)"
            ) from None
        first = text.splitlines()[0][:200] if text else ""
        raise ConfigError(
            f"--ckpt_path {path}: not a PyTorch checkpoint ({type(e).__name__}: {first})"
        ) from None


def run_id_of(checkpoint: dict[str, Any]) -> str | None:
    """The MLflow run a checkpoint was written by (``ResumeState`` records it)."""
    return (checkpoint.get("medlit") or {}).get("mlflow_run_id")
