"""``medlit.export``: ONNX and ``torch.export`` files of the trained networks (segmentation,
classification, the YOLO detector's head outputs, GAN generators), within 1e-4 of
PyTorch, with the metadata inference needs; ``medlit.predict --model FILE.onnx`` runs the
same pipeline on onnxruntime and writes the same segmentation and the same candidates."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import SimpleITK as sitk
import torch

from medlit.errors import ConfigError
from medlit.export import _onnx, _torch_export, exportable, main, read_metadata
from tests.helpers.shared import Trained
from tests.test_deploy import deploy


def test_a_segmentation_network_exports_and_predicts_the_same_on_onnxruntime(
    brats_unet, tmp_path: Path, tracking_uri: str
) -> None:
    from medlit.predict import main as predict
    from tests.test_fit import tiny

    args = tiny(brats_unet.root, tracking_uri)
    onnx_file = main([*args, f"--ckpt_path={brats_unet.ckpt}", f"--output={tmp_path / 'm.onnx'}"])
    meta = read_metadata(onnx_file)
    assert meta["kind"] == "segmentation" and meta["regions"] == ["WT", "TC", "ET"]
    assert meta["activation"] == "sigmoid" and meta["in_channels"] == 4
    assert meta["parity_max_abs_diff"] <= 1e-4 and "config" in meta
    from medlit.datasets.brats.phantom import write_brats

    # a case of 64-voxel slices: the exported network's smallest (the fixture's are 32)
    write_brats(tmp_path / "new", 1, year="2021", shape=(16, 64, 64), spacing=3.75, seed=2)
    case = next(p for p in sorted((tmp_path / "new").iterdir()) if p.name.startswith("BraTS"))
    common = [*args, f"--input={case}"]
    [torch_out] = predict([*common, f"--ckpt_path={brats_unet.ckpt}", f"--output={tmp_path / 'a'}"])
    [onnx_out] = predict([*common, f"--model={onnx_file}", f"--output={tmp_path / 'b'}"])
    a, b = (sitk.GetArrayFromImage(sitk.ReadImage(str(p))) for p in (torch_out, onnx_out))
    assert a.shape == b.shape and np.mean(a == b) >= 0.9999
    # torch.export: the program and the same metadata
    pt2 = main(
        [
            *args,
            f"--ckpt_path={brats_unet.ckpt}",
            "--format=torch-export",
            f"--output={tmp_path / 'm.pt2'}",
        ]
    )
    assert read_metadata(pt2)["parity_max_abs_diff"] <= 1e-4
    # a file exported for other regions is refused against this config
    with pytest.raises(ConfigError, match="exported for 4 input channels"):
        predict(
            [
                *common,
                f"--model={onnx_file}",
                f"--output={tmp_path / 'c'}",
                "--model.region_names=[A, B, C]",
            ]
        )


def test_3d_and_classification_networks_export_within_1e_4(tmp_path: Path) -> None:
    from medlit.tasks import ClassificationTask, Segmentation3DTask

    task3d = Segmentation3DTask(
        patch_size=[16, 16, 16],
        filters=[4, 8, 16],
        in_channels=2,
        num_classes=2,
        region_names=["A", "B"],
    ).eval()
    classifier = ClassificationTask(model="test_resnet", num_classes=3).eval()
    for task, name in ((task3d, "seg3d"), (classifier, "cls")):
        e = exportable(task, None)
        diff = _onnx(e, tmp_path / f"{name}.onnx")
        assert diff <= 1e-4, (name, diff)
        assert read_metadata(tmp_path / f"{name}.onnx")["kind"] in (
            "segmentation3d",
            "classification",
        )


def onnx_run(path: Path, inputs: dict[str, torch.Tensor]) -> np.ndarray:
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, {k: v.numpy() for k, v in inputs.items()})[0]


def test_a_yolo_detector_exports_its_head_outputs_within_1e_4(tmp_path: Path) -> None:
    """The decoded head output that medlit's NMS reads, for any batch and any multiple of
    the stride from 64: checked on the two inputs of the export and on a third shape
    against the task's own (untouched) network."""
    from medlit.tasks import DetectionTask

    torch.manual_seed(0)
    task = DetectionTask(
        model="yolov8n.yaml", in_channels=3, num_classes=2, conf_threshold=0.2, iou_threshold=0.6
    ).eval()
    e = exportable(task, None)
    assert [tuple(x.shape) for x in (*e.example, *e.other)] == [(2, 3, 64, 64), (3, 3, 96, 128)]
    diff = _onnx(e, tmp_path / "yolo.onnx")
    assert diff <= 1e-4, diff
    meta = read_metadata(tmp_path / "yolo.onnx")
    assert meta["kind"] == "detection" and meta["parity_max_abs_diff"] == diff
    assert meta["strides"] == [8, 16, 32] and (meta["multiple"], meta["min_size"]) == (32, 64)
    assert meta["in_channels"] == 3 and meta["context_slices"] == 1
    assert meta["classes"] == ["class_0", "class_1"] and meta["output"] == "detections"
    assert (meta["conf_threshold"], meta["iou_threshold"], meta["max_det"]) == (0.2, 0.6, 30)
    x = torch.randn(1, 3, 160, 64)
    with torch.no_grad():
        want = task.model(x)  # eval mode: (decoded output, raw maps), as detect_slices sees it
    assert isinstance(want, tuple) and want[0].shape == (1, 4 + 2, (20 * 8 + 10 * 4 + 5 * 2))
    got = onnx_run(tmp_path / "yolo.onnx", {"image": x})
    assert np.abs(got - want[0].numpy()).max() <= 1e-4
    assert _torch_export(e, tmp_path / "yolo.pt2") <= 1e-4
    assert read_metadata(tmp_path / "yolo.pt2")["kind"] == "detection"


