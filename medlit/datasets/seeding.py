"""Reproducible albumentations, for fresh and for resumed runs.

albumentations 2 gives each transform its own generator, seeded from OS entropy unless
``seed`` is set, so ``seed_everything`` does not reach it and two runs with the same seed
(``trainer.deterministic: true`` included) augment differently. Datasets call
:func:`seed_transforms` at the top of ``__getitem__``: every item reseeds the transforms
from NumPy's global generator, which ``seed_everything`` seeds in the main process and
Lightning's worker init seeds per DataLoader worker. The augmentations are then a
function of NumPy's global state alone, which a checkpoint carries (``ResumeState``): runs
with the same seed draw the same augmentations, a resumed run draws what the
uninterrupted one would have, and workers still draw different ones. Reseeding costs a
few microseconds per transform and item.
"""

from __future__ import annotations

from typing import Any

import numpy as np


def seed_transforms(*transforms: Any) -> None:
    base = int(np.random.randint(2**31 - 1))
    for i, t in enumerate(transforms):
        if t is not None and hasattr(t, "set_random_seed"):  # albumentations
            t.set_random_seed(base + i)
        elif t is not None and hasattr(t, "set_random_state"):  # MONAI
            t.set_random_state(seed=base + i)
