"""BaseDataModule: one loader factory for every split of every dataset."""

from __future__ import annotations

from typing import Any

import torch
from pytorch_lightning import LightningDataModule
from torch.utils.data import DataLoader, Dataset


class BaseDataModule(LightningDataModule):
    """Holds the loader settings; subclasses fill ``self.datasets[split]`` in ``setup``.

    Training batches are ``batch_size`` slices; evaluation batches are one whole case.
    """

    def __init__(self, batch_size: int, num_workers: int) -> None:
        super().__init__()
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.datasets: dict[str, Dataset] = {}

    def _loader(self, split: str, **kwargs: Any) -> DataLoader:
        train = split == "train"
        return DataLoader(
            self.datasets[split],
            batch_size=self.batch_size if train else 1,
            shuffle=False,  # training datasets draw random samples themselves
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
