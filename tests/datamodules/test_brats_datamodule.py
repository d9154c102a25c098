"""Case-level splits, 2D/2.5D slices with foreground oversampling, whole-case batches."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from medlit.datamodules import BraTSDataModule, Split
from medlit.datamodules.splits import make_splits, read_split_file
from medlit.datasets.slices import stack_slices
from medlit.errors import ConfigError

IDS = [f"BraTS2021_{i:05d}" for i in range(20)]


def test_ratio_split_is_seeded_and_disjoint() -> None:
    a = make_splits(IDS, 0.2, 0.2, seed=1)
    assert a == make_splits(IDS, 0.2, 0.2, seed=1)
    assert a != make_splits(IDS, 0.2, 0.2, seed=2)
    assert [len(a[s]) for s in ("train", "val", "test")] == [12, 4, 4]
    assert sorted(a["train"] + a["val"] + a["test"]) == IDS


def test_kfold_validates_every_case_once_with_a_fixed_test_set() -> None:
    folds = [make_splits(IDS, 0.0, 0.25, seed=0, num_folds=5, fold=k) for k in range(5)]
    assert all(f["test"] == folds[0]["test"] for f in folds)
    vals = [c for f in folds for c in f["val"]]
    assert sorted(vals) == sorted(set(IDS) - set(folds[0]["test"]))
    for f in folds:
        assert not set(f["train"]) & set(f["val"]) and not set(f["train"]) & set(f["test"])
    with pytest.raises(ConfigError, match="fold=5"):
        make_splits(IDS, 0.0, 0.25, seed=0, num_folds=5, fold=5)


def test_split_file_is_checked(tmp_path: Path) -> None:
    good = tmp_path / "split.yaml"
    good.write_text(f"train: {IDS[:10]}\nval: {IDS[10:15]}\ntest: {IDS[15:]}\n")
    assert read_split_file(good, IDS)["val"] == IDS[10:15]
    twice = tmp_path / "twice.json"
    twice.write_text(f'{{"train": ["{IDS[0]}", "{IDS[1]}"], "val": ["{IDS[1]}"]}}')
    with pytest.raises(ConfigError, match=f"{IDS[1]} is in both train and val"):
        read_split_file(twice, IDS)
    unknown = tmp_path / "unknown.yaml"
    unknown.write_text("train: [BraTS2021_99999]\n")
    with pytest.raises(ConfigError, match="not in the dataset"):
        read_split_file(unknown, IDS)


def test_stack_slices_clamps_at_the_ends() -> None:
    vol = np.arange(2 * 4 * 1 * 1).reshape(2, 4, 1, 1)  # C=2, Z=4
    out = stack_slices(vol, 0, 1)  # slices -1 (clamped to 0), 0, 1
    assert out[:, 0, 0].tolist() == [0, 4, 0, 4, 1, 5]
    batch = stack_slices(torch.from_numpy(vol), np.array([3]), 1)
    assert batch.shape == (1, 6, 1, 1) and batch[0, :, 0, 0].tolist() == [2, 6, 3, 7, 3, 7]


def test_training_slices_oversample_foreground(brats_root: Path) -> None:
    dm = BraTSDataModule(
        root=str(brats_root),
        patch_size=32,
        foreground_fraction=1.0,
        samples_per_epoch=40,
        split=Split(val_fraction=0.25, test_fraction=0.25),
        context_slices=1,
        augment=True,
    )
    dm.prepare_data()
    dm.setup("fit")
    ds = dm.datasets["train"]
    items = [ds[i] for i in range(40)]
    assert all(
        it["image"].shape == (12, 32, 32) and it["image"].dtype == torch.float32 for it in items
    )
    assert all(it["mask"].shape == (3, 32, 32) for it in items)
    assert np.mean([bool(it["mask"][0].any()) for it in items]) > 0.9  # WT in (almost) all
    dm.hparams["foreground_fraction"] = 0.0
    dm.setup("fit")
    fg = np.mean([bool(dm.datasets["train"][i]["mask"][0].any()) for i in range(60)])
    assert fg < 0.9  # plain sampling hits many tumour-free slices


def test_evaluation_batches_are_whole_cases(brats_root: Path) -> None:
    dm = BraTSDataModule(root=str(brats_root), split=Split(val_fraction=0.25, test_fraction=0.25))
    dm.prepare_data()
    dm.setup("test")
    assert not set(c.case_id for c in dm.cases["test"]) & set(c.case_id for c in dm.cases["train"])
    batch = next(iter(dm.test_dataloader()))
    image, mask = batch["image"], batch["mask"]
    assert (
        image.shape[:2] == (1, 4) and mask.shape[:2] == (1, 3) and image.shape[2:] == mask.shape[2:]
    )
    assert batch["spacing"][0].tolist() == [7.5, 7.5, 7.5]
    assert batch["shape"][0].tolist() == [16, 32, 32]
    z0, z1, y0, y1, x0, x1 = batch["bbox"][0].tolist()
    assert (z1 - z0, y1 - y0, x1 - x0) == tuple(image.shape[2:])
