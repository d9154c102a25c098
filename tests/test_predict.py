"""``python -m medlit.predict`` on new data, without the training data: BraTS NIfTI on the
input's exact grid (a non-identity direction included) and in the input release's label
values, ISIC submission CSV and masks, LUNA16 submission CSV; inputs that do not fit the
model are refused before anything runs, naming the file."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import SimpleITK as sitk
import torch
from PIL import Image

from medlit.datasets.io.volume import read_volume
from medlit.datasets.isic.source import CLASSES
from medlit.errors import ConfigError, InvalidCaseError
from medlit.export import main as export
from medlit.fit import main as fit
from medlit.predict import main as predict
from tests.data.brats.data import make_brats
from tests.data.isic.data import make_isic
from tests.helpers.shared import Trained
from tests.test_deploy import deploy
from tests.test_fit import REPO, cli_args, tiny, tiny_classifier
from tests.test_fit_luna16 import tiny_detector, tiny_fpr

MISSING = "--data.root=/nonexistent/training-data"  # prediction never reads the training root


def trained(tmp_path: Path, args: list[str]) -> Path:
    fit([*args, "--trainer.max_epochs=1"])
    [ckpt] = sorted(tmp_path.rglob("checkpoints/best-*.ckpt"))
    return ckpt


def with_direction(case: Path, out: Path) -> Path:
    """A copy of a BraTS case whose images have a permuted, flipped direction, an oblique
    origin and anisotropic spacing: the same voxels on another grid."""
    out.mkdir(parents=True)
    for f in case.glob("*.nii.gz"):
        if f.name.endswith("_seg.nii.gz"):
            continue
        image = sitk.ReadImage(str(f))
        image.SetDirection((0.0, 1.0, 0.0, -1.0, 0.0, 0.0, 0.0, 0.0, 1.0))
        image.SetOrigin((12.5, -30.25, 7.0))
        image.SetSpacing((0.9, 1.1, 2.5))
        sitk.WriteImage(image, str(out / f.name))
    return out


@pytest.mark.slow
def test_brats_predictions_keep_the_grid_and_match_the_test_stage(
    brats_unet: Trained,
    tracking_uri: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture,
) -> None:
    """The session's trained U-Net; its test stage wrote the held-out cases' labels."""
    tested, ckpt = brats_unet.folder / "predictions", brats_unet.ckpt
    base = tiny(brats_unet.root, tracking_uri)
    # New data: the test cases without their labels, one of them on a rotated grid. The
    # config names a training root that does not exist: prediction never reads it.
    cases = sorted(p.name.removesuffix(".nii.gz") for p in tested.glob("*.nii.gz"))
    new = tmp_path / "new"
    for case in cases:
        shutil.copytree(brats_unet.root / case, new / case, ignore=shutil.ignore_patterns("*_seg*"))
    rotated = with_direction(brats_unet.root / cases[0], tmp_path / "rotated" / cases[0])

    out = tmp_path / "out"
    config = [base[0], *base[1:], MISSING]
    # Predict writes nothing outside --output (it used to leave config.yaml and
    # versions.yaml in the working folder, over the user's own), and counts only its own
    # files (it counted by mtime: another writer's new file too).
    work = tmp_path / "work"
    work.mkdir()
    (work / "config.yaml").write_text("mine: true\n")
    out.mkdir()
    (out / "other.txt").write_text("another process's file")
    os.utime(out / "other.txt", (time.time() + 3600,) * 2)
    monkeypatch.chdir(work)
    written = predict(
        [*config, "--ckpt_path", str(ckpt), "--input", str(new), "--output", str(out)]
    )
    assert sorted(p.name for p in work.iterdir()) == ["config.yaml"]
    assert (work / "config.yaml").read_text() == "mine: true\n"
    assert f"wrote {len(cases)} files to {out}" in capsys.readouterr().out
    assert [p.name for p in written] == [f"{c}.nii.gz" for c in cases]
    for case in cases:
        pred, geom = read_volume(out / f"{case}.nii.gz")
        ref, ref_geom = read_volume(new / case / f"{case}_t1.nii.gz")
        assert pred.shape == ref.shape and geom == ref_geom
        assert set(np.unique(pred).tolist()) <= {0, 1, 2, 4}  # the 2021 label values
        # The same labels as the test stage wrote from the cache.
        np.testing.assert_array_equal(pred, read_volume(tested / f"{case}.nii.gz")[0])

    # One case folder, a non-identity direction, another batch size: same voxels, the
    # input's grid exactly.
    out2 = tmp_path / "out2"
    [path] = predict(
        [
            *config,
            "--ckpt_path",
            str(ckpt),
            "--input",
            str(rotated),
            "--output",
            str(out2),
            "--batch_size",
            "3",
            "--device",
            "cpu",
            "--no_progress",
        ]
    )
    image = sitk.ReadImage(str(path))
    source = sitk.ReadImage(str(rotated / f"{cases[0]}_flair.nii.gz"))
    assert image.GetSize() == source.GetSize()
    assert image.GetDirection() == source.GetDirection() != (1, 0, 0, 0, 1, 0, 0, 0, 1)
    assert image.GetOrigin() == source.GetOrigin()
    assert image.GetSpacing() == source.GetSpacing()
    np.testing.assert_array_equal(
        sitk.GetArrayFromImage(image), read_volume(out / f"{cases[0]}.nii.gz")[0]
    )

    # A 2023 release: its own file names, and ET written as 3.
    new23 = tmp_path / "brats2023"
    make_brats(new23, "2023", cases=2, seed=9, with_seg=False)
    out3 = tmp_path / "out3"
    written = predict(
        [*config, "--ckpt_path", str(ckpt), "--input", str(new23), "--output", str(out3)]
    )
    assert len(written) == 2 and all(p.name.startswith("BraTS-GLI-") for p in written)
    values = set().union(*(np.unique(read_volume(p)[0]).tolist() for p in written))
    assert values <= {0, 1, 2, 3} and 4 not in values

    # Inputs that do not fit: refused before anything is written, the file named.
    (new / cases[1] / f"{cases[1]}_flair.nii.gz").unlink()
    out4 = tmp_path / "out4"
    args = [*config, "--ckpt_path", str(ckpt), "--input", str(new), "--output", str(out4)]
    with pytest.raises(
        InvalidCaseError, match=rf"{cases[1]}_flair.nii.gz.*modality flair is missing"
    ):
        predict(args)
    assert not out4.exists()
    with pytest.raises(ConfigError, match="model.in_channels=4 but the data module yields 3"):
        predict([*args, "--data.modalities=[t1, t1ce, t2]"])
    with pytest.raises(ConfigError, match=rf"--ckpt_path {ckpt} does not fit the model"):
        predict([*args, "--model.encoder=tu-test_efficientnet"])
    bad = tmp_path / "bad.ckpt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(ConfigError, match="bad.ckpt: not a PyTorch checkpoint"):
        predict([*config, "--ckpt_path", str(bad), "--input", str(new), "--output", str(out4)])


@pytest.mark.slow
def test_isic_classifier_writes_the_release_submission_and_refuses_grey_images(
    tmp_path: Path, tracking_uri: str
) -> None:
    root = tmp_path / "isic"
    make_isic(root, "2019", lesions=24, seed=4)
    config = tiny_classifier(root, tracking_uri)
    ckpt = trained(tmp_path, config)
    images = tmp_path / "new"
    shutil.copytree(next(root.rglob("ISIC_2019_Training_Input")), images)
    shutil.rmtree(root)
    out = tmp_path / "out"
    args = [*config, MISSING, "--ckpt_path", str(ckpt), "--output", str(out)]
    [csv] = predict([*args, "--input", str(images), "--batch_size", "5"])
    table = pd.read_csv(csv)
    assert csv.name == "submission.csv"
    assert list(table.columns) == ["image", *CLASSES["2019"], "UNK"]
    assert sorted(table["image"]) == sorted(p.stem for p in images.glob("*.jpg"))
    assert np.allclose(table[list(CLASSES["2019"])].sum(axis=1), 1, atol=1e-5)
    # Exported, and deployed where torch cannot be imported: the same submission (the
    # release found from the model's classes, the training data being gone).
    model = export([*config, MISSING, f"--ckpt_path={ckpt}", f"--output={tmp_path / 'c.onnx'}"])
    deploy(str(model), f"--input={images}", f"--output={tmp_path / 'deployed'}", "--batch_size=7")
    deployed = pd.read_csv(tmp_path / "deployed" / "submission.csv").set_index("image")
    assert list(deployed.columns) == list(table.columns[1:])
    np.testing.assert_allclose(deployed.loc[table["image"]], table.set_index("image"), atol=1e-5)
    # One file; the same probabilities whatever the batch.
    one = sorted(images.glob("*.jpg"))[3]
    [csv1] = predict(
        [*args, "--input", str(one), "--output", str(tmp_path / "one"), "--uncertainty"]
    )
    row = pd.read_csv(csv1).set_index("image").loc[one.stem]
    np.testing.assert_allclose(row, table.set_index("image").loc[one.stem], atol=1e-5)
    # --uncertainty: the entropy (nats) of each image's probabilities, beside them
    entropy = pd.read_csv(tmp_path / "one" / "uncertainty.csv").set_index("image")["entropy"]
    p = row[list(CLASSES["2019"])].to_numpy(float)
    assert entropy[one.stem] == pytest.approx(-(p * np.log(p)).sum(), abs=1e-4)
    # A grey-scale image does not fit an RGB model.
    Image.open(one).convert("L").save(images / "ISIC_9999999.jpg")
    with pytest.raises(InvalidCaseError, match=r"ISIC_9999999.jpg.*L image with 1 channel"):
        predict([*args, "--input", str(images)])


@pytest.mark.slow
def test_isic_lesion_masks_come_at_each_image_size(tmp_path: Path, tracking_uri: str) -> None:
    root = tmp_path / "isic"
    make_isic(root, "2018_task1", lesions=12, seed=5)
    config = [
        str(REPO / "experiments/demo/isic_unet.yaml"),
        *cli_args(root, tracking_uri),
        "--data.image_size=32",
        "--data.loader.batch_size=4",
        "--model.encoder=tu-test_resnet",
        "--model.model_kwargs={decoder_channels: [32, 16, 16, 8, 8]}",
    ]
    ckpt = trained(tmp_path, config)
    images = next(root.rglob("ISIC2018_Task1-2_Training_Input"))
    odd = images / "ISIC_0099999.jpg"
    Image.open(next(images.glob("*.jpg"))).resize((45, 37)).save(odd)  # another size
    out = tmp_path / "out"
    written = predict(
        [*config, "--ckpt_path", str(ckpt), "--input", str(images), "--output", str(out)]
    )
    assert [p.name for p in written] == sorted(
        f"{p.stem}_segmentation.png" for p in images.glob("*.jpg")
    )
    for mask in written:
        source = images / mask.name.replace("_segmentation.png", ".jpg")
        with Image.open(mask) as m, Image.open(source) as s:
            assert m.mode == "L" and m.size == s.size
            assert set(np.unique(np.asarray(m)).tolist()) <= {0, 255}


@pytest.mark.slow
def test_luna16_detector_writes_the_submission_in_world_coordinates(
    luna16_yolo: Trained, tmp_path: Path, tracking_uri: str
) -> None:
    """The session's trained detector, on copies of three of its scans."""
    config, ckpt = tiny_detector(luna16_yolo.root, tracking_uri), luna16_yolo.ckpt
    scans = tmp_path / "scans"
    for mhd in sorted(luna16_yolo.root.glob("subset[0-2]/*.mhd")):
        (scans / mhd.parent.name).mkdir(parents=True, exist_ok=True)
        for f in (mhd, mhd.with_suffix(".raw")):
            shutil.copy(f, scans / mhd.parent.name / f.name)
    out = tmp_path / "out"
    args = [*config, MISSING, "--ckpt_path", str(ckpt), "--output", str(out)]
    [csv] = predict([*args, "--input", str(scans)])
    table = pd.read_csv(csv)
    assert list(table.columns) == ["seriesuid", "coordX", "coordY", "coordZ", "probability"]
    uids = sorted(p.stem for p in scans.rglob("*.mhd"))
    assert set(table["seriesuid"]) <= set(uids) and len(table)
    assert table.groupby("seriesuid").size().max() <= 100
    # Every mark lies inside its scan, in world mm.
    for uid, marks in table.groupby("seriesuid"):
        image = sitk.ReadImage(str(next(scans.rglob(f"{uid}.mhd"))))
        for x, y, z in marks[["coordX", "coordY", "coordZ"]].to_numpy():
            index = image.TransformPhysicalPointToContinuousIndex((x, y, z))
            assert all(-0.5 <= i <= s - 0.5 for i, s in zip(index, image.GetSize(), strict=True))
    # An ensemble of the model with itself: every candidate clusters with its twin, so
    # the submission is the model's own
    twice = [*args, "--ckpt_path", str(ckpt)]
    [csv2] = predict([*twice, "--output", str(tmp_path / "twice"), "--input", str(scans)])
    pd.testing.assert_frame_equal(pd.read_csv(csv2), table)
    # With a false-positive-reduction classifier: the scans' own HU arrays (not the data
    # module's, which never reads its root here) give the classifier's patches, and the
    # same candidates are re-scored.
    fit(tiny_fpr(luna16_yolo.root, tracking_uri))
    [fpr] = sorted(
        Path(tracking_uri.removeprefix("sqlite:///")).parent.rglob("checkpoints/best-*.ckpt")
    )
    extra = [f"--model.fpr_checkpoint={fpr}", "--data.candidate_size=16", "--no_progress"]
    [csv] = predict([*args, *extra, "--output", str(tmp_path / "fpr"), "--input", str(scans)])
    reranked = pd.read_csv(csv)
    key = ["seriesuid", "coordX", "coordY", "coordZ"]
    both = table.merge(reranked, on=key, suffixes=("_det", "_fpr"))
    assert len(both) > 0 and set(reranked["seriesuid"]) <= set(uids)
    assert not np.allclose(both["probability_det"], both["probability_fpr"])
    # A header that is not single-channel 3D is refused, naming the file.
    mhd = next(scans.rglob("*.mhd"))
    mhd.write_text(mhd.read_text().replace("NDims = 3", "NDims = 4"))
    with pytest.raises(InvalidCaseError, match=rf"{mhd.name}.*NDims 4"):
        predict([*args, "--input", str(scans)])


def test_predict_command_refuses_a_gan_and_a_missing_checkpoint(tmp_path: Path) -> None:
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "medlit.predict",
            str(REPO / "experiments/demo/isic_gan.yaml"),
            "--ckpt_path",
            str(tmp_path / "none.ckpt"),
            "--input",
            str(tmp_path),
            "--output",
            str(tmp_path / "out"),
        ],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=300,
    )
    assert proc.returncode == 2
    assert (
        f"medlit: error: --ckpt_path {tmp_path}/none.ckpt: no such checkpoint file" in proc.stderr
    )
    assert "Traceback" not in proc.stderr


def test_a_gan_config_is_sent_to_medlit_generate(tmp_path: Path) -> None:
    ckpt = tmp_path / "gan.ckpt"
    torch.save({"state_dict": {}}, ckpt)
    args = [str(REPO / "experiments/demo/isic_gan.yaml"), "--ckpt_path", str(ckpt)]
    with pytest.raises(ConfigError, match="python -m medlit.generate, not predict"):
        predict([*args, "--input", str(tmp_path), "--output", str(tmp_path / "out")])
    assert not (tmp_path / "out").exists()
