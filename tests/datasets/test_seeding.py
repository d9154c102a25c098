"""albumentations transforms follow the run's seed (they ignore seed_everything otherwise)."""

from __future__ import annotations

import albumentations as A
import numpy as np

from medlit.datasets.seeding import seed_transforms


class Owner:
    def __init__(self) -> None:
        self.transform = A.Compose(
            [A.RandomCrop(16, 16), A.HorizontalFlip(), A.GaussNoise(std_range=(0.1, 0.3), p=1)]
        )

    def draw(self, image: np.ndarray) -> np.ndarray:
        seed_transforms(self.transform)
        return self.transform(image=image)["image"]


def test_same_global_seed_same_augmentation_and_another_seed_another() -> None:
    image = np.random.default_rng(0).random((32, 32, 1)).astype(np.float32)
    runs = []
    for seed in (1, 1, 2):
        np.random.seed(seed)  # what seed_everything / Lightning's worker init do
        owner = Owner()
        runs.append([owner.draw(image) for _ in range(3)])
    assert all(np.array_equal(a, b) for a, b in zip(runs[0], runs[1], strict=True))
    assert not np.array_equal(runs[0][0], runs[2][0])
    assert not np.array_equal(runs[0][0], runs[0][1])  # successive draws still differ
