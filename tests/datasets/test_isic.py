"""ISIC layouts and up-front checks, on generated files in the official formats."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from medlit.datamodules import ISICDataModule, Loader, Split
from medlit.datasets.isic.source import CLASSES, check_records, read_records
from medlit.errors import DatasetNotFoundError, InvalidCaseError
from tests.data.isic.data import make_isic


@pytest.mark.parametrize(
    ("year", "group_kind", "n_classes"),
    [
        ("2018_task1", "image", 0),
        ("2018_task3", "lesion_id", 7),
        ("2019", "lesion_id", 8),
        ("2020", "patient_id", 2),
    ],
)
def test_releases_are_detected_and_read(
    tmp_path: Path, year: str, group_kind: str, n_classes: int
) -> None:
    ids = make_isic(tmp_path, year, lesions=6)
    records = read_records(tmp_path)
    assert records.year == year and sorted(records.images) == sorted(ids)
    assert records.group_kind == group_kind and len(records.classes) == n_classes
    if year == "2018_task1":
        assert sorted(records.masks) == sorted(ids)
    else:
        assert set(records.labels) == set(ids)
        assert all(0 <= v < n_classes for v in records.labels.values())


def test_missing_release_says_where_isic_comes_from(tmp_path: Path) -> None:
    with pytest.raises(DatasetNotFoundError, match="challenge.isic-archive.com.*demo"):
        read_records(tmp_path / "none")


def _truth(root: Path) -> Path:
    return next(root.rglob("ISIC2018_Task3_Training_GroundTruth.csv"))


def test_row_without_image_is_refused(tmp_path: Path) -> None:
    ids = make_isic(tmp_path, "2018_task3", lesions=4)
    next(tmp_path.rglob(f"{ids[1]}.jpg")).unlink()
    with pytest.raises(InvalidCaseError, match=f"row has no image {ids[1]}.jpg") as e:
        read_records(tmp_path)
    assert e.value.path == _truth(tmp_path)


def test_onehot_rows_must_sum_to_one(tmp_path: Path) -> None:
    ids = make_isic(tmp_path, "2018_task3", lesions=4)
    table = pd.read_csv(_truth(tmp_path))
    table.loc[2, list(CLASSES["2018_task3"])] = 0.0
    table.loc[2, "MEL"], table.loc[2, "NV"] = 1.0, 1.0
    table.to_csv(_truth(tmp_path), index=False)
    with pytest.raises(InvalidCaseError, match=r"line \d+: one-hot row .* sums to 2") as e:
        read_records(tmp_path)
    assert e.value.case == ids[2]


def test_duplicate_ids_are_refused(tmp_path: Path) -> None:
    make_isic(tmp_path, "2018_task3", lesions=4)
    table = pd.read_csv(_truth(tmp_path))
    pd.concat([table, table.iloc[[0]]]).to_csv(_truth(tmp_path), index=False)
    with pytest.raises(InvalidCaseError, match=r"line 15: duplicate image \(first on line 2\)"):
        read_records(tmp_path)


def test_unk_is_refused_in_2019_training_rows(tmp_path: Path) -> None:
    make_isic(tmp_path, "2019", lesions=4)
    path = next(tmp_path.rglob("ISIC_2019_Training_GroundTruth.csv"))
    table = pd.read_csv(path)
    table.loc[0, list(CLASSES["2019"])] = 0.0
    table.loc[0, "UNK"] = 1.0
    table.to_csv(path, index=False)
    with pytest.raises(InvalidCaseError, match="UNK is a test-time class"):
        read_records(tmp_path)


def test_undecodable_image_is_refused(tmp_path: Path) -> None:
    ids = make_isic(tmp_path, "2018_task3", lesions=4)
    path = next(tmp_path.rglob(f"{ids[0]}.jpg"))
    path.write_bytes(path.read_bytes()[:300])
    with pytest.raises(InvalidCaseError, match="does not decode") as e:
        check_records(read_records(tmp_path), tmp_path / "cache")
    assert e.value.path == path


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (lambda m: m.resize((10, 10)), "mask size"),
        (lambda m: Image.fromarray(np.asarray(m) // 2), "not binary"),
        (lambda m: m.convert("RGB"), "not single-channel"),
    ],
)
def test_bad_masks_are_refused(tmp_path: Path, damage, message: str) -> None:
    ids = make_isic(tmp_path, "2018_task1", lesions=4)
    path = next(tmp_path.rglob(f"{ids[1]}_segmentation.png"))
    damage(Image.open(path)).save(path)
    with pytest.raises(InvalidCaseError, match=message) as e:
        check_records(read_records(tmp_path), tmp_path / "cache")
    assert e.value.path == path and e.value.case == ids[1]


def test_images_are_decoded_once(tmp_path: Path) -> None:
    make_isic(tmp_path / "d", "2018_task1", lesions=5)
    records = read_records(tmp_path / "d")
    assert check_records(records, tmp_path / "cache") == len(records.images)
    assert check_records(records, tmp_path / "cache") == 0


@pytest.mark.parametrize("year", ["2018_task3", "2019", "2020"])
def test_no_group_is_in_two_splits(tmp_path: Path, year: str) -> None:
    make_isic(tmp_path, year, lesions=40, seed=2)
    dm = ISICDataModule(
        root=str(tmp_path), image_size=32, split=Split(val_fraction=0.2, test_fraction=0.2)
    )
    dm.prepare_data()
    records = dm.records
    groups = {s: {records.groups[i] for i in dm.split_ids[s]} for s in ("train", "val", "test")}
    assert not groups["train"] & groups["val"] and not groups["train"] & groups["test"]
    assert not groups["val"] & groups["test"]
    assert sum(len(v) for v in dm.split_ids.values()) == len(records.images)
    sizes = [len(set(records.groups.values()))]
    assert sizes[0] < len(records.images)  # several images per lesion/patient exist


def test_datamodule_batches(tmp_path: Path) -> None:
    make_isic(tmp_path / "c", "2018_task3", lesions=20)
    dm = ISICDataModule(
        root=str(tmp_path / "c"),
        image_size=32,
        loader=Loader(batch_size=4, num_workers=0),
        balance="sampler",
    )
    dm.prepare_data()
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    assert batch["image"].shape == (4, 3, 32, 32) and batch["label"].shape == (4,)
    assert sum(dm.class_counts) == len(dm.split_ids["train"])
    make_isic(tmp_path / "s", "2018_task1", lesions=8)
    seg = ISICDataModule(
        root=str(tmp_path / "s"), target="mask", image_size=32, loader=Loader(num_workers=0)
    )
    seg.prepare_data()
    seg.setup("fit")
    item = seg.datasets["val"][0]
    assert item["image"].shape == (3, 1, 32, 32) and item["mask"].shape == (1, 1, 48, 64)
    assert seg.datasets["train"][0]["mask"].shape == (1, 32, 32)
