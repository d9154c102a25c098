"""BaseDataModule: one loader factory for every split of every dataset."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any

import torch
from pytorch_lightning import LightningDataModule
from torch.utils.data import DataLoader, Dataset


def cache_root(cache_dir: str | None, kind: str, root: Path) -> Path:
    """``<cache_dir or $MEDLIT_CACHE_DIR or ~/.cache/medlit>/<kind>-<hash of root>``.

    One namespace per dataset root: case and image ids repeat across datasets and copies.
    """
    base = Path(cache_dir or os.environ.get("MEDLIT_CACHE_DIR", "~/.cache/medlit")).expanduser()
    return base / f"{kind}-{hashlib.sha256(str(root.resolve()).encode()).hexdigest()[:10]}"


class BaseDataModule(LightningDataModule):
    """Holds the loader settings; subclasses fill ``self.datasets[split]`` in ``setup``.

    Training batches are ``batch_size`` slices; evaluation batches are one whole case.
    """

    def __init__(self, batch_size: int, num_workers: int) -> None:
        super().__init__()
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.datasets: dict[str, Dataset] = {}

    def _loader(
        self, split: str, shuffle: bool = False, batch_size: int | None = None, **kwargs: Any
    ) -> DataLoader:
        """Training: ``batch_size`` items, last partial batch dropped; evaluation: one whole
        case per batch unless ``batch_size`` says otherwise."""
        train = split == "train"
        return DataLoader(
            self.datasets[split],
            batch_size=batch_size or (self.batch_size if train else 1),
            shuffle=shuffle,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
            pin_memory=train and torch.cuda.is_available(),
            drop_last=train,
            **kwargs,
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader("train")

    def val_dataloader(self) -> DataLoader:
        return self._loader("val")

    def test_dataloader(self) -> DataLoader:
        return self._loader("test")

    def predict_dataloader(self) -> DataLoader:
        return self._loader("predict")
