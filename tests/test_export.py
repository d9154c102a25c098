"""``medlit.export``: ONNX and ``torch.export`` files of the trained networks, within 1e-4
of PyTorch, with the metadata inference needs; ``medlit.predict --model FILE.onnx`` runs
the same pipeline on onnxruntime and writes the same segmentation."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from medlit.errors import ConfigError
from medlit.export import _onnx, exportable, main, read_metadata


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


def test_a_task_without_an_export_is_refused() -> None:
    from medlit.tasks import GANTask

    with pytest.raises(ConfigError, match="GANTask is not exported yet"):
        exportable(GANTask(base_channels=8, depth=2), None)
