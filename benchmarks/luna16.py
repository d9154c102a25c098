"""LUNA16: decoding, resampling to 1 mm and caching CT scans, medlit's data module against
MONAI's loader with a persistent (disk) cache, both from a cold cache.

medlit: ``LUNA16DataModule.prepare_data`` (header and data-size checks, SimpleITK
decoding, HU clamp, linear resampling, content hash, ``.npy`` write; plus reading the
CSVs and placing their rows). MONAI: ``PersistentDataset`` over ``LoadImaged`` (ITK
reader) + ``Spacingd`` (bilinear, float32 arithmetic) + a cast to int16, each item read
once so that it is transformed and written to the cache.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import torch

from benchmarks.common import Context, Row, Section, interleave, median, spread, timed
from benchmarks.data import luna16_root

SPACING = (1.0, 1.0, 1.0)


def _medlit(root: Path, cache: Path) -> list[tuple[int, ...]]:
    from medlit.datamodules import LUNA16DataModule

    dm = LUNA16DataModule(
        root=str(root),
        cache_dir=str(cache),
        spacing=SPACING,
        split={"train": [0], "val": [], "test": []},
    )
    dm.prepare_data()
    return [tuple(e.arrays["image"].shape) for e in dm.entries.values()]


def _monai(root: Path, cache: Path) -> list[tuple[int, ...]]:
    from monai import transforms as T
    from monai.data import PersistentDataset

    items = [{"image": str(p)} for p in sorted((root / "subset0").glob("*.mhd"))]
    transform = T.Compose(
        [
            T.LoadImaged("image", reader="ITKReader", image_only=True),
            T.EnsureChannelFirstd("image"),
            T.Spacingd("image", pixdim=SPACING, mode="bilinear", dtype=torch.float32),
            T.CastToTyped("image", dtype=np.int16),  # medlit caches int16 HU: same bytes
        ]
    )
    ds = PersistentDataset(items, transform, cache_dir=cache)
    return [tuple(ds[i]["image"].shape[1:]) for i in range(len(ds))]


def _warm_up(root: Path) -> None:
    """Decode one scan with each reader first: ITK loads its IO modules on first use
    (seconds), which no repeat should pay."""
    import SimpleITK as sitk
    from monai.transforms import LoadImage

    first = next((root / "subset0").glob("*.mhd"))
    sitk.ReadImage(str(first))
    LoadImage(reader="ITKReader", image_only=True)(str(first))


def run(ctx: Context, log=print) -> Section:
    root = luna16_root(ctx)
    n = ctx.sizes.luna_scans

    def cold(side, fn):
        def once(repeat: int):
            cache = ctx.workdir / "luna16-cache" / f"{side}-{repeat}"
            shutil.rmtree(cache, ignore_errors=True)
            result = timed(lambda: fn(root, cache))
            shutil.rmtree(cache, ignore_errors=True)
            return result

        return once

    _warm_up(root)
    results = interleave(
        {"medlit": cold("medlit", _medlit), "monai": cold("monai", _monai)}, ctx.repeats, log
    )
    rate = {k: [n / t for t, _ in v] for k, v in results.items()}
    ratio = median(rate["medlit"]) / median(rate["monai"])
    s = ctx.sizes.luna_shape
    section = Section("LUNA16")
    section.rows.append(
        Row(
            f"LUNA16 CT ({s[2][0]}×{s[1][0]}×{s[0][0]}-{s[0][1]} voxels, `.mhd`/`.raw`) decode + "
            "resample to 1 mm + cache: medlit vs MONAI `PersistentDataset`",
            f"{median(rate['medlit']):.2f} volumes/s",
            f"{median(rate['monai']):.2f} volumes/s",
            ratio,
            "speed-up ≥ 1.0x",
            ratio >= 1.0,
        )
    )
    shapes = {k: v[0][1] for k, v in results.items()}
    section.details += [
        f"{n} scans per repeat, each side from an empty cache every time.",
        "",
        "| side | volumes/s: median (min-max, n) | resampled shapes (medlit z,y,x; MONAI x,y,z) |",
        "| --- | --- | --- |",
        *(f"| {k} | {spread(rate[k])} | {shapes[k]} |" for k in results),
    ]
    if ratio < 1.0:
        section.misses.append(
            f"**LUNA16 ({ratio:.2f}x).** medlit does more per scan than MONAI's loader: it "
            "checks the data size against the header, hashes the source files' bytes for "
            "its content-addressed cache and reads and places the CSV rows."
        )
    return section
