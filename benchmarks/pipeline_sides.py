"""The sides of the data pipeline comparison, each measured in a process of its own:
``python -m benchmarks.pipeline_sides IMPORTS`` imports one group of sides' libraries,
then forks a child per measurement (see ``benchmarks.pipeline.SideServer``)."""

from __future__ import annotations

import importlib
import json
import os
import sys
import time
import traceback
from pathlib import Path
from typing import Any

import numpy as np
import torch

from benchmarks.common import PeakMemory, pin_threads

# What each side imports, before its memory baseline (so that the peak minus the baseline
# is the data's). Sides with the same imports share a server process; medlit
# reads NIfTI with nibabel itself, so the per-sample reader imports nothing more.
IMPORTS = {
    "medlit": ["medlit.datamodules", "medlit.datasets.slices"],
    "monai": ["monai.transforms", "monai.data", "medlit.datasets.brats.source"],
}
SERVER = {
    "medlit": "medlit",
    "medlit-main": "medlit",
    "nibabel": "medlit",
    "monai": "monai",
    "monai-thread": "monai",
    "monai-thread2": "monai",
}

SIDES = {
    "medlit": "medlit BraTSDataModule (memory-mapped cache)",
    # Not compared in the table: shows what the loader workers add to medlit's memory.
    "medlit-main": "medlit BraTSDataModule, loading in the main process (no workers)",
    "nibabel": "per-sample reader (nibabel, .nii.gz each sample)",
    "monai": "MONAI CacheDataset + DataLoader",
    # MONAI's recommended use with a CacheDataset: the random transforms in one thread.
    "monai-thread": "MONAI CacheDataset + ThreadDataLoader (one thread, num_workers=0)",
    # Like for like with medlit's 2 loader processes: 2 thread workers.
    "monai-thread2": "MONAI CacheDataset + ThreadDataLoader (thread workers = medlit's workers)",
}


def _seed_numpy(worker_id: int) -> None:
    """Give each worker its own NumPy stream (Lightning's worker_init_fn does this in a
    real run; a bare DataLoader would hand every worker the same one)."""
    np.random.seed((torch.initial_seed() + worker_id) % 2**32)


def _medlit(cfg: dict[str, Any]) -> tuple[Any, int]:
    from medlit.datamodules import BraTSDataModule

    dm = BraTSDataModule(**cfg["datamodule"], samples_per_epoch=cfg["samples"])
    dm.prepare_data()  # warm: only stats the sources, decodes nothing
    dm.setup("fit")
    loader = dm.train_dataloader()
    loader.worker_init_fn = _seed_numpy
    cached = sum(a.nbytes for e in dm.datasets["train"].entries for a in e.arrays.values())
    return loader, cached


class NiftiPerSample(torch.utils.data.Dataset):
    """The baseline without a cache: each sample decodes its case's five ``.nii.gz`` files
    with nibabel and normalises them as medlit's preprocessing does (crop to the brain,
    z-score each modality over it), then medlit's own ``SliceDataset`` draws and augments
    the slice, so the sampling and augmentation code is the same as medlit's."""

    def __init__(self, cases: list, length: int, slice_args: dict[str, Any]) -> None:
        self.cases, self.length, self.slice_args = cases, length, slice_args

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> dict:
        import nibabel as nib

        from medlit.datasets.brats.torch import SliceDataset
        from medlit.datasets.io.cache import CacheEntry

        case = self.cases[np.random.randint(len(self.cases))]
        # nibabel arrays are (x, y, z); medlit's are (z, y, x).
        image = np.stack([np.asanyarray(nib.load(p).dataobj).T for p in case.images.values()])
        image = image.astype(np.float32)
        seg = np.asanyarray(nib.load(case.seg).dataobj).T.astype(np.uint8)
        brain = image.any(0) | (seg > 0)
        box = tuple(slice(int(i.min()), int(i.max()) + 1) for i in np.nonzero(brain))
        image, seg, brain = image[(slice(None), *box)], seg[box], brain[box]
        for c in range(len(image)):
            values = image[c][brain]
            image[c] = np.where(brain, (image[c] - values.mean()) / max(values.std(), 1e-8), 0)
        entry = CacheEntry(case.folder, {"image": image, "seg": seg}, {"case_id": case.case_id})
        return SliceDataset([entry], length=1, **self.slice_args)[0]