def test_gan_generators_export_alone_within_1e_4(tmp_path: Path) -> None:
    """pix2pix: image -> image of any multiple of 2**depth; unconditional: noise (and
    classes) -> images in [-1, 1], any batch. What is exported is the weight average that
    evaluation and sampling use, not the raw generator."""
    from medlit.tasks import GANTask

    torch.manual_seed(0)
    small = {"base_channels": 8, "fd_model": "test_resnet"}
    paired = GANTask(in_channels=3, out_channels=1, depth=3, **small)
    noise = GANTask(mode="unconditional", latent_dim=16, image_size=16, out_channels=3, **small)
    classes = GANTask(mode="unconditional", latent_dim=16, image_size=16, num_classes=3, **small)
    for task in (paired, noise, classes):
        with torch.no_grad():  # the raw generator moves away from its average
            for w in task.generator.parameters():
                w.add_(0.1)
        task.eval()
    z = torch.randn(5, 16)
    cases = {
        "paired": (paired, {"image": torch.randn(5, 3, 48, 16)}),
        "noise": (noise, {"latent": z}),
        "classes": (classes, {"latent": z, "labels": torch.tensor([0, 1, 2, 2, 1])}),
    }
    for name, (task, inputs) in cases.items():
        e = exportable(task, None)
        diff = _onnx(e, tmp_path / f"{name}.onnx")
        assert diff <= 1e-4, (name, diff)
        assert _torch_export(e, tmp_path / f"{name}.pt2") <= 1e-4, name
        meta = read_metadata(tmp_path / f"{name}.onnx")
        assert meta["kind"] == "generator" and meta["inputs"] == list(inputs), name
        got = onnx_run(tmp_path / f"{name}.onnx", inputs)
        with torch.no_grad():
            want = task.sampler(*inputs.values()).numpy()
            raw = task.generator(*inputs.values()).numpy()
        assert got.shape == want.shape and np.abs(got - want).max() <= 1e-4, name
        assert np.abs(got - raw).max() > 1e-2, name
    meta = read_metadata(tmp_path / "paired.onnx")
    assert (meta["mode"], meta["in_channels"], meta["out_channels"]) == ("paired", 3, 1)
    assert (meta["multiple"], meta["min_size"], meta["activation"]) == (8, 16, "none")
    meta = read_metadata(tmp_path / "classes.onnx")
    assert (meta["latent_dim"], meta["num_classes"], meta["image_size"]) == (16, 3, 16)
    assert meta["activation"] == "tanh" and meta["value_range"] == [-1, 1]
    assert np.abs(onnx_run(tmp_path / "noise.onnx", {"latent": z})).max() <= 1


