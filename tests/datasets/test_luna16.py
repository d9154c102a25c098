"""LUNA16 reading: world <-> voxel placement on identity and flipped scans with anisotropic
spacing, the checks that refuse bad files, subsets that are absent, and the caches."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import SimpleITK as sitk
import torch

from medlit.datamodules import Loader, LUNA16DataModule, Subsets
from medlit.datasets.io.volume import Geometry
from medlit.datasets.luna16.source import (
    ANNOTATION_COLUMNS,
    CANDIDATE_COLUMNS,
)
from medlit.datasets.slices import slice_boxes, spacing_zyx
from medlit.errors import ConfigError, InvalidCaseError

FLIPPED = (-1.0, 0.0, 0.0, 0.0, -1.0, 0.0, 0.0, 0.0, 1.0)
IDENTITY = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0)


def write_scan(path: Path, array: np.ndarray, origin, spacing, direction) -> None:
    image = sitk.GetImageFromArray(array)
    image.SetOrigin(origin)
    image.SetSpacing(spacing)
    image.SetDirection(direction)
    path.parent.mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(image, str(path))  # .mhd + .raw, uncompressed


def world_of(index_zyx, origin, spacing, direction) -> tuple[float, float, float]:
    """By hand (not through SimpleITK): world = origin + D · (index_xyz * spacing)."""
    d = np.asarray(direction).reshape(3, 3)
    ixyz = np.asarray(index_zyx, float)[::-1]
    return tuple(np.asarray(origin) + d @ (ixyz * np.asarray(spacing)))


# (z, y, x) voxel of the nodule centre, radius mm; scans are (24, 40, 48) voxels.
SCANS = {
    # uid: (subset, direction, spacing x,y,z, origin, nodule index zyx, diameter mm)
    "1.2.826.0.1.1": (0, IDENTITY, (0.7, 0.7, 2.5), (-180.0, -150.0, -320.0), (10, 18, 30), 9.0),
    "1.2.826.0.1.2": (1, FLIPPED, (0.8, 0.8, 1.25), (160.0, 170.0, -210.5), (14, 12, 9), 8.0),
    "1.2.826.0.1.3": (2, FLIPPED, (0.65, 0.65, 2.0), (150.0, 140.0, -90.0), (8, 25, 20), 10.0),
}


def sphere(shape, centre_zyx, radius_mm, spacing_xyz) -> np.ndarray:
    z, y, x = np.indices(shape)
    s = np.asarray(spacing_xyz)[::-1]
    d2 = sum(((g - c) * sp) ** 2 for g, c, sp in zip((z, y, x), centre_zyx, s, strict=True))
    return d2 <= radius_mm**2


def make_root(root: Path, scans: dict = SCANS, shape=(24, 40, 48)) -> pd.DataFrame:
    rows = []
    for uid, (subset, direction, spacing, origin, centre, diameter) in scans.items():
        array = np.full(shape, -850, np.int16)  # lung
        array[sphere(shape, centre, diameter / 2, spacing)] = 60  # the nodule
        write_scan(root / f"subset{subset}" / f"{uid}.mhd", array, origin, spacing, direction)
        rows.append((uid, *world_of(centre, origin, spacing, direction), diameter))
    table = pd.DataFrame(rows, columns=list(ANNOTATION_COLUMNS))
    table.to_csv(root / "annotations.csv", index=False)
    table.iloc[:0].to_csv(root / "annotations_excluded.csv", index=False)
    cands = table[["seriesuid", "coordX", "coordY", "coordZ"]].assign(**{"class": 1})
    cands.to_csv(root / "candidates_V2.csv", index=False)
    return table


def datamodule(root: Path, **kw) -> LUNA16DataModule:
    args = {
        "root": str(root),
        "split": Subsets(train=[0], val=[1], test=[2]),
        "spacing": None,
        "patch_size": 32,
        "loader": Loader(batch_size=4, num_workers=0),
        "samples_per_epoch": 8,
    }
    return LUNA16DataModule(**{**args, **kw})


@pytest.mark.parametrize("spacing", [None, (1.0, 1.0, 1.5)], ids=["native", "resampled"])
def test_world_coordinates_land_on_the_nodules(tmp_path, spacing):
    """Nodules placed at known world points (worked out by hand, not with SimpleITK) in
    identity and flipped scans with anisotropic spacing: the located voxel is the drawn
    centre, and the slice boxes enclose the bright voxels of the sphere."""
    make_root(tmp_path)
    dm = datamodule(tmp_path, spacing=spacing)
    dm.prepare_data()
    ann = dm.tables["annotations"]
    assert len(ann) == 3
    for uid, (_, direction, src_spacing, _, centre, _) in SCANS.items():
        row = ann[ann["seriesuid"] == uid].iloc[0]
        entry = dm.entries[uid]
        index = row[["z", "y", "x"]].to_numpy(float)
        if spacing is None:
            np.testing.assert_allclose(index, centre, atol=1e-6)
        else:  # same world point on the resampled grid (origin kept, spacing changed)
            expected = (
                np.asarray(centre) * np.asarray(src_spacing)[::-1] / np.asarray(spacing)[::-1]
            )
            np.testing.assert_allclose(index, expected, atol=1e-6)
        assert entry.meta["geometry"]["direction"] == list(direction)
        hu = np.asarray(entry.arrays["image"])
        z = int(round(index[0]))
        assert hu[z, int(round(index[1])), int(round(index[2]))] > 0  # the nodule's HU
        boxes = slice_boxes(
            ann[ann["seriesuid"] == uid][["z", "y", "x", "radius_mm"]].to_numpy(),
            z,
            spacing_zyx(entry.meta),
        )
        assert len(boxes) == 1
        x1, y1, x2, y2 = boxes[0]
        bright = np.argwhere(hu[z] > -400)  # (y, x) voxels of the nodule in this slice
        # Every bright voxel centre (pixel i + 0.5) lies in the box, and the box is tight.
        assert (bright[:, 1] + 0.5 >= x1 - 1e-6).all() and (bright[:, 1] + 0.5 <= x2 + 1e-6).all()
        assert (bright[:, 0] + 0.5 >= y1 - 1e-6).all() and (bright[:, 0] + 0.5 <= y2 + 1e-6).all()
        assert x2 - x1 <= np.ptp(bright[:, 1]) + 3 and y2 - y1 <= np.ptp(bright[:, 0]) + 3
        # Round trip: the cached grid's voxel back to the world point of the CSV.
        back = Geometry.from_dict(entry.meta["geometry"]).index_to_world(index[None])[0]
        np.testing.assert_allclose(
            back, row[["coordX", "coordY", "coordZ"]].to_numpy(float), atol=1e-6
        )


def test_training_items_carry_yolo_boxes_and_balance(tmp_path):
    make_root(tmp_path)
    dm = datamodule(tmp_path, spacing=None, positive_fraction=1.0, augment=False)
    dm.prepare_data()
    dm.setup("fit")
    ds = dm.datasets["train"]
    item = ds[0]
    assert item["image"].shape == (3, 32, 32)
    assert len(item["boxes"]) == 1
    cx, cy, w, h = item["boxes"][0].tolist()
    assert 0 < cx < 1 and 0 < cy < 1 and 0 < w < 1 and 0 < h < 1
    # The box centre is on the bright nodule in the middle channel.
    img = item["image"][1].numpy()
    assert img[int(cy * 32), int(cx * 32)] > 0.5
    ds.positive_fraction = 0.0
    assert all(len(ds[i]["boxes"]) == 0 for i in range(10))  # negatives touch no nodule
    batch = next(iter(dm.train_dataloader()))
    assert batch["image"].shape == (4, 3, 32, 32)
    assert batch["batch_idx"].shape[0] == batch["boxes"].shape[0]


def test_absent_scans_are_skipped_with_one_summary_line(tmp_path, caplog):
    table = make_root(tmp_path)
    extra = table.copy()
    extra["seriesuid"] = [f"9.9.{i}" for i in range(len(extra))]  # scans not downloaded
    pd.concat([table, extra]).to_csv(tmp_path / "annotations.csv", index=False)
    with caplog.at_level(logging.INFO):
        datamodule(tmp_path).prepare_data()
    lines = [r.getMessage() for r in caplog.records if "not under the root" in r.getMessage()]
    assert len(lines) == 1, lines
    assert lines[0].endswith(
        "annotations.csv: 3 of 6 rows name scans that are not under the root "
        "(subsets not downloaded?): skipped"
    ), lines


def test_raw_shorter_than_its_header_is_refused(tmp_path):
    make_root(tmp_path)
    raw = tmp_path / "subset1" / "1.2.826.0.1.2.raw"
    raw.write_bytes(raw.read_bytes()[:-1000])
    with pytest.raises(InvalidCaseError, match=r"1\.2\.826\.0\.1\.2\.raw.*shorter than the 92160"):
        datamodule(tmp_path).prepare_data()


def test_non_finite_voxels_are_refused(tmp_path):
    make_root(tmp_path)
    array = np.full((24, 40, 48), -850, np.float32)
    array[3, 4, 5] = np.nan
    write_scan(
        tmp_path / "subset0" / "1.2.826.0.1.1.mhd",
        array,
        (-180.0, -150.0, -320.0),
        (0.7, 0.7, 2.5),
        IDENTITY,
    )
    with pytest.raises(InvalidCaseError, match=r"1\.2\.826\.0\.1\.1\.raw: 1 NaN/Inf voxels"):
        datamodule(tmp_path).prepare_data()


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (
            lambda t: t.assign(coordX=t["coordX"].astype(object).where(t.index != 1, "12,5mm")),
            r"annotations\.csv: line 3: coordX = '12,5mm' is not a finite number",
        ),
        (
            lambda t: t.rename(columns={"diameter_mm": "diameter"}),
            r"annotations\.csv: header .* missing \['diameter_mm'\]; unexpected \['diameter'\]",
        ),
        (
            lambda t: t.assign(coordZ=t["coordZ"] + np.where(t.index == 2, 500.0, 0.0)),
            r"annotations\.csv: line 4: world point .* lies outside the scan",
        ),
    ],
    ids=["non-numeric", "schema", "outside-scan"],
)
def test_malformed_annotations_are_refused(tmp_path, edit, message):
    table = make_root(tmp_path)
    edit(table).to_csv(tmp_path / "annotations.csv", index=False)
    with pytest.raises(InvalidCaseError, match=message):
        datamodule(tmp_path).prepare_data()


def test_a_valid_table_read_typed_equals_the_checked_reading(tmp_path, monkeypatch):
    """Valid CSVs are parsed straight to their types (the fast path); the frame equals
    the checked reading's, whitespace, exponents and the excluded list's -1 included.
    A value the checked reading would name sends the file to it (the tests above)."""
    from medlit.datasets.luna16 import source

    files = {
        "annotations.csv": "seriesuid,coordX,coordY,coordZ,diameter_mm\n"
        " 1.2.3 ,-12.5,40,1e2,-1\n1.2.4, 3,4.25,5,6.5\n",
        "candidates.csv": "seriesuid,coordX,coordY,coordZ,class\n1.2.3,1,2,3,0\n1.2.3,4,5,6,1\n",
    }
    for name, text in files.items():
        (tmp_path / name).write_text(text)
    columns = {"annotations.csv": ANNOTATION_COLUMNS, "candidates.csv": CANDIDATE_COLUMNS}
    typed = {n: source._typed_table(tmp_path / n, c) for n, c in columns.items()}
    monkeypatch.setattr(source, "_typed_table", lambda path, columns: None)
    for name, cols in columns.items():
        checked = source.read_table(tmp_path / name, cols)
        assert typed[name] is not None
        pd.testing.assert_frame_equal(typed[name], checked)
    (tmp_path / "bad.csv").write_text(files["candidates.csv"].replace(",1\n", ",2\n"))
    assert source._typed_table(tmp_path / "bad.csv", CANDIDATE_COLUMNS) is None


def test_candidate_class_must_be_binary(tmp_path):
    make_root(tmp_path)
    cands = pd.read_csv(tmp_path / "candidates_V2.csv")
    cands.loc[0, "class"] = 2
    cands.to_csv(tmp_path / "candidates_V2.csv", index=False)
    assert list(cands.columns) == list(CANDIDATE_COLUMNS)
    with pytest.raises(
        InvalidCaseError, match=r"candidates_V2\.csv: line 2: class '2' is not 0 or 1"
    ):
        datamodule(tmp_path, target="candidates").prepare_data()


def test_overlapping_folds_are_a_config_error():
    with pytest.raises(ConfigError, match=r"subsets \[8\] are in two of"):
        LUNA16DataModule(split=Subsets(train=[0, 8], val=[8], test=[9]))


def test_warm_start_decodes_nothing(tmp_path, caplog):
    make_root(tmp_path)
    datamodule(tmp_path).prepare_data()
    with caplog.at_level(logging.INFO):
        datamodule(tmp_path).prepare_data()
    assert any(
        "(0 checked and preprocessed, 3 from the cache" in r.getMessage() for r in caplog.records
    )


def test_candidate_patches_and_balanced_sampler(tmp_path):
    make_root(tmp_path)
    cands = pd.read_csv(tmp_path / "candidates_V2.csv")
    negatives = cands.assign(coordZ=cands["coordZ"] + 10.0, **{"class": 0})
    pd.concat([cands, negatives, negatives.assign(coordY=negatives["coordY"] + 5)]).to_csv(
        tmp_path / "candidates_V2.csv", index=False
    )
    dm = datamodule(tmp_path, target="candidates", candidate_size=16, samples_per_epoch=400)
    dm.prepare_data()
    dm.setup("fit")
    assert dm.class_counts == [2, 1]  # subset 0 only: 1 nodule, 2 non-nodules
    item = dm.datasets["val"][0]
    assert item["image"].shape == (3, 16, 16) and item["label"] == 1
    assert item["image"][0, 8, 8] > 0.5  # the nodule at the centre of the axial plane
    labels = torch.cat([b["label"] for b in dm.train_dataloader()])
    assert 0.35 < labels.float().mean() < 0.65  # balanced despite 2:1


def test_write_volume_keeps_a_metaimage_header_and_its_data_together(tmp_path):
    """The header names its data file: written atomically, the pair keeps final names."""
    from medlit.datasets.io.volume import Geometry, read_volume, write_volume

    geometry = Geometry((150.0, 140.0, -90.0), (0.65, 0.65, 2.0), FLIPPED)
    array = np.arange(60, dtype=np.int16).reshape(3, 4, 5)
    write_volume(array, geometry, tmp_path / "scan.mhd")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["scan.mhd", "scan.raw"]
    assert "ElementDataFile = scan.raw" in (tmp_path / "scan.mhd").read_text()
    back, g = read_volume(tmp_path / "scan.mhd")
    assert (back == array).all() and g == geometry


def test_world_and_voxel_conversions_equal_simpleitk_s_on_oblique_flipped_grids() -> None:
    """``Geometry.world_to_index`` / ``index_to_world`` (one matrix product for all
    points) against SimpleITK's physical-point API, point by point, on rotated grids with
    a flipped axis and anisotropic spacing."""
    rng = np.random.default_rng(3)
    for _ in range(4):
        q, _ = np.linalg.qr(rng.normal(size=(3, 3)))
        q[:, 0] *= -1  # a flipped axis (determinant -1 or +1 either way)
        image = sitk.Image([5, 6, 7], sitk.sitkUInt8)
        image.SetDirection(tuple(q.ravel()))
        image.SetSpacing(tuple(rng.uniform(0.5, 2.5, 3)))
        image.SetOrigin(tuple(rng.uniform(-200, 200, 3)))
        geometry = Geometry.of(image)
        points = rng.uniform(-300, 300, (200, 3))
        want = [image.TransformPhysicalPointToContinuousIndex(tuple(p)) for p in points]
        index = geometry.world_to_index(points)
        np.testing.assert_allclose(index, np.asarray(want)[:, ::-1], rtol=1e-10, atol=1e-9)
        back = [image.TransformContinuousIndexToPhysicalPoint(tuple(i[::-1])) for i in index]
        np.testing.assert_allclose(geometry.index_to_world(index), back, rtol=1e-10, atol=1e-9)
        assert geometry.world_to_index(np.zeros((0, 3))).shape == (0, 3)
