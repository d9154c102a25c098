"""``medlit.fit`` and ``medlit.generate`` with GANTask: paired BraTS modality synthesis and
unconditional / class-conditional ISIC lesion synthesis, on tiny generated data."""

from __future__ import annotations

from pathlib import Path

import mlflow
import numpy as np
import SimpleITK as sitk

from medlit.datasets.isic.source import read_records
from medlit.fit import main
from medlit.generate import main as generate
from tests.data.isic.data import make_isic
from tests.test_fit import REPO, _artifacts, _runs, cli_args

PIX2PIX = str(REPO / "experiments/demo/brats_pix2pix.yaml")
ISIC_GAN = str(REPO / "experiments/demo/isic_gan.yaml")


def common(root: Path, tracking_uri: str) -> list[str]:
    return cli_args(
        root,
        tracking_uri,
        "--data.loader.batch_size=4",
        "--data.split.val_fraction=0.25",
        "--data.split.test_fraction=0.25",
        "--model.base_channels=8",
        "--trainer.max_epochs=1",
    )


def best_checkpoint(tracking_uri: str) -> str:
    run = max(_runs(tracking_uri), key=lambda r: r.info.start_time)
    [name] = [f for f in _artifacts(tracking_uri, run.info.run_id) if f.endswith(".ckpt")]
    return mlflow.MlflowClient(tracking_uri).download_artifacts(run.info.run_id, name)


def test_pix2pix_scores_cases_against_the_baseline_and_writes_volumes_with_geometry(
    brats_root: Path, tracking_uri: str, tmp_path: Path
) -> None:
    args = [
        PIX2PIX,
        *common(brats_root, tracking_uri),
        "--data.patch_size=32",
        "--model.depth=3",
        "--data.samples_per_epoch=8",
    ]
    metrics = main(args)
    for m in ("psnr", "ssim", "mae"):
        assert f"test/{m}" in metrics and f"test/baseline_{m}" in metrics
    assert -1 <= metrics["test/ssim"] <= 1 and metrics["test/mae"] >= 0
    [run] = _runs(tracking_uri)
    assert {"train/d_loss_epoch", "train/l1", "val/psnr"} <= set(run.data.metrics)
    assert {"test_slices.png", "test_per_case.csv"} <= set(
        _artifacts(tracking_uri, run.info.run_id)
    )

    written = generate(
        [
            *args[:1],
            "--ckpt_path",
            best_checkpoint(tracking_uri),
            "--output",
            str(tmp_path / "out"),
            *args[1:],
        ]
    )
    assert len(written) == 8  # every case of the root
    for path in written:
        case = path.parent.name
        assert path.name == f"{case}_flair-synth.nii.gz"
        source = sitk.ReadImage(str(brats_root / case / f"{case}_flair.nii.gz"))
        synth = sitk.ReadImage(str(path))
        assert synth.GetSize() == source.GetSize()
        assert (
            synth.GetOrigin() == source.GetOrigin()
            and synth.GetDirection() == source.GetDirection()
        )
        assert np.allclose(synth.GetSpacing(), source.GetSpacing())
        array = sitk.GetArrayFromImage(synth)
        assert np.isfinite(array).all() and array.std() > 0


def test_l1_only_ablation_trains_without_a_discriminator(
    brats_root: Path, tracking_uri: str
) -> None:
    main(
        [
            PIX2PIX,
            *common(brats_root, tracking_uri),
            "--data.patch_size=32",
            "--model.depth=3",
            "--model.adversarial_weight=0",
        ]
    )
    [run] = _runs(tracking_uri)
    assert "train/l1" in run.data.metrics and "train/d_loss_epoch" not in run.data.metrics


def test_conditional_gan_logs_samples_and_generates_an_isic_release(
    tmp_path: Path, tracking_uri: str
) -> None:
    root = tmp_path / "isic"
    make_isic(root, "2018_task3", lesions=24, seed=4)
    args = [
        ISIC_GAN,
        *common(root, tracking_uri),
        "--data.image_size=32",
        "--model.image_size=32",
        "--model.num_classes=7",
        "--model.fd_model=resnet10t",
        "--model.fd_samples=16",
        "--model.num_samples=16",
        "--model.d_steps=2",
        "--model.r1_gamma=1.0",
        "--trainer.check_val_every_n_epoch=1",  # the demo validates every 4th epoch
    ]
    metrics = main(args)
    name = next(k for k in metrics if k.startswith("test/fd_"))
    assert name == "test/fd_resnet10t_random" and metrics[name] >= 0
    assert metrics["test/diversity"] > 0 and metrics["test/diversity_real"] > 0
    [run] = _runs(tracking_uri)
    files = set(_artifacts(tracking_uri, run.info.run_id))
    assert {"samples/epoch_000.png", "test_samples.png"} <= files
    out = tmp_path / "generated"
    written = generate(
        [
            ISIC_GAN,
            "--ckpt_path",
            best_checkpoint(tracking_uri),
            "--output",
            str(out),
            "--num_images",
            "14",
            *args[1:],
        ]
    )
    assert len(written) == 14
    records = read_records(out)  # readable as a release: mixable into a training set
    assert records.year == "2018_task3" and len(records.images) == 14
    assert sorted(records.labels.values()) == sorted(list(range(7)) * 2)
