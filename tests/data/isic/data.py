#!/usr/bin/env python
"""Write tiny, seeded ISIC releases in the official layouts, for the tests.

    python tests/data/isic/data.py OUT_DIR [--year 2018_task3] [--lesions 20]

Images are 48×64 JPEGs (masks 0/255 PNGs for 2018 Task 1).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from medlit.datasets.isic.phantom import write_isic

SIZE = (48, 64)


def make_isic(
    root: str | Path, year: str = "2018_task3", lesions: int = 20, seed: int = 0
) -> list[str]:
    return write_isic(root, year, lesions, size=SIZE, seed=seed)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("out")
    parser.add_argument(
        "--year", default="2018_task3", choices=["2018_task1", "2018_task3", "2019", "2020"]
    )
    parser.add_argument("--lesions", type=int, default=20)
    args = parser.parse_args()
    print("\n".join(make_isic(args.out, args.year, args.lesions)))
