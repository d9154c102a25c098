"""Synthetic LUNA16: the official layout, geometry (flipped scans, anisotropic spacing), world
coordinates that land on what was drawn, candidate classes, and seeded reproducibility."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import SimpleITK as sitk

from medlit.datasets.io.files import MARKER, is_synthetic
from medlit.datasets.luna16.phantom import FLIPPED, IDENTITY, write_luna16
from medlit.datasets.luna16.source import (
    ANNOTATION_COLUMNS,
    CANDIDATE_COLUMNS,
    check_data_size,
    discover_scans,
    read_header,
    read_table,
)
from medlit.errors import Report

SMALL = ((24, 32), (64, 64), (64, 64))  # (min, max) voxels in z, y, x
N_SCANS = 6


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("luna16")
    write_luna16(root, N_SCANS, seed=0, shape_range=SMALL)
    return root


def scan_path(root: Path, uid: str) -> Path:
    (mhd,) = root.glob(f"subset*/{uid}.mhd")
    return mhd


def read(root: Path, uid: str) -> tuple[sitk.Image, np.ndarray, np.ndarray]:
    image = sitk.ReadImage(str(scan_path(root, uid)))
    lungs = sitk.ReadImage(str(root / "seg-lungs-LUNA16" / f"{uid}.mhd"))
    return image, sitk.GetArrayFromImage(image), sitk.GetArrayFromImage(lungs)


def voxel(image: sitk.Image, row: pd.Series) -> tuple[int, int, int]:
    """(z, y, x) voxel nearest to a CSV row's world point, through SimpleITK."""
    idx = image.TransformPhysicalPointToContinuousIndex((row.coordX, row.coordY, row.coordZ))
    x, y, z = np.rint(idx).astype(int)
    return z, y, x


def world(row: pd.Series) -> np.ndarray:
    return np.array([row.coordX, row.coordY, row.coordZ])


def test_official_layout(root: Path):
    uids = sorted(p.stem for p in root.glob("subset*/*.mhd"))
    assert len(uids) == N_SCANS
    for i in range(N_SCANS):  # round-robin: one scan per subset here
        assert len(list((root / f"subset{i}").glob("*.mhd"))) == 1
    scans = discover_scans(root)
    assert sorted(scans) == uids
    for uid, scan in scans.items():
        assert uid.startswith("1.3.6.1.4.1.14519.5.2.1.6279.6001.")
        header = read_header(scan.mhd)
        assert header["ElementDataFile"] == f"{uid}.raw"
        assert header["ElementType"] == "MET_SHORT"
        assert check_data_size(uid, scan.mhd, header, Report())
        image, hu, lungs = read(root, uid)
        assert image.GetPixelID() == sitk.sitkInt16
        mask = sitk.ReadImage(str(scan.lungs))
        assert mask.GetPixelID() == sitk.sitkUInt8
        assert scan.lungs_data is not None and scan.lungs_data.name == f"{uid}.zraw"
        assert mask.GetSize() == image.GetSize()
        assert np.allclose(mask.GetOrigin(), image.GetOrigin())
        assert np.allclose(mask.GetSpacing(), image.GetSpacing())
        assert mask.GetDirection() == image.GetDirection()
        assert set(np.unique(lungs)) == {0, 3, 4}
        assert hu.min() >= -2048 and (hu[lungs > 0] < -500).mean() > 0.8  # lungs are air-like
    assert not list(root.rglob(".tmp-*"))
    for name, columns in [
        ("annotations.csv", ANNOTATION_COLUMNS),
        ("annotations_excluded.csv", ANNOTATION_COLUMNS),
        ("candidates.csv", CANDIDATE_COLUMNS),
        ("candidates_V2.csv", CANDIDATE_COLUMNS),
    ]:
        assert (root / name).read_text().splitlines()[0] == ",".join(columns)
        table = read_table(root / name, columns)
        assert set(table["seriesuid"]) <= set(uids)
    marker = json.loads((root / MARKER).read_text())
    assert is_synthetic(root)
    assert marker["dataset"] == "luna16" and marker["scans"] == N_SCANS and marker["seed"] == 0


