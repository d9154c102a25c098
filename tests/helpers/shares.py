"""A callback for tests: which cases each rank evaluated (one JSON file per rank)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from pytorch_lightning import Callback, LightningModule, Trainer


class RecordShares(Callback):
    """Writes ``<folder>/rank<k>.json``: the ids of the items rank k evaluated, in order
    (the sanity check's batches, which only run part of the validation, left out)."""

    def __init__(self, folder: str) -> None:
        self.folder = Path(folder)
        self.seen: list[str] = []

    def on_validation_batch_end(
        self,
        trainer: Trainer,
        pl_module: LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        if trainer.sanity_checking:
            return
        ids = batch["case_id"]
        self.seen.extend([ids] if isinstance(ids, str) else list(ids))

    def on_validation_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if trainer.sanity_checking:
            return
        self.folder.mkdir(parents=True, exist_ok=True)
        (self.folder / f"rank{trainer.global_rank}.json").write_text(json.dumps(self.seen))