def calibrated(ckpt: Path, scans: list[Path], out: Path) -> Path:
    """The checkpoint with its BatchNorm statistics measured on slices of ``scans``
    (variances floored at 0.1). After one epoch (two steps at Ultralytics' BatchNorm
    momentum of 0.03) they are still the initial 0 and 1, under which YOLO's activations
    shrink about 3 times a layer: every score is then its stride's bias to within 1e-7,
    and which of tied boxes NMS keeps is no property of an export. Measured, the scores
    spread out (0.004 to 0.04 on these slices); the floor keeps them from saturating at
    1 and keeps float32 within 1e-4 of float64."""
    from medlit.tasks import DetectionTask

    checkpoint = torch.load(ckpt, map_location="cpu", weights_only=True)
    hparams = {k: v for k, v in checkpoint["hyper_parameters"].items() if not k.startswith("_")}
    task = DetectionTask(**hparams)
    task.load_state_dict(checkpoint["state_dict"])
    lo, hi = checkpoint["datamodule_hyper_parameters"]["hu_window"]
    hu = [sitk.GetArrayFromImage(sitk.ReadImage(str(p))).astype(np.float32) for p in scans]
    windowed = [torch.from_numpy(np.clip((v - lo) / (hi - lo), 0, 1)) for v in hu]
    slices = torch.cat([v[z : z + 3][None] for v in windowed for z in range(0, len(v) - 3, 4)])
    norms = [m for m in task.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # the plain mean over the batch
    with torch.no_grad():
        task.train().model(slices)
    for m in norms:
        m.running_var.clamp_(min=0.1)
    checkpoint["state_dict"] = task.state_dict()
    torch.save(checkpoint, out)
    return out


def noisy_copies(scans: list[Path], out: Path, seed: int = 0) -> Path:
    """The scans with N(0, 30 HU) noise: no two anchors see the same constant air."""
    rng = np.random.default_rng(seed)
    for mhd in scans:
        image = sitk.ReadImage(str(mhd))
        hu = sitk.GetArrayFromImage(image).astype(float) + rng.normal(0, 30, image.GetSize()[::-1])
        noisy = sitk.GetImageFromArray(hu.round().astype(np.int16))
        noisy.CopyInformation(image)
        (out / mhd.parent.name).mkdir(parents=True, exist_ok=True)
        sitk.WriteImage(noisy, str(out / mhd.parent.name / mhd.name))
    return out


@pytest.mark.slow
def test_a_detector_exported_to_onnx_predicts_the_same_candidates(
    luna16_yolo: Trained, tmp_path: Path, tracking_uri: str
) -> None:
    """``medlit.predict --model FILE.onnx``: the exported head outputs go through medlit's
    NMS, 3D merging and writer, and the submission is the checkpoint's."""
    from medlit.predict import main as predict
    from tests.test_fit_luna16 import tiny_detector

    config = tiny_detector(luna16_yolo.root, tracking_uri)
    originals = sorted(luna16_yolo.root.glob("subset[0-2]/*.mhd"))
    ckpt = calibrated(luna16_yolo.ckpt, originals, tmp_path / "calibrated.ckpt")
    onnx_file = main([*config, f"--ckpt_path={ckpt}", f"--output={tmp_path / 'yolo.onnx'}"])
    meta = read_metadata(onnx_file)
    assert meta["kind"] == "detection" and meta["classes"] == ["nodule"]
    # Boxes of up to ~500 pixels, where float32 steps by 3e-5: a few steps apart
    assert meta["parity_max_abs_diff"] <= 2e-4 and meta["image_size"] == 64
    assert meta["conf_threshold"] == 0.001 and meta["max_det"] == 20
    scans = noisy_copies(originals, tmp_path / "scans")
    common = [*config, f"--input={scans}", "--no_progress"]
    [a] = predict([*common, f"--ckpt_path={ckpt}", f"--output={tmp_path / 'a'}"])
    [b] = predict([*common, f"--model={onnx_file}", f"--output={tmp_path / 'b'}"])
    coords = ["coordX", "coordY", "coordZ"]  # world mm

    def marks(path: Path) -> pd.DataFrame:
        # by scan and place: candidates of equal probability may be listed in either order
        table = pd.read_csv(path)
        key = table[coords].round(2)
        return table.assign(**{f"k{c}": key[c] for c in coords}).sort_values(
            ["seriesuid", *(f"k{c}" for c in coords)], ignore_index=True
        )

    torch_marks, onnx_marks = marks(a), marks(b)
    assert torch_marks["seriesuid"].nunique() == 3 and len(torch_marks) >= 10
    assert list(onnx_marks["seriesuid"]) == list(torch_marks["seriesuid"])
    assert np.abs(onnx_marks[coords].to_numpy() - torch_marks[coords].to_numpy()).max() <= 1e-3
    assert np.abs(onnx_marks["probability"] - torch_marks["probability"]).max() <= 1e-5
    # Deployed (NumPy NMS and merging, no torch): the candidates of the same ONNX network.
    deploy(str(onnx_file), f"--input={scans}", f"--output={tmp_path / 'c'}")
    deployed = marks(tmp_path / "c" / "submission.csv")
    pd.testing.assert_frame_equal(deployed, onnx_marks)
    # A scan as a DICOM CT series: named by its SeriesInstanceUID, the same candidates.
    import pydicom

    from medlit.datasets.io.dicom import write_series

    scan = sorted(scans.rglob("*.mhd"))[0]
    files = write_series(sitk.ReadImage(str(scan)), tmp_path / "dicom", modality="CT")
    uid = str(pydicom.dcmread(files[0]).SeriesInstanceUID)
    deploy(str(onnx_file), f"--input={tmp_path / 'dicom'}", f"--output={tmp_path / 'd'}")
    from_dicom = marks(tmp_path / "d" / "submission.csv")
    same = deployed[deployed["seriesuid"] == scan.stem].reset_index(drop=True)
    assert set(from_dicom["seriesuid"]) == {uid} and len(from_dicom) == len(same) > 0
    assert np.abs(from_dicom[coords].to_numpy() - same[coords].to_numpy()).max() <= 1e-3
    assert np.abs(from_dicom["probability"] - same["probability"]).max() <= 1e-5


def test_numpy_nms_keeps_what_ultralytics_keeps() -> None:
    """``medlit.detections.yolo_nms`` (deployment's NMS) against Ultralytics' own on
    clustered boxes of two classes, with a confidence floor and a max_det cap at work."""
    from ultralytics.utils.nms import non_max_suppression

    from medlit.detections import yolo_nms

    rng = np.random.default_rng(0)
    centres = rng.uniform(20, 200, (3, 12, 2))
    anchors = centres[:, rng.integers(0, 12, 900)] + rng.normal(0, 4, (3, 900, 2))
    sizes = rng.uniform(8, 30, (3, 900, 2))
    scores = rng.uniform(0, 1, (3, 900, 2)) ** 3
    pred = np.concatenate([anchors, sizes, scores], -1).transpose(0, 2, 1).astype(np.float32)
    for conf, iou, max_det in ((0.01, 0.6, 300), (0.2, 0.45, 7)):
        want = non_max_suppression(torch.from_numpy(pred), conf, iou, max_det=max_det)
        got = yolo_nms(pred, conf, iou, max_det)
        for w, g in zip(want, got, strict=True):
            assert len(g) > 5
            np.testing.assert_array_equal(g, w.numpy())


def test_a_task_without_an_export_is_refused() -> None:
    from medlit.tasks.base import BaseTask

    class Bare(BaseTask):
        def configure_models(self) -> None:
            self.model = torch.nn.Identity()

    with pytest.raises(ConfigError, match="Bare is not exported"):
        exportable(Bare(), None)


def test_instance_norms_export_as_two_passes_within_float32(tmp_path: Path) -> None:
    """An instance norm on sparse, offset activations (what a trained network feeds it),
    exported through :func:`two_pass_norms`: onnxruntime's result is as close to float64
    as PyTorch's float32 (its own InstanceNormalization kernel was 8.6e-3 off here)."""
    import onnxruntime as ort

    from medlit.export import TwoPassInstanceNorm, two_pass_norms

    net = torch.nn.Sequential(torch.nn.InstanceNorm3d(8, affine=True)).eval()
    with torch.no_grad():
        net[0].weight.uniform_(0.5, 2.0)
        net[0].bias.uniform_(-1.0, 1.0)
    x = torch.relu(torch.randn(2, 8, 48, 64, 64, generator=torch.Generator().manual_seed(0)) - 2.5)
    x = x * 10 + 3
    exported = two_pass_norms(net)
    assert isinstance(exported[0], TwoPassInstanceNorm) and isinstance(
        net[0], torch.nn.InstanceNorm3d
    )
    torch.onnx.export(exported, (x,), tmp_path / "norm.onnx", dynamo=True, input_names=["x"])
    got = ort.InferenceSession(str(tmp_path / "norm.onnx")).run(None, {"x": x.numpy()})[0]
    with torch.no_grad():
        want = net.double()(x.double()).numpy()
        ours = net.float()(x).numpy()
    assert np.abs(got - want).max() <= max(4 * np.abs(ours - want).max(), 1e-5)
