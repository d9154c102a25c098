"""The README demos learn: each demo's config, unchanged but for a shorter run (smaller
or fewer phantoms, fewer steps), clears a threshold that proves learning on held-out data:
the measures of ``benchmarks/quality.py``, with their trivial baselines, at thresholds set
for the shorter run. The README's own targets are checked on the full-size demos by
``python -m benchmarks --only quality`` (``docs/quality.md``), not here.

Each shortened run was checked over three seeds (``MEDLIT_DEMO_SEEDS=42,1,2`` runs every
demo once per seed; the seed goes to ``seed_everything`` and to the data): the worst seed
clears each threshold by at least 10 % of the span between the threshold and the trivial
baseline. The numbers measured, on one
torch thread as the suite's workers run, are in ``SHORT``'s comments.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

from benchmarks.quality import DEMOS, Criterion, Demo, Outcome, mlflow_outcome
from medlit.datasets.brats.phantom import write_brats
from medlit.datasets.isic.phantom import write_isic
from medlit.datasets.luna16.phantom import write_luna16
from medlit.datasets.volumes.phantom import write_phantoms
from medlit.fit import main

SEEDS = [int(s) for s in os.environ.get("MEDLIT_DEMO_SEEDS", "42").split(",")]


@dataclass(frozen=True)
class Short:
    """How a demo is shortened: the demo data written smaller (``write(root, seed)``),
    overrides of the data size and schedule (the network, loss and optimiser stay the
    demo's), and the threshold of each of the demo's criteria for the shorter run."""

    write: Callable[[Path, int], object]
    overrides: tuple[str, ...]
    # criterion name -> (threshold, in words): a number, a function of the outcome (a
    # margin over the run's own baseline), or None where the shorter run does not check
    # the criterion (the words then say why); criteria not named keep the demo's.
    thresholds: dict[str, tuple[float | Callable[[Outcome], float] | None, str]]

    def criteria(self, demo: Demo) -> list[Criterion]:
        out = []
        for c in demo.criteria:
            value, words = self.thresholds.get(c.name, (c.threshold, c.target))
            if value is None:
                continue
            fn = value if callable(value) else (lambda o, v=value: v)
            out.append(dataclasses.replace(c, threshold=fn, target=words))
        return out


def _brats(spacing: float, shape: tuple[int, int, int]) -> Callable[[Path, int], object]:
    """16 phantoms with the demo's field of view (62×96×96 voxels at 2.5 mm)."""
    return lambda root, seed: write_brats(root, 16, shape=shape, spacing=spacing, seed=seed)


def _isic(year: str, lesions: int) -> Callable[[Path, int], object]:
    return lambda root, seed: write_isic(root, year, lesions, size=(72, 96), seed=seed)


def _luna(root: Path, seed: int) -> object:
    # 100 scans (10 in each of the validation and test subsets) of 96×96 slices: with 6
    # test scans, one seed's held only 4-7 mm nodules and its CPM said little
    return write_luna16(root, 100, seed=seed, shape_range=((40, 56), (96, 96), (96, 96)))


SHORT: dict[str, Short] = {
    # Seeds 42, 1, 2 (test WT Dice): 0.662, 0.716, 0.850; the worst clears 0.55 by 20 %.
    # (400 samples an epoch took twice as long for 0.684, 0.864, 0.659.)
    "BraTS U-Net": Short(
        _brats(3.75, (42, 64, 64)),
        # batches of 4, not 16: 200 steps at a quarter of the cost each
        (
            "--data.patch_size=64",
            "--data.loader.batch_size=4",
            "--data.samples_per_epoch=200",
            "--trainer.max_epochs=4",
        ),
        {"test WT Dice": (0.55, "≥ 0.55")},
    ),
    # 96 patches an epoch (48 batches of 2), 4 epochs, on the 2.5D short run's phantoms.
    # Seeds 42, 1, 2 (test mean Dice): 0.349, 0.500, 0.328; the worst clears 0.25 by 31 %.
    # (Features 4..32 took 2/3 of the time but scored 0.370, 0.222, 0.274: a margin too
    # thin for a threshold well clear of chance.)
    "BraTS 3D U-Net": Short(
        _brats(3.75, (42, 64, 64)),
        # The demo's DynUNet one stage shorter, for the smaller phantoms' 32×48×48 patches.
        (
            "--data.patch_size=[32, 48, 48]",
            "--model.patch_size=[32, 48, 48]",
            "--model.filters=[8, 16, 32, 64]",
            "--data.samples_per_epoch=96",
            "--trainer.max_epochs=4",
            "--model.tta=none",  # as the seeds were measured (the 8 flips cost 8x at test)
        ),
        {"test mean Dice": (0.25, "≥ 0.25")},
    ),
    # 12 phantoms of 48×48 in-plane voxels, 3 epochs of 240 2.5D slices. Seeds 42, 1, 2
    # (test organ Dice): 0.931, 0.955, 0.956; the worst clears 0.7 by 33 %. The lesion
    # (5-9 mm across, in 3-5 mm slices) comes later: 0.366 and 0 on seeds 42 and 1 at 3
    # epochs, 0.76 on the full demo.
    "Volumes U-Net (nnU-Net raw)": Short(
        lambda root, seed: write_phantoms(root, 12, seed=seed, size_xy=48),
        (
            "--data.patch_size=48",
            "--data.loader.batch_size=8",
            "--data.samples_per_epoch=240",
            "--trainer.max_epochs=3",
            "--data.intensity_samples=1000000",  # nnU-Net's 10e7 draws cost seconds
        ),
        {
            "test organ Dice": (0.7, "≥ 0.7"),
            "test lesion Dice": (None, "checked on the full demo only"),
        },
    ),
    # 20 scans of 96×96 slices (4 test scans), 3 epochs of 240 2.5D slices of 64 px.
    # Worse lung's Dice 0.960, 0.981, 0.969; worst volume error 13.5 %, 3.3 %, 6.7 % (of
    # 8 lungs on coarse 96-voxel slices; the full demo: 2 %): the worst clears 0.85 by
    # 11 % and 25 % by 11.5 % of the span.
    "LUNA16 lungs U-Net": Short(
        lambda root, seed: write_luna16(
            root, 20, seed=seed, shape_range=((40, 56), (96, 96), (96, 96)), lungs="ellipsoids"
        ),
        (
            "--data.patch_size=64",
            "--data.loader.batch_size=8",
            "--data.samples_per_epoch=240",
            "--trainer.max_epochs=3",
        ),
        {
            "test Dice, worse lung": (0.85, "≥ 0.85"),
            "test lung volume vs the ellipsoid formula, worst (%)": (25.0, "≤ 25 %"),
        },
    ),
    # Balanced accuracy 0.890, 0.785, 0.601: the worst clears 3/7 by 60 % of the span.
    "ISIC classifier": Short(
        _isic("2018_task3", 150),
        ("--data.image_size=64", "--trainer.max_epochs=3"),
        {"test balanced accuracy": (3 / 7, "≥ 3/7 (3 × chance)")},
    ),
    # Thresholded Jaccard 0.784, 0.722, 0.692: the worst clears 0.6 by 15 %.
    "ISIC U-Net": Short(
        _isic("2018_task1", 100),
        ("--data.image_size=64", "--trainer.max_epochs=5"),
        {"test thresholded Jaccard": (0.6, "≥ 0.6")},
    ),
    # CPM 0.597, 0.506, 0.700 (2026-12-02, with the task's gradient clipping at norm 10,
    # as Ultralytics' trainer): the worst clears 0.3 by 69 %. Unclipped, the same seeds
    # had scored 0.622, 0.396, 0.643 on 2026-12-01 but seed 42 fell to 0.042 a day later
    # in a fresh environment: the first large box-loss gradients threw it off. (At 60 scans
    # and 6 epochs, seed 1 scored 0: its 6 test scans held only 4-7 mm nodules.)
    "LUNA16 YOLO": Short(
        _luna,
        (
            "--data.patch_size=96",
            "--data.loader.batch_size=8",
            "--data.samples_per_epoch=480",
            "--trainer.max_epochs=8",
        ),
        {"test CPM": (0.3, "≥ 0.3")},
    ),
    # PSNR over the T2 baseline: 21.15 vs 19.08, 20.23 vs 18.86, 20.74 vs 19.32 dB; the
    # worst clears baseline + 1 dB by 37 % of that dB.
    "BraTS pix2pix": Short(
        _brats(2.5, (62, 96, 96)),
        ("--data.patch_size=64", "--data.samples_per_epoch=600", "--trainer.max_epochs=3"),
        {
            "test PSNR (dB)": (
                lambda o: o.metrics["test/baseline_psnr"] + 1.0,
                "> the T2-as-FLAIR baseline + 1 dB",
            ),
            # SSIM passes the baseline's later than PSNR (at 3 short epochs it is still
            # below): the full demo checks it (docs/quality.md).
            "test SSIM": (None, "checked on the full demo only"),
        },
    ),
    # 32 px images, 48 epochs. Fréchet distance end/start 0.139, 0.209, 0.119 (the worst
    # 58 % of the span below 0.5); diversity/real 0.617, 0.761, 0.587 (the worst 47 % past
    # 0.4). (60 epochs: 0.053, 0.068, 0.053 and 0.718, 0.745, 0.698; 32 epochs failed both
    # on seed 42, 0.634 and 0.258.)
    "ISIC GAN": Short(
        _isic("2018_task3", 200),
        (
            "--data.image_size=32",
            "--model.image_size=32",
            "--trainer.max_epochs=48",
        ),
        {
            "Fréchet distance, end / start": (0.5, "< 0.5"),
            "diversity, samples / real": (0.4, "> 0.4"),
        },
    ),
}


def short_run(demo: Demo, seed: int, tmp_path: Path) -> list[str]:
    """The shortened demo with ``seed``; its checks, printed and asserted."""
    root = tmp_path / "data"
    SHORT[demo.name].write(root, seed)
    uri = f"sqlite:///{tmp_path}/mlruns/mlflow.db"
    main(
        [
            str(demo.config),
            f"--data.root={root}",
            f"--seed_everything={seed}",
            f"--data.seed={seed}",
            "--data.loader.num_workers=0",
            f"--trainer.default_root_dir={tmp_path}",
            "--trainer.enable_progress_bar=false",
            f"--trainer.logger.init_args.tracking_uri={uri}",
            *SHORT[demo.name].overrides,
        ]
    )
    outcome = mlflow_outcome(uri, demo.experiment)
    checks = [c.check(outcome) for c in SHORT[demo.name].criteria(demo)]
    report = [f"{demo.name}, seed {seed}: {c}" for c in checks]
    print("\n".join(report))
    assert all(c.met for c in checks), report
    return report


@pytest.mark.slow
@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("demo", DEMOS, ids=[d.name for d in DEMOS])
def test_the_demo_learns(demo: Demo, seed: int, tmp_path: Path) -> None:
    short_run(demo, seed, tmp_path)


def test_every_demo_has_a_shortened_run_with_thresholds_that_prove_learning() -> None:
    demos = {p.stem for p in (Path(__file__).parents[1] / "experiments/demo").glob("*.yaml")}
    # luna16_fpr has no README target of its own; test_fit_luna16 trains it.
    assert demos - {d.config.stem for d in DEMOS} == {"luna16_fpr"}
    assert set(SHORT) == {d.name for d in DEMOS}
    for demo in DEMOS:
        names = {c.name for c in demo.criteria}
        assert set(SHORT[demo.name].thresholds) <= names, demo.name
        assert SHORT[demo.name].criteria(demo), demo.name  # something is checked
        for c in demo.criteria:
            threshold, _ = SHORT[demo.name].thresholds.get(c.name, (None, ""))
            if isinstance(threshold, float):
                baseline = c.baseline(None)  # a constant: no outcome needed
                # Past the trivial baseline, on the side of improvement.
                assert (threshold > baseline) if c.higher else (threshold < baseline), c.name
