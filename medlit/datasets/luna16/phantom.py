"""Seeded synthetic chest CT in the official LUNA16 layout (demo and tests).

Each scan is a chest-like phantom in Hounsfield units: air, an elliptical body with a
fat rim and a muscle wall crossed by ribs, a vertebra posteriorly, the mediastinum and
heart, the trachea, two lungs (-850 HU, denser posteriorly) holding trees of tapering
vessels, and 0-4 solid nodules of 4-30 mm (log-uniform, so mostly small), plus a few
findings that the official scoring excludes. A nodule seen on one axial slice looks
much like a vessel running across it; only the neighbouring slices tell them apart,
which is what makes it a fair detection problem rather than an easy one.

Every scan draws its own size, anisotropic spacing, origin and anatomy; about one scan
in eight has the flipped direction ``-1 0 0 0 -1 0 0 0 1`` of some real LUNA16 scans
(array mirrored in x and y, origin moved so that the body stays where it was). Anatomy
is defined in millimetres and every position written to a CSV file is converted to
world coordinates by SimpleITK from the voxel index where it was drawn.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import pandas as pd
import SimpleITK as sitk
from scipy import ndimage

from medlit.datasets.io.files import MARKER, atomic_write
from medlit.datasets.io.volume import Geometry, write_image
from medlit.datasets.luna16.source import ANNOTATION_COLUMNS, CANDIDATE_COLUMNS, N_SUBSETS

UID_ROOT = "1.3.6.1.4.1.14519.5.2.1.6279.6001."
IDENTITY = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0)
FLIPPED = (-1.0, 0.0, 0.0, 0.0, -1.0, 0.0, 0.0, 0.0, 1.0)
LEFT_LUNG, RIGHT_LUNG = 3, 4  # values of the official seg-lungs-LUNA16 masks
EDGE_MM = 0.8  # width of the soft edge of vessels and nodules (partial volume)


def _sphere_directions(n: int = 96) -> np.ndarray:
    """``n`` nearly uniform unit vectors (Fibonacci sphere), (n, 3)."""
    k = np.arange(n) + 0.5
    polar, azimuth = np.arccos(1 - 2 * k / n), np.pi * (1 + 5**0.5) * k
    return np.column_stack(
        [np.cos(azimuth) * np.sin(polar), np.sin(azimuth) * np.sin(polar), np.cos(polar)]
    )


DIRECTIONS = _sphere_directions()


class Chest:
    """The anatomy of one scan, in millimetres of its canonical (identity-direction) grid.

    Points are (x, y, z) mm from the centre of voxel 0; +x is the patient's left, +y
    posterior, +z superior (LPS, as in LUNA16's world frame).
    """

    def __init__(
        self,
        shape: tuple[int, int, int],
        spacing: np.ndarray,
        rng: np.random.Generator,
        lungs: str = "anatomical",
    ):
        nz, ny, nx = shape
        self.shape, self.spacing = shape, spacing
        self.extent = (np.array([nx, ny, nz]) - 1) * spacing
        fov = self.extent[:2].mean()
        s = self.scale = fov / 200.0  # anatomy is proportional to the field of view
        u = rng.uniform
        self.cx, self.cy = self.extent[:2] / 2 + rng.normal(0, 0.015 * fov, 2)
        self.a, self.b = fov * u(0.40, 0.46), fov * u(0.30, 0.35)  # body semi-axes
        self.fat, self.muscle = u(3, 9) * s, u(6, 11) * s  # rim thicknesses
        self.a_in = self.a - self.fat - self.muscle  # the thoracic cavity
        self.b_in = self.b - self.fat - self.muscle
        self.mediastinum = u(11, 16) * s  # half-width
        self.rv = u(10, 14) * s  # vertebral body radius
        self.vy = self.cy + self.b_in * u(0.80, 0.92)
        z_len = self.extent[2]
        self.lz, self.az = z_len * u(0.44, 0.56), z_len * u(0.40, 0.52)
        self.lung_x = self.a_in * u(0.47, 0.55, 2)  # offset of each lung from the midline
        self.ax, self.ay = self.a_in * u(0.44, 0.52, 2), self.b_in * u(0.85, 0.97, 2)
        self.ly = self.cy + self.b_in * u(-0.02, 0.08, 2)
        self.heart = (
            np.array(
                [
                    self.cx + self.mediastinum * u(0, 0.6),
                    self.cy - 0.35 * self.b_in,
                    self.lz - 0.5 * self.az,
                ]
            ),
            np.array([0.42 * self.a_in, 0.5 * self.b_in, 0.45 * self.az]) * u(0.85, 1.15, 3),
        )
        self.trachea_r, self.trachea_z = u(6, 9) * s, self.lz + self.az * u(0.2, 0.4)
        self.wave = (u(0.03, 0.07), *(2 * np.pi / u(60, 140, 3)), *u(0, 2 * np.pi, 3))
        self.ellipsoids = lungs == "ellipsoids"
        if self.ellipsoids:
            # Each lung an exact ellipsoid whose volume is known (4/3 pi abc): smaller,
            # clear of the midline, the chest wall, the vertebra and the scan's ends, so
            # nothing cuts it. The same draws as the anatomical lungs, rescaled, so every
            # other part of the scan is as it would be.
            self.lung_x = self.lung_x * (0.52 / 0.51)
            self.ax, self.ay = self.ax * (0.36 / 0.48), self.ay * (0.65 / 0.91)
            self.ly = np.full(2, self.cy)
            self.lz = z_len / 2 + (self.lz - z_len / 2) * 0.5
            self.az = self.az * (0.38 / 0.46)
            self.wave = (0.0, *self.wave[1:])

    def lung_volumes_ml(self) -> tuple[float, float]:
        """The ellipsoid lungs' exact volumes (left, right) in mL, by the formula."""
        if not self.ellipsoids:
            raise ValueError("anatomical lungs have no closed-form volume")
        left, right = (4 / 3 * np.pi * self.ax[k] * self.ay[k] * self.az / 1000 for k in (1, 0))
        return float(left), float(right)

    def lung_label(self, x: np.ndarray, y: np.ndarray, z: np.ndarray) -> np.ndarray:
        """Lung mask value (3 left, 4 right, 0 elsewhere) at points given in mm; the arrays
        broadcast (pass 1-D columns for a grid)."""
        left = x > self.cx
        side = left.astype(np.intp)  # 0 right, 1 left
        amp, kx, ky, kz, px, py, pz = self.wave
        bumpy = 1 + amp * np.cos(kx * x + px) * np.cos(ky * y + py) + amp * np.cos(kz * z + pz)
        lung_cx = self.cx + np.where(left, 1, -1) * self.lung_x[side]
        q = (
            ((x - lung_cx) / self.ax[side]) ** 2
            + ((y - self.ly[side]) / self.ay[side]) ** 2
            + ((z - self.lz) / self.az) ** 2
        )
        if self.ellipsoids:
            return np.where(q < 1, np.where(left, LEFT_LUNG, RIGHT_LUNG), 0).astype(np.uint8)
        (hx, hy, hz), (ha, hb, hc) = self.heart
        inside = (
            (q < bumpy)
            & (((x - self.cx) / self.a_in) ** 2 + ((y - self.cy) / self.b_in) ** 2 < 1)
            & (np.abs(x - self.cx) > self.mediastinum)
            & (((x - hx) / ha) ** 2 + ((y - hy) / hb) ** 2 + ((z - hz) / hc) ** 2 > 1)
            & ((x - self.cx) ** 2 + (y - self.vy) ** 2 > (self.rv + 5 * self.scale) ** 2)
            & (x >= 0) & (y >= 0) & (z >= 0)
            & (x <= self.extent[0]) & (y <= self.extent[1]) & (z <= self.extent[2])
        )  # fmt: skip
        return np.where(inside, np.where(left, LEFT_LUNG, RIGHT_LUNG), 0).astype(np.uint8)

    def grid(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Voxel centres in mm as broadcastable (z, 1, 1), (1, y, 1), (1, 1, x) columns."""
        nz, ny, nx = self.shape
        sx, sy, sz = self.spacing.astype(np.float32)
        x = (np.arange(nx, dtype=np.float32) * sx)[None, None, :]
        y = (np.arange(ny, dtype=np.float32) * sy)[None, :, None]
        z = (np.arange(nz, dtype=np.float32) * sz)[:, None, None]
        return x, y, z

    def fits(self, centre: np.ndarray, radius: float) -> bool:
        """Whether a ball of ``radius`` mm around ``centre`` lies inside one lung."""
        label = self.lung_label(*centre)
        pts = centre + np.concatenate([DIRECTIONS * radius, DIRECTIONS[::3] * radius / 2])
        return bool(label) and bool((self.lung_label(*pts.T) == label).all())

    def body(self, rng: np.random.Generator) -> np.ndarray:
        """HU of everything but vessels and findings, (z, y, x) float32, without noise."""
        x, y, z = self.grid()
        nz = self.shape[0]
        u = rng.uniform
        ex, ey = (x - self.cx), (y - self.cy)
        rho = np.sqrt((ex / self.a) ** 2 + (ey / self.b) ** 2)[0]  # (y, x)
        rho_in = np.sqrt((ex / self.a_in) ** 2 + (ey / self.b_in) ** 2)[0]
        rho_wall = np.sqrt((ex / (self.a - self.fat)) ** 2 + (ey / (self.b - self.fat)) ** 2)[0]
        plane = np.full(rho.shape, -1000.0, np.float32)
        plane[rho < 1] = u(-120, -80)  # subcutaneous fat
        plane[rho_wall < 1] = u(30, 60)  # muscle
        plane[rho_in < 1] = u(30, 50)  # mediastinum
        # Vertebra: body (cortical rim brighter), canal, posterior arch.
        d_body = np.hypot(ex, y - self.vy)[0]
        bone = u(400, 550)
        canal_y = self.vy + self.rv + 6 * self.scale
        d_canal = np.hypot(ex, y - canal_y)[0]
        plane[d_canal < 10 * self.scale] = bone + 100
        plane[d_canal < 5 * self.scale] = u(10, 40)
        plane[d_body < self.rv] = bone + 150
        plane[d_body < self.rv - 2 * self.scale] = bone
        hu = np.repeat(plane[None], nz, axis=0)
        # Ribs: bright arcs in the chest wall whose angle drifts from slice to slice.
        band = (rho_in > 1.02) & (rho_wall < 0.97)
        theta = np.arctan2(ey / self.b, ex / self.a)[0][band]
        n_ribs, pitch = rng.integers(10, 15), u(20, 32)
        phase = 2 * np.pi * z[:, 0, 0] / pitch + u(0, 2 * np.pi)
        ribs = np.cos(n_ribs * theta[None, :] + phase[:, None]) > 0.75
        ribs &= np.abs(np.sin(theta))[None, :] < 0.95  # none at the sternum and spine
        hu[:, band] = np.where(ribs, u(500, 700), hu[:, band])
        (hx, hy, hz), (ha, hb, hc) = self.heart
        heart = ((x - hx) / ha) ** 2 + ((y - hy) / hb) ** 2 + ((z - hz) / hc) ** 2 < 1
        hu[heart & (rho_in < 1)] = u(35, 55)
        trachea = (np.hypot(ex, y - (self.cy - 0.2 * self.b_in)) < self.trachea_r) & (
            z > self.trachea_z
        )
        hu[trachea] = -1000
        return hu


def _vessels(
    chest: Chest, lungs: np.ndarray, rng: np.random.Generator, per_lung: int = 700
) -> tuple[list, list]:
    """Vessel trees grown from each hilum outwards, tapering from 4-5 mm to 1.5 mm
    and branching: segments (p0, p1, r0, r1) in mm and the branch points."""
    segments, branches = [], []
    nz, ny, nx = lungs.shape
    x, y, z = chest.grid()
    for label, sign in ((LEFT_LUNG, 1), (RIGHT_LUNG, -1)):
        hilar = (
            (np.abs(x - chest.cx) < chest.mediastinum + 10 * chest.scale)
            & (np.abs(y - chest.cy) < 0.4 * chest.b_in)
            & (np.abs(z - chest.lz) < 0.4 * chest.az)
        )
        starts = np.flatnonzero((lungs == label) & hilar)
        if not starts.size:
            starts = np.flatnonzero(lungs == label)
        if not starts.size:
            continue
        queue = []
        for _ in range(rng.integers(8, 13)):
            zyx = np.unravel_index(starts[rng.integers(starts.size)], lungs.shape)
            d = rng.normal(size=3)
            d[0] = sign * (abs(d[0]) + 0.3)
            d /= np.sqrt(d @ d)
            queue.append((np.array(zyx[::-1]) * chest.spacing, d, rng.uniform(2.0, 2.6)))
        count, size = 0, np.array(lungs.shape[::-1])
        while queue and count < per_lung:
            p, d, r = queue.pop(rng.integers(len(queue)))  # grow the trees evenly
            for _ in range(4):  # bend away from the lung's edge, or stop there
                step = d + rng.normal(0, 0.3, 3)
                step *= rng.uniform(4, 8) / np.sqrt(step @ step)
                i = np.rint((p + step) / chest.spacing).astype(int)
                if (i >= 0).all() and (i < size).all() and lungs[i[2], i[1], i[0]] == label:
                    break
            else:
                continue
            q, r1, d = p + step, r * rng.uniform(0.93, 0.98), step / np.sqrt(step @ step)
            segments.append((p, q, r, r1))
            count += 1
            if r1 < 0.75:
                continue
            if rng.random() < 0.4:
                g = rng.normal(size=3)
                side = g - (g @ d) * d  # a random direction across the parent
                child = d + side * (rng.uniform(0.6, 1.4) / np.sqrt(side @ side))
                queue.append((q, child / np.sqrt(child @ child), r1 * rng.uniform(0.7, 0.85)))
                branches.append(q)
                r1 *= 0.92
            queue.append((q, d, r1))
    return segments, branches


def _draw_tubes(frac: np.ndarray, chest: Chest, segments: list) -> None:
    """Max into ``frac`` (z, y, x) the soft occupancy of every tapering segment; each one is
    computed on its own bounding box only."""
    if not segments:
        return
    sp = chest.spacing
    p0 = np.array([s[0] for s in segments])
    p1 = np.array([s[1] for s in segments])
    r0, r1 = np.array([s[2] for s in segments]), np.array([s[3] for s in segments])
    pad = (np.maximum(r0, r1) + EDGE_MM)[:, None]
    n = np.array(frac.shape[::-1])
    lo = np.clip(np.floor((np.minimum(p0, p1) - pad) / sp).astype(int), 0, n)
    hi = np.clip(np.ceil((np.maximum(p0, p1) + pad) / sp).astype(int) + 1, 0, n)
    axes = [np.arange(k, dtype=np.float32) * s for k, s in zip(n, sp, strict=True)]
    v = (p1 - p0).astype(np.float32)
    vv = np.maximum((v * v).sum(1), 1e-6)
    for i in np.flatnonzero((hi > lo).all(1)):
        (x0, y0, z0), (x1, y1, z1), (vx, vy, vz) = lo[i], hi[i], v[i]
        dx = (axes[0][x0:x1] - p0[i, 0])[None, None, :]
        dy = (axes[1][y0:y1] - p0[i, 1])[:, None]
        dz = (axes[2][z0:z1] - p0[i, 2])[:, None, None]
        t = (dx * vx + dy * vy + dz * vz) / vv[i]
        np.minimum(np.maximum(t, 0, out=t), 1, out=t)
        dist = np.sqrt((dx - t * vx) ** 2 + (dy - t * vy) ** 2 + (dz - t * vz) ** 2)
        f = 0.5 + (r0[i] + t * (r1[i] - r0[i]) - dist) / EDGE_MM
        box = frac[z0:z1, y0:y1, x0:x1]
        np.maximum(box, np.minimum(f, 1, out=f), out=box)  # frac >= 0 clips below


def _draw_blob(
    hu: np.ndarray,
    chest: Chest,
    centre: np.ndarray,
    radii: np.ndarray,
    value: float,
    rng: np.random.Generator,
    lobulation: float = 0.0,
) -> None:
    """Blend a soft, randomly oriented, slightly lobulated ellipsoid (radii in mm) into ``hu``."""
    sp, n = chest.spacing, np.array(hu.shape[::-1])
    pad = radii.max() * (1 + lobulation) + EDGE_MM
    lo = np.clip(np.floor((centre - pad) / sp).astype(int), 0, n)
    hi = np.clip(np.ceil((centre + pad) / sp).astype(int) + 1, 0, n)
    g = np.stack(
        np.meshgrid(
            *(np.arange(lo[k], hi[k]) * sp[k] - centre[k] for k in (2, 1, 0)), indexing="ij"
        )
    )[::-1]  # (3 = x, y, z; z, y, x)
    rot, _ = np.linalg.qr(rng.normal(size=(3, 3)))
    local = np.tensordot(rot.T, g, axes=1)
    rho = np.sqrt(((local / radii[:, None, None, None]) ** 2).sum(0))
    bump = 1.0
    if lobulation:
        unit = local / np.maximum(np.linalg.norm(local, axis=0), 1e-6)
        for _ in range(3):
            axis = DIRECTIONS[rng.integers(len(DIRECTIONS))]
            arg = rng.uniform(1, 3) * np.pi * np.tensordot(axis, unit, axes=1)
            bump = bump + lobulation / 3 * np.cos(arg + rng.uniform(0, 2 * np.pi))
    f = np.clip(0.5 + (bump - rho) * radii.min() / EDGE_MM, 0, 1)
    box = hu[lo[2] : hi[2], lo[1] : hi[1], lo[0] : hi[0]]
    box += f * (value - box)


@dataclass
class Phantom:
    """One scan on its canonical grid; positions are (x, y, z) mm from voxel 0's centre."""

    hu: np.ndarray  # (z, y, x) int16
    lungs: np.ndarray  # (z, y, x) uint8, 3 left / 4 right
    nodules: list = field(default_factory=list)  # (centre, diameter mm)
    excluded: list = field(default_factory=list)  # (centre, diameter mm or -1)
    candidates: list = field(default_factory=list)  # (centre, class)
    extra_candidates: list = field(default_factory=list)  # only in candidates_V2.csv
    lung_volumes_ml: tuple[float, float] | None = None  # (left, right), ellipsoid lungs


def _place(
    chest: Chest,
    lung_voxels: np.ndarray,
    radius: float,
    taken: list[tuple[np.ndarray, float]],
    rng: np.random.Generator,
    tries: int = 40,
) -> np.ndarray | None:
    """A centre whose ball of ``radius`` + 2 mm lies in one lung, clear of ``taken``
    (centre, keep-out radius); within a quarter voxel of a voxel centre, so the voxel
    nearest to it always lies inside the finding."""
    for _ in range(tries):
        zyx = np.unravel_index(lung_voxels[rng.integers(len(lung_voxels))], chest.shape)
        c = (np.array(zyx[::-1]) + rng.uniform(-0.25, 0.25, 3)) * chest.spacing
        if all(np.linalg.norm(c - t) > radius + keep for t, keep in taken) and chest.fits(
            c, radius + 2
        ):
            return c
    return None


def luna16_phantom(
    shape: tuple[int, int, int],
    spacing: tuple[float, float, float],
    rng: np.random.Generator,
    lungs: str = "anatomical",
) -> Phantom:
    """One chest CT phantom of ``shape`` (z, y, x) voxels and ``spacing`` (x, y, z) mm;
    ``lungs``: see :func:`write_luna16`."""
    sp = np.asarray(spacing, float)
    chest = Chest(shape, sp, rng, lungs)
    lungs = chest.lung_label(*chest.grid())
    hu = chest.body(rng)
    in_lung = lungs > 0
    x, y, z = chest.grid()
    gradient = rng.uniform(10, 40) * (y - chest.cy) / chest.b_in  # dependent lung is denser
    hu = np.where(in_lung, rng.uniform(-870, -830) + gradient, hu).astype(np.float32)
    segments, branches = _vessels(chest, lungs, rng)
    frac = np.zeros(shape, np.float32)
    _draw_tubes(frac, chest, segments)
    frac *= in_lung
    hu += frac * (rng.uniform(0, 60) - hu)

    out = Phantom(np.empty(0), lungs)
    if chest.ellipsoids:
        out.lung_volumes_ml = chest.lung_volumes_ml()
    lung_voxels = np.flatnonzero(in_lung)
    taken: list = []
    n_nodules = rng.choice(5, p=[0.1, 0.35, 0.3, 0.17, 0.08]) if lung_voxels.size else 0
    for _ in range(n_nodules):
        diameter = float(np.exp(rng.uniform(np.log(4), np.log(30))))
        for _ in range(4):  # shrink what does not fit (small lungs)
            c = _place(chest, lung_voxels, diameter / 2 * 1.1, taken, rng)
            if c is not None or diameter <= 4:
                break
            diameter = max(4.0, diameter * 0.7)
        if c is None:
            continue
        r = diameter / 2
        _draw_blob(hu, chest, c, np.full(3, r), rng.uniform(-100, 80), rng, lobulation=0.1)
        out.nodules.append((c, diameter))
        taken.append((c, r + 3))
        for _ in range(rng.integers(1, 4)):  # detector hits, within a quarter radius
            out.candidates.append((c + DIRECTIONS[rng.integers(96)] * rng.uniform(0, 0.24) * r, 1))
        if diameter >= 10 and rng.random() < 0.5:
            out.extra_candidates.append((c + DIRECTIONS[rng.integers(96)] * 0.2 * r, 1))
    # Findings the scoring excludes: tiny nodules (< 3 mm) and non-nodules (diameter -1).
    for _ in range(rng.choice(3, p=[0.5, 0.35, 0.15]) if lung_voxels.size else 0):
        tiny = rng.random() < 0.6
        radii = (
            np.full(3, rng.uniform(0.75, 1.5)) if tiny else rng.uniform([2, 1, 0.75], [4, 2, 1.25])
        )
        # A non-nodule counts as 10 mm wide in the scoring: keep it well clear of nodules.
        clear = taken if tiny else [(t, keep + 5) for t, keep in taken]
        c = _place(chest, lung_voxels, radii.max(), clear, rng)
        if c is None:
            continue
        _draw_blob(hu, chest, c, radii, rng.uniform(-300, 60), rng)
        out.excluded.append((c, 2 * radii[0] if tiny else -1.0))
        out.candidates.append((c, 0))
        taken.append((c, radii.max() + 3))

    # Non-nodule candidates: on vessels, at branch points, at the lung edge, anywhere.
    core = in_lung.copy()
    for axis in range(3):
        core &= np.roll(in_lung, 1, axis) & np.roll(in_lung, -1, axis)
    edge_voxels = np.flatnonzero(in_lung & ~core)

    def negative() -> np.ndarray | None:
        kind = rng.choice(4, p=[0.35, 0.15, 0.2, 0.3])
        if kind == 0 and segments:
            p0, p1, _, _ = segments[rng.integers(len(segments))]
            c = p0 + rng.random() * (p1 - p0)
        elif kind == 1 and branches:
            c = branches[rng.integers(len(branches))] + rng.normal(0, 0.5, 3)
        else:
            pool = edge_voxels if kind == 2 else lung_voxels
            if not pool.size:
                return None
            zyx = np.unravel_index(pool[rng.integers(len(pool))], shape)
            c = (np.array(zyx[::-1]) + rng.uniform(-0.3, 0.3, 3)) * sp
        c = np.clip(c, 0, chest.extent)
        return c if all(np.linalg.norm(c - n) > d / 2 + 3 for n, d in out.nodules) else None

    for bucket, count in (
        (out.candidates, rng.integers(20, 41)),
        (out.extra_candidates, rng.integers(0, 4)),
    ):
        for _ in range(count * 3):
            if count <= 0:
                break
            if (c := negative()) is not None:
                bucket.append((c, 0))
                count -= 1
    order = rng.permutation(len(out.candidates))
    out.candidates = [out.candidates[i] for i in order]

    sigma = rng.uniform(20, 40)
    hu += rng.standard_normal(shape, dtype=np.float32) * (sigma * 1.6)
    hu = ndimage.gaussian_filter(hu, (0, 0.5, 0.5))  # in-plane only: keeps thin slices thin
    if rng.random() < 1 / 3:  # outside the reconstruction circle, as many scanners write
        r2 = ((x - chest.extent[0] / 2) / (chest.extent[0] / 2)) ** 2 + (
            (y - chest.extent[1] / 2) / (chest.extent[1] / 2)
        ) ** 2
        hu[:, (r2 > 1.0)[0]] = -2000
    out.hu = np.clip(np.rint(hu), -2048, 3071).astype(np.int16)
    return out


def _world(image: sitk.Image, mm: np.ndarray, flipped: bool) -> list[float]:
    """World (x, y, z) mm of a canonical-grid position, through SimpleITK's index ->
    physical point transform of the written ``image`` (mirrored in x, y when flipped)."""
    idx = np.asarray(mm) / np.asarray(image.GetSpacing())  # canonical (x, y, z) index
    if flipped:
        nx, ny, _ = image.GetSize()
        idx = np.array([nx - 1 - idx[0], ny - 1 - idx[1], idx[2]])
    point = image.TransformContinuousIndexToPhysicalPoint(tuple(map(float, idx)))
    return [round(v, 6) for v in point]


def _write_csv(path: Path, rows: list, columns: tuple[str, ...]) -> None:
    table = pd.DataFrame(rows, columns=list(columns))
    atomic_write(path, lambda tmp: table.to_csv(tmp, index=False))


def write_luna16(
    root: str | Path,
    n_scans: int = 80,
    seed: int = 42,
    n_subsets: int = N_SUBSETS,
    shape_range: tuple[tuple[int, int], tuple[int, int], tuple[int, int]] = (
        (48, 72),
        (128, 128),
        (128, 128),
    ),
    lung_masks: bool = True,
    lungs: Literal["anatomical", "ellipsoids"] = "anatomical",
) -> list[str]:
    """Write ``n_scans`` chest CT phantoms under ``root`` in the official LUNA16 layout.

    Writes ``subset{k}/<seriesuid>.mhd`` + ``.raw`` (int16 HU), ``annotations.csv``,
    ``annotations_excluded.csv``, ``candidates.csv``, ``candidates_V2.csv`` (the same
    rows plus a few), ``seg-lungs-LUNA16/<seriesuid>.mhd`` + ``.zraw`` and the
    synthetic-data marker. Each scan draws its shape, an in-plane spacing of 1.3-1.8 mm,
    a slice spacing of 2.0-3.0 mm and its origin; scans 3, 11, 19, ... (the last one
    when there are fewer than four) have the flipped direction. Apart from that flip
    rule, scan ``i`` depends only on ``seed`` and ``i``, not on ``n_scans``.

    Args:
        root: dataset folder (created when missing).
        n_scans: number of scans; scan ``i`` goes to ``subset{i % n_subsets}``.
        seed: seed of every random draw.
        n_subsets: number of official folds to fill, 1-10.
        shape_range: (min, max) voxels, inclusive, of z, y, x.
        lung_masks: also write the lung masks (uint8: 3 left lung, 4 right lung).
        lungs: ``anatomical``: lungs shaped by the chest around them (the mediastinum,
            the heart, the vertebra, a wavy surface), the detection demos' scans;
            ``ellipsoids``: each lung an exact ellipsoid, so its volume is known in closed
            form (the marker's ``lung_volumes_ml``, {seriesuid: [left, right]}); the
            lung segmentation demo's scans. The rest of the chest is drawn as for
            anatomical lungs (nodules and vessels still lie inside the lungs drawn).

    Returns:
        The seriesuids, in scan order.

    Raises:
        ValueError: ``n_subsets`` or ``shape_range`` out of range.
    """
    if not 1 <= n_subsets <= N_SUBSETS:
        raise ValueError(f"n_subsets must be 1..{N_SUBSETS}, got {n_subsets}")
    lows, highs = np.array(shape_range, int).T
    if (lows > highs).any() or lows[0] < 8 or (lows[1:] < 32).any():
        raise ValueError(
            f"shape_range {shape_range} must be (min, max) per axis z, y, x with min <= max, "
            "at least 8 slices and 32 voxels in-plane"
        )
    root = Path(root)
    uids: list[str] = []
    if lungs not in ("anatomical", "ellipsoids"):
        raise ValueError(f"lungs must be 'anatomical' or 'ellipsoids', got {lungs!r}")
    ann, exc, cand, cand_v2 = [], [], [], []
    volumes: dict[str, list[float]] = {}
    for i, seq in enumerate(np.random.SeedSequence(seed).spawn(n_scans)):
        rng = np.random.default_rng(seq)
        uid = UID_ROOT + str(rng.integers(1, 10)) + "".join(map(str, rng.integers(0, 10, 29)))
        if uid in uids:
            raise RuntimeError(f"seriesuid {uid} drawn twice (seed {seed}); use another seed")
        uids.append(uid)
        shape = tuple(int(rng.integers(lo, hi + 1)) for lo, hi in zip(lows, highs, strict=True))
        s_xy = round(rng.uniform(1.3, 1.8), 6)
        spacing = (s_xy, s_xy, round(rng.uniform(2.0, 3.0), 6))
        # The body lies a little off the scanner axis (origin about -150..-85 mm at 128 px).
        half = (np.array(shape[:0:-1]) - 1) * s_xy / 2
        origin = np.round([*(-half * rng.uniform(1, 1.35, 2)), rng.uniform(-300, -50)], 4)
        phantom = luna16_phantom(shape, spacing, rng, lungs)
        hu, mask = phantom.hu, phantom.lungs
        if phantom.lung_volumes_ml is not None:
            volumes[uid] = [round(v, 6) for v in phantom.lung_volumes_ml]
        flipped = i % 8 == 3 or (n_scans < 4 and i == n_scans - 1)
        if flipped:  # mirror the array, move the origin: same anatomy at the same place
            hu, mask = hu[:, ::-1, ::-1].copy(), mask[:, ::-1, ::-1].copy()
            origin = origin + np.array([shape[2] - 1, shape[1] - 1, 0]) * spacing
        geom = Geometry(tuple(map(float, origin)), spacing, FLIPPED if flipped else IDENTITY)
        image = geom.apply(sitk.GetImageFromArray(hu))

        ann += [[uid, *_world(image, c, flipped), round(d, 6)] for c, d in phantom.nodules]
        exc += [[uid, *_world(image, c, flipped), round(d, 6)] for c, d in phantom.excluded]
        for rows, found in (
            (cand, phantom.candidates),
            (cand_v2, phantom.candidates + phantom.extra_candidates),
        ):
            rows += [[uid, *_world(image, c, flipped), k] for c, k in found]
        write_image(image, root / f"subset{i % n_subsets}" / f"{uid}.mhd")
        if lung_masks:
            mask_image = geom.apply(sitk.GetImageFromArray(mask))
            write_image(mask_image, root / "seg-lungs-LUNA16" / f"{uid}.mhd", compress=True)
    _write_csv(root / "annotations.csv", ann, ANNOTATION_COLUMNS)
    _write_csv(root / "annotations_excluded.csv", exc, ANNOTATION_COLUMNS)
    _write_csv(root / "candidates.csv", cand, CANDIDATE_COLUMNS)
    _write_csv(root / "candidates_V2.csv", cand_v2, CANDIDATE_COLUMNS)
    (root / MARKER).write_text(
        json.dumps(
            {
                "dataset": "luna16",
                "scans": n_scans,
                "seed": seed,
                "n_subsets": n_subsets,
                "shape_range_zyx": [list(r) for r in shape_range],
                "lung_masks": lung_masks,
                "lungs": lungs,
                **({"lung_volumes_ml": volumes} if volumes else {}),
            }
        )
    )
    return uids
