"""3D patch loader: training batches per second from medlit's ``BraTSDataModule`` (3D
patches read from the memory-mapped cache, nnU-Net's augmentation as MONAI transforms)
against nnU-Net v2's own training pipeline on the same cases in its preprocessed format.

Both sides: the 3D demo's patch (48×64×64) and batch (2), a third of each batch forced to
hold foreground, the same number of worker processes, every sample augmented (each
side's nnU-Net default set: rotation, scaling, noise, blur, brightness, contrast,
low-resolution simulation, gamma, mirroring; no elastic deformation), one torch thread a
process. medlit's batches are region targets (WT/TC/ET), nnU-Net's its region targets
too (the dataset is written with nnU-Net's BraTS regions). Deep supervision is off on
nnU-Net's side: its targets at every scale are work medlit's loader does not do.

The cases are written once in nnU-Net's raw format (as nnU-Net's own BraTS 2021 conversion
does) and preprocessed by ``nnUNetv2_plan_and_preprocess``; that and medlit's cache build
are not timed here.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import time
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from benchmarks.common import (
    NNUNET_PYTHON,
    REPO,
    Context,
    Row,
    Section,
    interleave,
    median,
    nnunet_env,
    spread,
)
from medlit.datamodules import BraTSDataModule
from medlit.datasets.brats.phantom import write_brats
from medlit.datasets.io.files import is_synthetic

PEER = NNUNET_PYTHON
DATASET_ID, DATASET = 500, "Dataset500_BraTSDemo"
# nnU-Net's BraTS 2021 channels and labels (nnunetv2/dataset_conversion/Dataset137_BraTS21.py)
CHANNELS = ("t1", "t1ce", "t2", "flair")
NNUNET_LABEL = {1: 2, 2: 1, 4: 3}  # BraTS necrosis, oedema, enhancing -> nnU-Net's
SETUP = {
    "full": {"cases": 10, "shape": (62, 96, 96), "patch": [48, 64, 64], "batches": 60},
    "tiny": {"cases": 5, "shape": (24, 40, 40), "patch": [16, 32, 32], "batches": 3},
}
BATCH = 2


def write_nnunet_raw(root: Path, raw: Path) -> None:
    """The BraTS cases under ``root`` as nnU-Net's raw dataset ``raw``: images linked as
    channels 0000-0003, labels renumbered, regions in dataset.json."""
    (raw / "imagesTr").mkdir(parents=True)
    (raw / "labelsTr").mkdir()
    cases = sorted(p for p in root.iterdir() if p.is_dir())
    for case in cases:
        for i, channel in enumerate(CHANNELS):
            src = case / f"{case.name}_{channel}.nii.gz"
            (raw / "imagesTr" / f"{case.name}_{i:04d}.nii.gz").symlink_to(src)
        seg = sitk.ReadImage(str(case / f"{case.name}_seg.nii.gz"))
        labels = sitk.GetArrayFromImage(seg)
        out = np.zeros_like(labels)
        for brats, nnunet in NNUNET_LABEL.items():
            out[labels == brats] = nnunet
        image = sitk.GetImageFromArray(out)
        image.CopyInformation(seg)
        sitk.WriteImage(image, str(raw / "labelsTr" / f"{case.name}.nii.gz"))
    dataset = {
        "channel_names": {str(i): c for i, c in enumerate(CHANNELS)},
        "labels": {
            "background": 0,
            "whole tumor": [1, 2, 3],
            "tumor core": [2, 3],
            "enhancing tumor": [3],
        },
        "regions_class_order": [1, 2, 3],
        "numTraining": len(cases),
        "file_ending": ".nii.gz",
    }
    (raw / "dataset.json").write_text(json.dumps(dataset, indent=2))


def prepare(ctx: Context, log) -> tuple[Path, Path, float | None]:
    """The cases (medlit's layout), medlit's cache and, where nnU-Net's environment is,
    the nnU-Net raw and preprocessed dataset; the seconds nnU-Net's preprocessing took."""
    setup = SETUP[ctx.sizes.name]
    root, work = ctx.workdir / "BraTS3D-loader", ctx.workdir / "nnunet-loader"
    if not is_synthetic(root):
        write_brats(root, setup["cases"], shape=setup["shape"], spacing=2.5, seed=1)
    _module(ctx, root, 0).prepare_data()
    seconds = None
    if PEER.exists() and not (work / "preprocessed" / DATASET / "nnUNetPlans.json").exists():
        raw = work / "raw" / DATASET
        if raw.exists():
            shutil.rmtree(work)  # a half-made dataset of an interrupted run
        write_nnunet_raw(root, raw)
        start = time.perf_counter()
        done = subprocess.run(
            [
                str(PEER.parent / "nnUNetv2_plan_and_preprocess"),
                *("-d", str(DATASET_ID), "-c", "3d_fullres", "-np", "2", "-npfp", "2"),
            ],
            env=nnunet_env(work, 1),
            capture_output=True,
            text=True,
        )
        if done.returncode != 0:
            raise RuntimeError(f"nnUNetv2_plan_and_preprocess failed:\n{done.stderr[-3000:]}")
        seconds = time.perf_counter() - start
        log(f"  nnU-Net preprocessing: {seconds:.0f} s")
    return root, work, seconds


def _module(ctx: Context, root: Path, workers: int) -> BraTSDataModule:
    setup = SETUP[ctx.sizes.name]
    return BraTSDataModule(
        root=str(root),
        cache_dir=str(ctx.workdir / "medlit-cache-3d-loader"),
        split={"val_fraction": 0.0, "test_fraction": 0.0},
        patch_size=setup["patch"],
        samples_per_epoch=BATCH * (setup["batches"] + 2 * max(workers, 1) + 1),
        foreground_fraction=0.33,
        loader={"batch_size": BATCH, "num_workers": workers},
    )


def medlit_side(ctx: Context, root: Path, workers: int) -> float:
    """Seconds for the timed batches, after the first batch and the batches the workers
    had prefetched (2 each, PyTorch's prefetch_factor)."""
    dm = _module(ctx, root, workers)
    dm.setup("fit")
    batches = iter(dm.train_dataloader())
    for _ in range(2 * max(workers, 1) + 1):
        next(batches)
    start = time.perf_counter()
    for _ in range(SETUP[ctx.sizes.name]["batches"]):
        batch = next(batches)
    seconds = time.perf_counter() - start
    assert tuple(batch["image"].shape) == (BATCH, 4, *SETUP[ctx.sizes.name]["patch"])
    del batches  # stops the workers
    return seconds


class Scaled:
    """nnU-Net's multiplicative brightness (``keep_mean=False``) or contrast (the mean
    kept) on a torchio image tensor: torchio has neither transform. A class, not a
    closure: torchio's queue workers receive the pipeline pickled."""

    def __init__(self, lower: float, upper: float, keep_mean: bool) -> None:
        self.lower, self.upper, self.keep_mean = lower, upper, keep_mean

    def __call__(self, x):
        factor = float(np.random.uniform(self.lower, self.upper))
        if not self.keep_mean:
            return x * factor
        mean = x.mean(dim=(1, 2, 3), keepdim=True)
        return (x - mean) * factor + mean


def _brain(x):
    return x > 0


def torchio_pipeline(root: Path, patch: list[int], per_volume: int, workers: int):
    """torchio's per-volume patch pipeline over the BraTS cases: subjects read once (its
    ``ScalarImage`` stacks the four NIfTI channels), normalised as medlit's cache is (z-score
    over the brain) and held in memory (the warm side, as both others read a cache); each
    augmented whole (nnU-Net's default set in torchio's transforms, probabilities
    nnU-Net's), then ``per_volume`` patches drawn by a ``LabelSampler`` a third of whose
    centres are tumour, through a ``Queue`` whose ``num_workers`` build the volumes (the
    DataLoader over the queue has none, as torchio's docs require)."""
    import math

    import torchio as tio
    from torch.utils.data import DataLoader

    subjects = []
    normalise = tio.ZNormalization(masking_method=_brain)
    for case in sorted(p for p in root.iterdir() if p.is_dir()):
        subject = tio.Subject(
            image=tio.ScalarImage([case / f"{case.name}_{c}.nii.gz" for c in CHANNELS]),
            label=tio.LabelMap(case / f"{case.name}_seg.nii.gz"),
        )
        subject.load()
        subjects.append(normalise(subject))
    augment = tio.Compose(
        [
            tio.RandomAffine(scales=(0.7, 1.4), degrees=30, p=0.2),
            tio.RandomNoise(std=(0, 0.1), p=0.1),
            tio.RandomBlur(std=(0.5, 1.0), p=0.2),
            tio.Lambda(Scaled(0.75, 1.25, False), types_to_apply=[tio.INTENSITY], p=0.15),
            tio.Lambda(Scaled(0.75, 1.25, True), types_to_apply=[tio.INTENSITY], p=0.15),
            tio.RandomAnisotropy(downsampling=(1, 2), p=0.25),
            tio.RandomGamma(log_gamma=(math.log(0.7), math.log(1.5)), p=0.3),
            tio.RandomFlip(axes=(0, 1, 2), flip_probability=0.5),
        ]
    )
    # torchio's arrays are x, y, z: the patch is medlit's z, y, x reversed.
    sampler = tio.LabelSampler(
        patch[::-1], "label", label_probabilities={0: 2, 1: 1 / 3, 2: 1 / 3, 4: 1 / 3}
    )
    queue = tio.Queue(
        tio.SubjectsDataset(subjects, transform=augment),
        max_length=max(4 * BATCH, per_volume * 2),
        samples_per_volume=per_volume,
        sampler=sampler,
        num_workers=workers,
    )
    return DataLoader(queue, batch_size=BATCH, num_workers=0, drop_last=True)


def _regions(label):
    """WT / TC / ET targets of a BraTS label batch (medlit's loader gives these)."""
    import torch

    return torch.cat([label > 0, (label == 1) | (label == 4), label == 4], dim=1)


def torchio_side(ctx: Context, root: Path, workers: int, per_volume: int) -> float:
    """Seconds for the timed batches after the queue's first fill, epochs over the
    subjects chained (the queue restarts its subject loader each one)."""
    import torchio as tio

    setup = SETUP[ctx.sizes.name]
    loader = torchio_pipeline(root, setup["patch"], per_volume, workers)

    def batches():
        while True:
            yield from loader

    stream = batches()
    for _ in range(2 * max(workers, 1) + 1):
        next(stream)
    start = time.perf_counter()
    for _ in range(setup["batches"]):
        batch = next(stream)
        image, target = batch["image"][tio.DATA], _regions(batch["label"][tio.DATA])
    seconds = time.perf_counter() - start
    assert tuple(image.shape) == (BATCH, 4, *setup["patch"][::-1]), image.shape
    assert tuple(target.shape) == (BATCH, 3, *setup["patch"][::-1]), target.shape
    del stream
    return seconds


def nnunet_side(ctx: Context, work: Path, workers: int) -> float:
    setup = SETUP[ctx.sizes.name]
    out = work / "result.json"
    out.unlink(missing_ok=True)
    done = subprocess.run(
        [
            str(PEER),
            str(REPO / "benchmarks/peers/nnunet_loader.py"),
            DATASET,
            ",".join(map(str, setup["patch"])),
            str(BATCH),
            str(workers),
            str(setup["batches"]),
            str(out),
        ],
        env=nnunet_env(work, 1, workers),
        capture_output=True,
        text=True,
    )
    if done.returncode != 0 or not out.exists():
        raise RuntimeError(f"nnU-Net's data loader failed:\n{done.stderr[-3000:]}")
    result = json.loads(out.read_text())
    assert result["shape"] == [BATCH, 4, *setup["patch"]], result
    return result["seconds"]


TORCHIO = "torchio Queue, 1 patch per augmented volume"
TORCHIO_4 = "torchio Queue, 4 patches per augmented volume"


def run(ctx: Context, log=print) -> Section:
    setup = SETUP[ctx.sizes.name]
    workers = max(ctx.sizes.num_workers, 1)
    section = Section("3D patch loader")
    root, work, preprocess_s = prepare(ctx, log)
    sides = {"medlit": lambda r: medlit_side(ctx, root, workers)}
    if PEER.exists():
        sides["nnU-Net v2"] = lambda r: nnunet_side(ctx, work, workers)
    else:
        section.notes.append(
            "The 3D patch loader was not compared with nnU-Net: nnU-Net v2's environment "
            f"({PEER.relative_to(REPO)}) is missing (`bash benchmarks/peers/nnunet.sh`)."
        )
    sides[TORCHIO] = lambda r: torchio_side(ctx, root, workers, 1)
    sides[TORCHIO_4] = lambda r: torchio_side(ctx, root, workers, 4)
    seconds = interleave(sides, ctx.repeats, log)
    rate = {k: setup["batches"] * BATCH / median(v) for k, v in seconds.items()}
    patch = "×".join(map(str, setup["patch"]))
    what = f"3D training patches ({patch}, batches of {BATCH}, {workers} workers"
    for other, label, how in (
        ("nnU-Net v2", "nnU-Net v2's data loader", "nnU-Net's augmentation, a third foreground"),
        (TORCHIO, "torchio's `Queue`", "every sample from its own augmented volume"),
    ):
        if other not in rate:
            continue
        ratio = rate["medlit"] / rate[other]
        section.rows.append(
            Row(
                f"{what}, {how}): medlit vs {label}",
                f"{rate['medlit']:.1f} samples/s",
                f"{rate[other]:.1f} samples/s",
                ratio,
                "speed-up ≥ 1.0x",
                ratio >= 1.0,
            )
        )
        if ratio < 1.0:
            section.misses.append(
                f"**3D patch loader against {label} ({ratio:.2f}x).** medlit "
                f"{spread(seconds['medlit'])} s, {other} {spread(seconds[other])} s per "
                f"{setup['batches']} batches; medlit's time is the augmentation in the "
                "workers (MONAI's transforms on each patch)."
            )
    section.details += [
        f"| side | s per {setup['batches']} batches: median (min-max, n) | samples/s |",
        "| --- | --- | --- |",
        *(f"| {k} | {spread(v)} | {rate[k]:.1f} |" for k, v in seconds.items()),
        "",
        f"{setup['cases']} BraTS phantoms of {'×'.join(map(str, setup['shape']))} voxels at "
        "2.5 mm"
        + (" (the 3D demo's geometry)." if ctx.sizes.name == "full" else ".")
        + (f" nnU-Net's preprocessing took {preprocess_s:.0f} s." if preprocess_s else ""),
        "",
        "torchio (its per-volume patch design): the cases read once, z-scored over the brain "
        "and held in memory (medlit and nnU-Net read their caches), each whole volume "
        "augmented in the queue's workers with nnU-Net's set and probabilities in "
        "torchio's transforms (`RandomAffine` ±30°, ×0.7–1.4; `RandomNoise`; `RandomBlur`; "
        "brightness and contrast as `Lambda`s, which torchio lacks; `RandomAnisotropy` "
        "on one axis where nnU-Net lowers the resolution of all three; `RandomGamma` "
        "without nnU-Net's inverted variant; `RandomFlip` on each axis), then patches "
        "drawn by a `LabelSampler` with a third of the centres in tumour; region targets "
        "made from the label patches. The first row draws one patch per augmented volume, "
        "so every sample is augmented on its own as medlit's and nnU-Net's are; with 4 "
        "patches a volume torchio amortises the augmentation over correlated samples.",
    ]
    return section
