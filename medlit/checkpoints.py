"""Checkpoints on disk: loading one safely (every checkpoint medlit writes holds tensors
and plain values only, so each is loaded with ``weights_only=True``: no pickled code
runs), and keeping the bytes of the best one once when MLflow stores it too."""

from __future__ import annotations

import filecmp
import os
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


def stored_once(client: Any, run_id: str, checkpoint: Path, artifact_path: str) -> bool:
    """After MLflow's ``log_artifact`` copied ``checkpoint`` into the run's artifacts
    (``<artifact_path>/<name>``): with a local artifact store (a path or ``file://``
    URI, medlit's default), the copy is replaced by a hard link to the checkpoint, so that
    one disk holds the bytes once while both ``checkpoints/`` (what resuming and testing
    read) and the artifact (what MLflow shares) keep their file. True when they now share
    one file.

    Safe against the checkpoint folder changing: Lightning writes every checkpoint to a
    temporary file and renames it (a new inode, never a write into the linked one), and
    top-k rotation only unlinks the old name, so the artifact keeps its bytes either way.
    The copy stays where a link cannot be made (another file system, a store that refuses
    links) or when it is not the checkpoint's bytes; a server's store (``http``,
    ``mlflow-artifacts:``, ``s3``) keeps its upload."""
    from urllib.parse import urlparse

    from mlflow.utils.file_utils import local_file_uri_to_path

    uri = client.get_run(run_id).info.artifact_uri
    if urlparse(uri).scheme not in ("", "file"):
        return False
    copy = Path(local_file_uri_to_path(uri)) / artifact_path / checkpoint.name
    tmp = copy.with_name(f".{copy.name}.{os.getpid()}.link")
    try:
        if os.path.samefile(checkpoint, copy):
            return True
        # MLflow copies the file's times with it, so equal stat signatures are the usual
        # case; otherwise filecmp compares the bytes.
        if not filecmp.cmp(checkpoint, copy, shallow=True):
            return False
        os.link(checkpoint, tmp)
        os.replace(tmp, copy)  # atomic: the artifact is the copy or the link, never missing
    except OSError:
        tmp.unlink(missing_ok=True)
        return False
    return True