def _nibabel(cfg: dict[str, Any]) -> tuple[Any, int]:
    from medlit.datamodules import BraTSDataModule
    from medlit.datasets.brats.source import LAYOUTS, MODALITIES, discover_cases

    # Borrow the exact transforms of medlit's data module (its setup reads only the labels).
    dm = BraTSDataModule(**cfg["datamodule"])
    dm.setup("fit")
    train = dm.datasets["train"]
    slice_args = {
        "target_fn": train.target_fn,
        "patch_size": cfg["datamodule"]["patch_size"],
        "foreground_fraction": train.foreground_fraction,
        "augment": train.augment,
    }
    del dm, train
    cases = discover_cases(Path(cfg["datamodule"]["root"]), LAYOUTS["2021"], MODALITIES)
    loader = torch.utils.data.DataLoader(
        NiftiPerSample(cases, cfg["samples"], slice_args),
        batch_size=cfg["datamodule"]["loader"]["batch_size"],
        num_workers=cfg["datamodule"]["loader"]["num_workers"],
        worker_init_fn=_seed_numpy,
        drop_last=True,
    )
    return loader, 0


def _monai(cfg: dict[str, Any], threads: bool, thread_workers: int = 0) -> tuple[Any, int]:
    from monai import transforms as T
    from monai.data import CacheDataset, DataLoader, ThreadDataLoader, set_track_meta

    from medlit.datasets.brats.source import LAYOUTS, MODALITIES, discover_cases

    d = cfg["datamodule"]
    p, keys = d["patch_size"], ["image", "label"]
    cases = discover_cases(Path(d["root"]), LAYOUTS["2021"], MODALITIES)
    items = [{"image": [str(f) for f in c.images.values()], "label": str(c.seg)} for c in cases]
    transform = T.Compose(
        [
            # Deterministic, cached once: the same crop and normalisation as medlit's cache,
            # and the foreground/background voxel lists that RandCropByPosNegLabeld would
            # otherwise recompute for every sample (MONAI's documented fast path).
            T.LoadImaged(keys, image_only=True),
            T.EnsureChannelFirstd(keys),
            T.CropForegroundd(keys, source_key="image"),
            T.NormalizeIntensityd("image", nonzero=True, channel_wise=True),
            T.ConvertToMultiChannelBasedOnBratsClassesd("label"),
            T.SpatialPadd(keys, spatial_size=(p, p, -1)),
            T.FgBgToIndicesd("label"),
            T.EnsureTyped(keys, dtype=torch.float32, track_meta=False),
            # Random, per sample: one axial patch, one time in three centred on tumour.
            T.RandCropByPosNegLabeld(
                keys,
                label_key="label",
                spatial_size=(p, p, 1),
                pos=1,
                neg=2,
                num_samples=1,
                fg_indices_key="label_fg_indices",
                bg_indices_key="label_bg_indices",
            ),
            T.SqueezeDimd(keys, dim=3),
            T.RandFlipd(keys, prob=0.5, spatial_axis=0),
            T.RandAffined(
                keys,
                prob=0.5,
                rotate_range=(np.pi / 12,),
                scale_range=(0.15, 0.15),
                translate_range=(0.05 * p, 0.05 * p),
                mode=("bilinear", "nearest"),
                padding_mode="zeros",
                spatial_size=(p, p),
                cache_grid=True,
            ),
            T.RandScaleIntensityd("image", factors=0.1, prob=0.3, channel_wise=True),
        ]
    )
    # copy_cache=False: the first random transform crops, so the cache is never modified
    # (MONAI's documented fast path; the default deep-copies each whole case per sample).
    # The cache is filled in one thread: filled by a thread pool, MONAI 1.6.1 now and then
    # (~1 fill in 10 here) caches a case with 1 channel instead of 4, a race in loading a
    # list of files as channels, which then breaks batch collation.
    ds = CacheDataset(
        items, transform, cache_rate=1.0, num_workers=0, progress=False, copy_cache=False
    )
    # MONAI's fast-training guide: metadata tracking off once the cache is filled (its
    # loading transforms need the metadata), so the random transforms run on plain tensors
    # (12.99 -> 6.72 ms a sample measured with it, single thread).
    set_track_meta(False)
    sampler = torch.utils.data.RandomSampler(ds, replacement=True, num_samples=cfg["samples"])
    if threads:  # MONAI's recommendation with CacheDataset: random transforms in a thread
        loader = ThreadDataLoader(
            ds,
            batch_size=d["loader"]["batch_size"],
            sampler=sampler,
            num_workers=thread_workers,
            use_thread_workers=thread_workers > 0,
        )
    else:
        loader = DataLoader(
            ds,
            batch_size=d["loader"]["batch_size"],
            sampler=sampler,
            num_workers=d["loader"]["num_workers"],
            persistent_workers=d["loader"]["num_workers"] > 0,
        )
    cached = sum(v.nbytes for item in ds._cache for v in item.values() if hasattr(v, "nbytes"))
    return loader, cached


