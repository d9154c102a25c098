"""Seg-Grad-CAM of a segmentation region (``medlit.explain``): on networks whose answer is
known it lights exactly the evidence, in 2D and through the 3D sliding window; a trained
BraTS U-Net writes its maps beside its predictions and shows them in its overlays."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from medlit.errors import ConfigError
from medlit.explain import seg_grad_cam


class Toy(torch.nn.Module):
    """Features = the input; a 1×1 head whose region 0 reads channel 0 only."""

    def __init__(self, conv: type[torch.nn.Module], channels: int = 2, regions: int = 2) -> None:
        super().__init__()
        self.segmentation_head = conv(channels, regions, 1)
        with torch.no_grad():
            self.segmentation_head.weight.zero_()
            self.segmentation_head.bias.fill_(-0.5)
            self.segmentation_head.weight[0, 0] = 1.0
            self.segmentation_head.weight[1, 1] = 1.0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.segmentation_head(x)


def test_the_map_is_the_evidence_the_region_s_head_reads() -> None:
    x = torch.zeros(1, 2, 24, 24)
    x[0, 0, 4:10, 4:10] = 1.0  # region 0's evidence
    x[0, 1, 14:20, 14:20] = 1.0  # region 1's
    cam = seg_grad_cam(Toy(torch.nn.Conv2d), x, 0, sigmoid=True)[0, 0]
    assert cam[4:10, 4:10].min() > 0
    outside = cam.clone()
    outside[4:10, 4:10] = 0
    assert outside.abs().max() == 0  # nothing of region 1's square
    other = seg_grad_cam(Toy(torch.nn.Conv2d), x, 1, sigmoid=True)[0, 0]
    assert other[14:20, 14:20].min() > 0 and other[4:10, 4:10].abs().max() == 0


def test_a_3d_network_is_explained_window_by_window() -> None:
    from medlit.tasks import Segmentation3DTask

    task = Segmentation3DTask(
        patch_size=[16, 16, 16],
        filters=[4, 8, 16],
        in_channels=2,
        num_classes=2,
        region_names=["A", "B"],
        overlap=0.5,
    ).eval()
    task.model = Toy(torch.nn.Conv3d)
    task.model.output_block = task.model.segmentation_head  # MONAI's name for the head
    volume = torch.zeros(2, 24, 30, 28)  # larger than one window
    volume[0, 3:9, 20:27, 2:8] = 1.0
    task.explain_region = "A"
    cam = task.explain_volume(volume).numpy()
    assert cam.shape == (24, 30, 28) and cam.max() == pytest.approx(1.0)
    inside = np.zeros(cam.shape, bool)
    inside[3:9, 20:27, 2:8] = True
    assert cam[inside].min() > 0 and np.abs(cam[~inside]).max() < 1e-6
    with pytest.raises(ConfigError, match=r"explain 'ET': the model's regions are \['A', 'B'\]"):
        task.explain_region = "ET"


def test_predict_writes_the_maps_on_the_input_grid_and_the_overlays_show_them(
    brats_unet, tmp_path: Path, tracking_uri: str
) -> None:
    import mlflow

    from medlit.evaluate import main as evaluate
    from medlit.predict import main as predict
    from tests.test_fit import tiny

    case = next(p for p in sorted(brats_unet.root.iterdir()) if p.name.startswith("BraTS"))
    args = [*tiny(brats_unet.root, tracking_uri), f"--ckpt_path={brats_unet.ckpt}"]
    written = predict([*args, f"--input={case}", f"--output={tmp_path}", "--explain=ET"])
    assert [p.name for p in written] == [f"{case.name}.nii.gz", f"{case.name}_explain_ET.nii.gz"]
    flair = sitk.ReadImage(str(next(case.glob("*flair.nii.gz"))))
    cam = sitk.ReadImage(str(written[1]))
    assert cam.GetSize() == flair.GetSize() and cam.GetSpacing() == flair.GetSpacing()
    values = sitk.GetArrayFromImage(cam)
    assert values.min() >= 0 and values.max() <= 1 + 1e-6
    with pytest.raises(ConfigError, match="explain 'NCR'"):
        predict([*args, f"--input={case}", f"--output={tmp_path / 'x'}", "--explain=NCR"])
    evaluate([*args, "--split=test", "--model.explain=ET"])
    client = mlflow.MlflowClient(tracking_uri)
    [run] = client.search_runs([client.get_experiment_by_name("test").experiment_id])
    assert "test_slices.png" in {a.path for a in client.list_artifacts(run.info.run_id)}