def test_geometry_is_varied_anisotropic_and_sometimes_flipped(root: Path):
    images = [sitk.ReadImage(str(p)) for p in sorted(root.glob("subset*/*.mhd"))]
    directions = [im.GetDirection() for im in images]
    assert FLIPPED in directions and IDENTITY in directions
    for im in images:
        sx, sy, sz = im.GetSpacing()
        assert sx == sy and 1.3 <= sx <= 1.8 and 2.0 <= sz <= 3.0
        if im.GetDirection() == FLIPPED:  # like real flipped scans: positive x, y origin
            assert im.GetOrigin()[0] > 0 and im.GetOrigin()[1] > 0
    assert len({im.GetSpacing() for im in images}) == len(images)
    assert len({im.GetSize()[2] for im in images}) > 1


def test_annotations_land_on_nodules_inside_a_lung(root: Path):
    ann = pd.read_csv(root / "annotations.csv")
    assert len(ann) >= N_SCANS  # 0-4 per scan, most scans 1-3
    assert (ann["diameter_mm"] >= 4).all() and (ann["diameter_mm"] <= 30).all()
    checked = {FLIPPED: 0, IDENTITY: 0}
    for uid, rows in ann.groupby("seriesuid"):
        image, hu, lungs = read(root, uid)
        for _, row in rows.iterrows():
            z, y, x = voxel(image, row)
            assert hu[z, y, x] > -400, (uid, row.diameter_mm, hu[z, y, x])
            assert lungs[z, y, x] in (3, 4)
            checked[image.GetDirection()] += 1
    assert checked[FLIPPED] and checked[IDENTITY]
    exc = pd.read_csv(root / "annotations_excluded.csv")
    assert len(exc) and ((exc["diameter_mm"] < 3) | (exc["diameter_mm"] == -1)).all()
    for uid, rows in exc.groupby("seriesuid"):
        image, _, lungs = read(root, uid)
        assert all(lungs[voxel(image, row)] in (3, 4) for _, row in rows.iterrows())


def test_candidate_classes_match_the_nodules(root: Path):
    ann = pd.read_csv(root / "annotations.csv")
    for name in ("candidates.csv", "candidates_V2.csv"):
        cand = pd.read_csv(root / name)
        per_scan = cand.groupby("seriesuid").size()
        assert len(per_scan) == N_SCANS and per_scan.min() >= 20
        assert cand["class"].sum() >= len(ann)
        for _, c in cand.iterrows():
            nodules = ann[ann["seriesuid"] == c.seriesuid]
            dist = np.array([np.linalg.norm(world(c) - world(n)) for _, n in nodules.iterrows()])
            radius = nodules["diameter_mm"].to_numpy() / 2
            if c["class"] == 1:
                assert (dist < radius).any()
            else:
                assert (dist > radius).all()
    cand, v2 = pd.read_csv(root / "candidates.csv"), pd.read_csv(root / "candidates_V2.csv")
    assert len(v2) > len(cand)
    assert len(cand.merge(v2, how="inner")) == len(cand)  # V2 = candidates + a few


def files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in root.rglob("*") if p.is_file()}


def test_seeded(tmp_path: Path):
    small = ((16, 20), (48, 48), (48, 48))
    uids = write_luna16(tmp_path / "a", 2, seed=5, shape_range=small)
    assert write_luna16(tmp_path / "b", 2, seed=5, shape_range=small) == uids
    write_luna16(tmp_path / "c", 2, seed=6, shape_range=small)
    a, b, c = (files(tmp_path / k) for k in "abc")
    assert a == b
    assert set(a) != set(c)  # other seriesuids
    assert a["annotations.csv"] != c["annotations.csv"]


def test_anatomy_keeps_its_world_orientation_when_flipped(root: Path):
    """LPS: the left lung (3) at larger world x than the right (4), the spine posterior
    (larger world y) to the lungs, on identity and flipped scans alike."""
    for mhd in sorted(root.glob("subset*/*.mhd")):
        image, hu, lungs = read(root, mhd.stem)

        def centre(mask: np.ndarray, image: sitk.Image = image) -> np.ndarray:
            zyx = np.argwhere(mask).mean(0)
            return np.array(image.TransformContinuousIndexToPhysicalPoint(zyx[::-1].tolist()))

        left, right, bone = centre(lungs == 3), centre(lungs == 4), centre(hu > 300)
        assert left[0] > right[0]
        assert bone[1] > max(left[1], right[1])
