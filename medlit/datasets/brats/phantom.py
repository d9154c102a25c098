"""Seeded synthetic data written in the official on-disk layouts (demo and tests).

The phantoms are meant to be a fair small problem, not an easy one: every case draws
its own brain shape and placement, tumour position, size, lobulated shape and
sub-region proportions, tissue contrasts, noise level and bias field; about one case
in five has no enhancing tumour (a non-enhancing core instead), as in real gliomas.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from medlit.datasets.brats.source import LAYOUTS, MODALITIES
from medlit.datasets.io.files import MARKER
from medlit.datasets.io.volume import Geometry, write_volume

# Mean intensity of each tissue per modality (t1, t1ce, t2, flair), roughly as on real
# skull-stripped MRI: CSF dark on T1/FLAIR and bright on T2; edema bright on T2/FLAIR;
# enhancing tumour bright on T1ce; necrosis dark on T1/T1ce.
TISSUES = {
    "wm": (1.00, 1.00, 0.45, 0.55),
    "gm": (0.75, 0.78, 0.70, 0.72),
    "csf": (0.30, 0.30, 1.35, 0.20),
    "edema": (0.65, 0.68, 1.10, 1.20),
    "ncr": (0.40, 0.38, 1.20, 0.65),
    "et": (0.80, 1.45, 0.90, 1.00),
}


def _lobulated(
    dist: np.ndarray, dirs: np.ndarray, radius: float, rng: np.random.Generator, roughness: float
) -> np.ndarray:
    """Mask of a blob whose radius varies smoothly with direction (a lumpy sphere)."""
    r = np.full(dist.shape, radius, np.float32)
    for _ in range(4):
        axis = rng.normal(size=3)
        axis /= np.linalg.norm(axis)
        freq = rng.uniform(1.0, 3.0)
        r += (
            radius
            * roughness
            * np.cos(freq * np.pi * (dirs @ axis) + rng.uniform(0, 2 * np.pi))
            / 2
        )
    return dist < r


def brats_phantom(
    shape: tuple[int, int, int], spacing: float, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """One case: (4, z, y, x) intensities (int16) and a (z, y, x) label map in 2021 values."""
    zz, yy, xx = (np.arange(n, dtype=np.float32) * spacing for n in shape)
    z, y, x = np.meshgrid(zz, yy, xx, indexing="ij")
    extent = np.array(shape, np.float32) * spacing
    centre = extent / 2 + rng.normal(0, 0.03, 3) * extent
    radii = extent / 2 * rng.uniform([0.72, 0.70, 0.62], [0.88, 0.85, 0.78])
    q = (
        ((z - centre[0]) / radii[0]) ** 2
        + ((y - centre[1]) / radii[1]) ** 2
        + ((x - centre[2]) / radii[2]) ** 2
    )
    brain = q < 1
    labels = np.zeros(shape, np.uint8)
    tissue = np.where(q < rng.uniform(0.45, 0.6), "wm", "gm").astype(object)
    for side in (-1, 1):  # lateral ventricles
        vq = (
            ((z - centre[0]) / (radii[0] * 0.25)) ** 2
            + ((y - centre[1]) / (radii[1] * 0.35)) ** 2
            + ((x - centre[2] - side * radii[2] * 0.15) / (radii[2] * 0.08)) ** 2
        )
        tissue[vq < 1] = "csf"

    # Tumour: somewhere inside the brain, of random size and make-up.
    while True:
        tc_centre = centre + rng.uniform(-0.55, 0.55, 3) * radii
        if (((tc_centre - centre) / radii) ** 2).sum() < 0.45:
            break
    d = np.stack([z - tc_centre[0], y - tc_centre[1], x - tc_centre[2]], -1)
    dist = np.linalg.norm(d, axis=-1)
    dirs = d / np.maximum(dist[..., None], 1e-6)
    r_tc = rng.uniform(8, 22)
    core = _lobulated(dist, dirs, r_tc, rng, 0.35)
    whole = _lobulated(dist, dirs, r_tc * rng.uniform(1.3, 2.1), rng, 0.45) | core
    necrosis = _lobulated(dist, dirs, r_tc * rng.uniform(0.25, 0.65), rng, 0.3) & core
    enhancing = rng.random() > 0.2
    whole &= brain
    core &= brain
    necrosis &= brain
    tissue[whole] = "edema"
    labels[whole] = 2
    if enhancing:
        tissue[core], labels[core] = "et", 4
        tissue[necrosis], labels[necrosis] = "ncr", 1
    else:
        tissue[core], labels[core] = "ncr", 1

    image = np.zeros((4, *shape), np.float32)
    scale = rng.uniform(0.85, 1.15, (len(TISSUES), 4))  # per-case contrast
    for i, (name, means) in enumerate(TISSUES.items()):
        sel = (tissue == name) & brain
        image[:, sel] = (np.asarray(means) * scale[i])[:, None]
    coords = [(c - m) / e for c, m, e in zip((z, y, x), centre, extent, strict=True)]
    for m in range(4):
        a = rng.normal(0, 0.25, 3)
        b = rng.normal(0, 0.35, 3)
        bias = np.exp(sum(ai * c + bi * c * c for ai, bi, c in zip(a, b, coords, strict=True)))
        noise = rng.normal(0, rng.uniform(0.04, 0.10), shape)
        image[m] = np.where(brain, (image[m] + noise) * bias, 0)
    intensity = np.clip(image * rng.uniform(600, 1400, (4, 1, 1, 1)), 0, 32000)
    return intensity.astype(np.int16), labels


def write_brats(
    root: str | Path,
    n_cases: int,
    year: str = "2021",
    shape: tuple[int, int, int] = (62, 96, 96),
    spacing: float = 2.5,
    seed: int = 0,
    with_seg: bool = True,
) -> list[str]:
    """Write ``n_cases`` phantoms under ``root`` in the official layout of ``year``.

    Shapes are (z, y, x) voxels; the default covers BraTS' 240×240×155 mm field of view
    at 2.5 mm so that the demo trains in minutes on a laptop CPU. The geometry carries
    BraTS' LPS direction (-1, -1, 1) and a non-zero origin, like the real files.
    """
    root = Path(root)
    layout = LAYOUTS[year]
    rng = np.random.default_rng(seed)
    geom = Geometry((0.0, -239.0, 0.0), (spacing,) * 3, (-1.0, 0, 0, 0, -1.0, 0, 0, 0, 1.0))
    ids = []
    for i in range(n_cases):
        case = {
            "2020": f"BraTS20_Training_{i + 1:03d}",
            "2021": f"BraTS2021_{i:05d}",
            "2023": f"BraTS-GLI-{i:05d}-000",
        }[year]
        folder = root / case
        image, labels = brats_phantom(shape, spacing, rng)
        if year == "2023":
            labels[labels == 4] = 3
        for m, modality in enumerate(MODALITIES):
            write_volume(image[m], geom, layout.file(folder, modality))
        if with_seg:
            write_volume(labels, geom, layout.file(folder, "seg"))
        ids.append(case)
    (root / MARKER).write_text(
        json.dumps(
            {
                "dataset": "brats",
                "year": year,
                "cases": n_cases,
                "seed": seed,
                "shape_zyx": list(shape),
                "spacing_mm": spacing,
            }
        )
    )
    return ids
