"""Tiny LUNA16 releases in the official layout, for tests."""

from __future__ import annotations

from pathlib import Path

from medlit.datasets.luna16.phantom import write_luna16


def make_luna16(root: Path, scans: int = 10, seed: int = 0) -> list[str]:
    """``scans`` synthetic CT scans of 64×64 × 24-32 voxels, one per subset round-robin."""
    return write_luna16(root, scans, seed=seed, shape_range=((24, 32), (64, 64), (64, 64)))
