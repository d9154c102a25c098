"""BaseDataModule: one loader factory for every split of every dataset."""

from __future__ import annotations

import hashlib
import logging
import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from pytorch_lightning import LightningDataModule
from torch.utils.data import DataLoader, Dataset, DistributedSampler, WeightedRandomSampler

from medlit.datasets.synthetic import is_synthetic

log = logging.getLogger(__name__)


def cache_root(cache_dir: str | None, kind: str, root: Path) -> Path:
    """``<cache_dir or $MEDLIT_CACHE_DIR or ~/.cache/medlit>/<kind>-<hash of root>``.

    One namespace per dataset root: case and image ids repeat across datasets and copies.
    """
    base = Path(cache_dir or os.environ.get("MEDLIT_CACHE_DIR", "~/.cache/medlit")).expanduser()
    return base / f"{kind}-{hashlib.sha256(str(root.resolve()).encode()).hexdigest()[:10]}"


def balanced_sampler(
    labels: Sequence[int], num_samples: int | None = None
) -> WeightedRandomSampler:
    """Draw items with probability inversely proportional to their class's frequency, so
    every class is drawn equally often (``num_samples`` per epoch, default all items)."""
    labels = np.asarray(labels)
    counts = np.bincount(labels).clip(min=1)
    weights = torch.as_tensor(1.0 / counts[labels], dtype=torch.double)
    return WeightedRandomSampler(weights, num_samples=num_samples or len(labels), replacement=True)


def one_item_batch(items: list[dict[str, Any]]) -> dict[str, Any]:
    """Collate a batch of one whole case: tensors gain a batch axis, everything else
    (ids, metadata dicts) is wrapped in a list, untouched."""
    [item] = items
    return {k: v[None] if isinstance(v, torch.Tensor) else [v] for k, v in item.items()}


class ShareSampler(DistributedSampler):
    """Evaluation under DDP: rank k takes items k, k + N, k + 2N, ... (no shuffling, no
    padding), so the shares are disjoint and together are every item once.

    Written here because Lightning's default for evaluation (``DistributedSampler``) pads
    the last round with repeated items, and its ``UnrepeatedDistributedSampler`` refuses a
    rank with no item at all, which happens with fewer cases than ranks. Such a rank gets
    one repeated item instead, so that every rank runs the evaluation (and its epoch-end
    gathers); every gathered result is keyed by case id, so a repeat never counts twice.
    """

    def __init__(self, dataset: Dataset, num_replicas: int, rank: int) -> None:
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=False)
        n = len(dataset)  # type: ignore[arg-type]
        share = list(range(rank, n, num_replicas))
        self.indices = share or ([rank % n] if n else [])
        self.num_samples = len(self.indices)
        self.total_size = n

    def __iter__(self):
        return iter(self.indices)

    def __len__(self) -> int:
        return self.num_samples


class BaseDataModule(LightningDataModule):
    """Holds the loader settings; subclasses fill ``self.datasets[split]`` in ``setup``.

    Training batches are ``batch_size`` slices; evaluation batches are one whole case.
    """

    def __init__(self, root: str, batch_size: int, num_workers: int) -> None:
        super().__init__()
        self.root = Path(root).expanduser()
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.datasets: dict[str, Dataset] = {}
        # Set by ``predict_from``: prediction reads this input, never ``root``.
        self.predict_input: Path | None = None

    @property
    def is_synthetic(self) -> bool:
        """Whether ``root`` holds medlit's demo data (the run is then tagged data=synthetic)."""
        return is_synthetic(self.root)

    def write_demo_if_empty(self, write: Callable[[Path], object], what: str) -> None:
        """With ``demo: true``, fill an empty or missing ``root`` with ``write(root)`` first."""
        if not self.hparams["demo"] or (self.root.exists() and any(self.root.iterdir())):
            return
        start = time.perf_counter()
        write(self.root)
        log.info("wrote %s to %s in %.1f s", what, self.root, time.perf_counter() - start)

    def _loader(
        self, split: str, shuffle: bool = False, batch_size: int | None = None, **kwargs: Any
    ) -> DataLoader:
        """Training: ``batch_size`` items, last partial batch dropped; evaluation: one whole
        case per batch unless ``batch_size`` says otherwise."""
        train = split == "train"
        if not train and "sampler" not in kwargs and (sampler := self._eval_sampler(split)):
            kwargs["sampler"] = sampler
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

    def _eval_sampler(self, split: str) -> DistributedSampler | None:
        """Under DDP, each rank evaluates a disjoint share of the cases, and the shares
        together are every case exactly once (see :class:`ShareSampler`)."""
        trainer = self.trainer
        if trainer is None or trainer.world_size <= 1:
            return None
        return ShareSampler(self.datasets[split], trainer.world_size, trainer.global_rank)

    def train_dataloader(self) -> DataLoader:
        return self._loader("train")

    def val_dataloader(self) -> DataLoader:
        return self._loader("val")

    def test_dataloader(self) -> DataLoader:
        return self._loader("test")

    def predict_dataloader(self) -> DataLoader:
        return self._loader("predict")