def measure(side: str, cfg: dict[str, Any], server: int) -> dict[str, Any]:
    """Build one side's loader, take its first batch (start-up: cache fill, workers), then
    time ``cfg['batches']`` batches; memory is sampled throughout, with the ``server``
    process this one was forked from (see :class:`PeakMemory`)."""
    builders = {
        "medlit": _medlit,
        "medlit-main": _medlit,
        "nibabel": _nibabel,
        "monai": lambda c: _monai(c, threads=False),
        "monai-thread": lambda c: _monai(c, threads=True),
        "monai-thread2": lambda c: _monai(
            c, threads=True, thread_workers=c["datamodule"]["loader"]["num_workers"]
        ),
    }
    pin_threads(cfg["threads"])  # torch, OpenCV, SimpleITK/ITK, BLAS
    for module in IMPORTS[SERVER[side]]:
        importlib.import_module(module)
    with PeakMemory(also=[server]) as mem:
        base_pss, base_rss = mem.current()
        start = time.perf_counter()
        loader, cached = builders[side](cfg)
        batches = iter(loader)
        next(batches)
        startup = time.perf_counter() - start
        start, samples = time.perf_counter(), 0
        for _ in range(cfg["batches"]):
            samples += len(next(batches)["image"])
        elapsed = time.perf_counter() - start
    return {
        "samples_per_s": samples / elapsed,
        "startup_s": startup,
        "cached_bytes": cached,
        "baseline_pss": base_pss,
        "peak_pss": mem.peak_pss,
        "baseline_rss": base_rss,
        "peak_rss": mem.peak_rss,
    }


def serve(imports: str) -> None:
    """The server's loop (see ``benchmarks.pipeline.SideServer``)."""
    for module in IMPORTS[imports]:
        importlib.import_module(module)
    server = os.getpid()
    for line in sys.stdin:
        side, cfg_path, out = line.rstrip("\n").split("\t")
        pid = os.fork()
        if pid == 0:  # the child: measure, write, leave without running any clean-up
            code = 1
            try:
                os.dup2(2, 1)  # library prints must not reach the protocol pipe
                result = measure(side, json.loads(Path(cfg_path).read_text()), server)
                Path(out).write_text(json.dumps(result))
                code = 0
            except BaseException:
                traceback.print_exc()
            finally:
                # At once: persistent loader workers and a ThreadDataLoader's buffer
                # thread would otherwise hold up (or abort) the interpreter's shutdown.
                os._exit(code)
        _, status = os.waitpid(pid, 0)
        print(os.waitstatus_to_exitcode(status), flush=True)


if __name__ == "__main__":
    serve(sys.argv[1])
