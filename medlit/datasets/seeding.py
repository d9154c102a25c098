"""Reproducible albumentations in every process.

albumentations 2 gives each transform its own generator, seeded from OS entropy unless
``seed`` is set, so ``seed_everything`` does not reach it and two runs with the same seed
(``trainer.deterministic: true`` included) augment differently. Datasets call
:func:`seed_transforms` at the top of ``__getitem__``: the first call in each process
seeds their transforms from NumPy's global generator, which ``seed_everything`` seeds in
the main process and Lightning's worker init seeds per DataLoader worker. Runs with the
same seed then draw the same augmentations, and workers still draw different ones.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np


def seed_transforms(owner: Any, *transforms: Any) -> None:
    if getattr(owner, "_seeded_pid", None) == os.getpid():
        return
    owner._seeded_pid = os.getpid()
    base = int(np.random.randint(2**31 - 1))
    for i, t in enumerate(transforms):
        if t is not None and hasattr(t, "set_random_seed"):
            t.set_random_seed(base + i)
