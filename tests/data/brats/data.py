#!/usr/bin/env python
"""Write tiny, seeded BraTS datasets in the official layouts, for the tests.

    python tests/data/brats/data.py OUT_DIR [--year 2021] [--cases 8]

The volumes are 16×32×32 voxels at 7.5 mm (the BraTS field of view, coarsely sampled),
so a whole dataset is written in about a second and a training step takes milliseconds.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from medlit.datasets.brats.phantom import write_brats

SHAPE = (16, 32, 32)
SPACING = 7.5


def make_brats(
    root: str | Path, year: str = "2021", cases: int = 8, seed: int = 0, with_seg: bool = True
) -> list[str]:
    return write_brats(
        root, cases, year=year, shape=SHAPE, spacing=SPACING, seed=seed, with_seg=with_seg
    )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("out")
    parser.add_argument("--year", default="2021", choices=["2020", "2021", "2023"])
    parser.add_argument("--cases", type=int, default=8)
    args = parser.parse_args()
    print("\n".join(make_brats(args.out, args.year, args.cases)))
