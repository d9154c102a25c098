"""A callback for tests: what the first training step ran with (autocast, memory format,
compiled networks), written to ``<folder>/runtime.json``."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from pytorch_lightning import Callback, LightningModule, Trainer


class RecordRuntime(Callback):
    def __init__(self, folder: str) -> None:
        self.folder = Path(folder)
        self.done = False

    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if self.done:
            return
        self.done = True
        with trainer.precision_plugin.forward_context():  # the context the step runs in
            autocast = torch.is_autocast_enabled("cpu")
            dtype = str(torch.get_autocast_dtype("cpu"))
        convs = [p for p in pl_module.parameters() if p.dim() in (4, 5)]  # 2D and 3D kernels

        def nhwc(t: torch.Tensor) -> bool:  # channels last: NHWC, or NDHWC for 3D
            fmt = torch.channels_last if t.dim() == 4 else torch.channels_last_3d
            return t.is_contiguous(memory_format=fmt)

        image = batch["image"]
        record = {
            "autocast": autocast,
            "autocast_dtype": dtype,
            "weights_channels_last": bool(convs) and all(nhwc(p) for p in convs),
            "image_channels_last": image.dim() in (4, 5)
            and nhwc(image)
            and not image.is_contiguous(),
            "compiled": sorted(
                n for n, m in pl_module.named_children() if m._compiled_call_impl is not None
            ),
        }
        self.folder.mkdir(parents=True, exist_ok=True)
        (self.folder / "runtime.json").write_text(json.dumps(record))
