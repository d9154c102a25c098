"""Seeded CT-like phantoms written as an nnU-Net v2 raw dataset (demo and tests).

Each case is an abdomen-like cross-section on its own anisotropic grid: thick slices
(3, 4 or 5 mm) and 1.1-1.4 mm in-plane, so nnU-Net's target-spacing rule takes the thick
axis's 10th percentile; every fourth case is rotated in-plane by its direction matrix
(an oblique acquisition), the others carry the LPS direction of DICOM-derived NIfTI. In
Hounsfield units: air outside a soft-tissue body with a fat rim, an organ (label 1) with
its own shape and contrast, and a hypodense lesion inside it (label 2).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np

from medlit.datasets.io.files import MARKER
from medlit.datasets.io.volume import Geometry, write_volume

LABELS = {"background": 0, "organ": 1, "lesion": 2}
FIELD_Z_MM = 80.0


def ct_phantom(
    shape: tuple[int, int, int], spacing_zyx: tuple[float, float, float], rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """One case: (z, y, x) int16 HU and a (z, y, x) uint8 label map (0, 1 organ, 2 lesion)."""
    z, y, x = np.meshgrid(
        *((np.arange(n) + 0.5) * s for n, s in zip(shape, spacing_zyx, strict=True)),
        indexing="ij",
    )
    extent = np.array(shape) * np.array(spacing_zyx)
    centre = extent / 2
    body = ((y - centre[1]) / (extent[1] * 0.46)) ** 2 + ((x - centre[2]) / (extent[2] * 0.48)) ** 2
    hu = np.full(shape, -1000.0)
    hu[body < 1] = -100.0  # fat rim
    hu[body < 0.8] = rng.uniform(30, 50)  # muscle / soft tissue
    labels = np.zeros(shape, np.uint8)
    # The organ: a tilted ellipsoid of its own size, off-centre.
    c = centre + rng.uniform(-0.08, 0.08, 3) * extent
    radii = np.array([rng.uniform(22, 32), rng.uniform(14, 22), rng.uniform(16, 24)])
    a = rng.uniform(0, math.pi)
    ry = (y - c[1]) * math.cos(a) + (x - c[2]) * math.sin(a)
    rx = -(y - c[1]) * math.sin(a) + (x - c[2]) * math.cos(a)
    organ = ((z - c[0]) / radii[0]) ** 2 + (ry / radii[1]) ** 2 + (rx / radii[2]) ** 2 < 1
    labels[organ] = 1
    hu[organ] = rng.uniform(80, 110)
    # The lesion: a lumpy sphere inside the organ, darker than it.
    inside = np.argwhere(organ)
    centre_l = inside[rng.integers(len(inside))] * np.array(spacing_zyx)
    r = rng.uniform(5, 9)
    d = np.sqrt((z - centre_l[0]) ** 2 + (y - centre_l[1]) ** 2 + (x - centre_l[2]) ** 2)
    lesion = (d < r * (1 + 0.2 * np.cos(3 * np.arctan2(y - centre_l[1], x - centre_l[2])))) & organ
    labels[lesion] = 2
    hu[lesion] = rng.uniform(20, 45)
    hu += rng.normal(0, rng.uniform(10, 20), shape)
    return np.clip(hu, -1024, 3071).astype(np.int16), labels


def _direction(angle: float) -> tuple[float, ...]:
    """LPS-flipped x/y axes rotated in-plane by ``angle`` (radians), z unchanged."""
    c, s = math.cos(angle), math.sin(angle)
    return (-c, s, 0.0, -s, -c, 0.0, 0.0, 0.0, 1.0)


def write_phantoms(
    root: str | Path,
    n_cases: int,
    seed: int = 0,
    size_xy: int = 64,
    n_test: int = 0,
    file_ending: str = ".nii.gz",
) -> list[str]:
    """Write ``n_cases`` labelled phantoms (and ``n_test`` unlabelled ones in imagesTs/)
    under ``root`` as nnU-Net v2 raw ``Dataset900_Phantom``-style folders with their
    dataset.json. Returns the training case ids."""
    root = Path(root)
    rng = np.random.default_rng(seed)
    ids = []
    for i in range(n_cases + n_test):
        sz = float(rng.choice([3.0, 4.0, 5.0]))
        sxy = float(rng.uniform(1.1, 1.4))
        shape = (int(round(FIELD_Z_MM / sz)), size_xy, size_xy)
        hu, labels = ct_phantom(shape, (sz, sxy, sxy), rng)
        angle = float(rng.uniform(0.2, 0.5)) if i % 4 == 3 else 0.0
        geometry = Geometry(
            (float(rng.uniform(-50, 50)), float(rng.uniform(-200, -100)), float(-sz * i)),
            (sxy, sxy, sz),
            _direction(angle),
        )
        case = f"phantom_{i:03d}"
        if i < n_cases:
            write_volume(hu, geometry, root / "imagesTr" / f"{case}_0000{file_ending}")
            write_volume(labels, geometry, root / "labelsTr" / f"{case}{file_ending}")
            ids.append(case)
        else:
            write_volume(hu, geometry, root / "imagesTs" / f"{case}_0000{file_ending}")
    dataset = {
        "channel_names": {"0": "CT"},
        "labels": LABELS,
        "numTraining": n_cases,
        "file_ending": file_ending,
        "name": "Phantom",
        "description": "medlit's synthetic CT-like phantoms (anisotropic, oblique)",
    }
    (root / "dataset.json").write_text(json.dumps(dataset, indent=2))
    (root / MARKER).write_text(
        json.dumps({"dataset": "nnunet-raw", "cases": n_cases, "seed": seed})
    )
    return ids
