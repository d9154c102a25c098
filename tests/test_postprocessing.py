"""Postprocessing chosen on out-of-fold segmentations (``medlit.postprocessing``):
nnU-Net's keep-largest-component steps and medlit's minimum volume, each kept only when
the mean metric improves and no region gets worse, and applied as chosen."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from medlit.errors import ConfigError
from medlit.postprocessing import Case, Postprocessing, choose, load_cases, save_case

NAMES = ["WT", "TC", "ET"]
SHAPE = (8, 24, 24)


def _regions() -> np.ndarray:
    """WT, TC and ET boxes, nested, as (3, Z, Y, X)."""
    r = np.zeros((3, *SHAPE), bool)
    r[0, 1:7, 2:14, 2:14] = True
    r[1, 2:6, 3:10, 3:10] = True
    r[2, 2:5, 4:8, 4:8] = True
    return r


def _cases() -> list[Case]:
    """A: ET found, with a false-positive ET voxel inside the tumour and a WT speck far
    outside it. B: no ET, and a lone false-positive ET voxel inside the tumour."""
    ref_a = _regions()
    pred_a = ref_a.copy()
    pred_a[2, 5, 12, 12] = True  # ET speck, apart from the ET box
    pred_a[0, 7, 20, 20] = True  # WT speck, apart from the tumour
    ref_b = _regions()
    ref_b[2] = False
    pred_b = ref_b.copy()
    pred_b[2, 3, 11, 11] = True  # the one ET "component" of the case
    return [Case("A", pred_a, ref_a, (1.0, 1.0, 1.0)), Case("B", pred_b, ref_b, (1.0, 1.0, 1.0))]


def test_each_step_that_helps_is_kept_and_the_lone_speck_goes_by_its_volume() -> None:
    cases = _cases()
    chosen, table = choose(cases, NAMES)
    assert chosen.keep_largest_foreground  # the WT speck
    assert chosen.keep_largest == ("ET",)  # A's ET speck
    # B's lone ET voxel: only a minimum volume removes it; A's 48-voxel ET stays
    assert chosen.min_volume_mm3 == {"ET": pytest.approx(2.0)}
    assert table.attrs["end"] == pytest.approx([1.0, 1.0, 1.0])
    assert table.attrs["start"][2] < 0.5  # ET Dice before: A's ~0.99, B's 0
    assert list(table["kept"]) == [True, False, False, False, False, True, True]
    for case in cases:  # applied as chosen, every region is the reference
        assert np.array_equal(chosen.apply(case.pred, case.spacing), case.ref)
    # the same volume on a grid of other voxels: the same physical size
    fine = chosen.apply(np.repeat(cases[1].pred, 2, axis=1), (0.5, 1.0, 1.0))
    assert not fine[2].any()  # 2 voxels of 0.5 mm³ = 1 mm³ < 2 mm³


def test_a_step_is_refused_when_one_region_gets_worse_even_if_the_mean_improves() -> None:
    ref = _regions()
    ref[2, 6, 18:20, 18:22] = True  # a second ET component, far from the tumour
    pred = ref.copy()
    pred[0, 0:4, 17:24, 17:24] = True  # a false WT blob there too, smaller than the tumour
    ref[0, 0:4, 17:24, 17:24] = False
    chosen, table = choose([Case("A", pred, ref, (1.0, 1.0, 1.0))], NAMES)
    fg = table.iloc[0]
    assert fg["step"] == "keep_largest" and fg["region"] == "all foreground"
    assert fg["dice_mean_after"] > fg["dice_mean_before"]
    assert fg["dice_WT_after"] > fg["dice_WT_before"] and fg["dice_ET_after"] < 1
    assert not fg["kept"] and not chosen.keep_largest_foreground
    assert "ET" not in chosen.keep_largest  # keeping the largest ET would lose the other


def test_the_choice_is_read_back_and_refuses_other_regions(tmp_path: Path) -> None:
    chosen, _ = choose(_cases(), NAMES, metric="jaccard")
    path = tmp_path / "postprocessing.json"
    path.write_text(chosen.to_json())
    again = Postprocessing.read(path)
    assert again == chosen
    assert "ET components < 2 mm³ removed" in again.describe()
    with pytest.raises(ConfigError, match="chosen for the regions"):
        again.apply(np.zeros((2, 4, 4, 4), bool), (1, 1, 1))
    path.write_text("{}")
    with pytest.raises(ConfigError, match="not a medlit postprocessing file"):
        Postprocessing.read(path)
    with pytest.raises(ConfigError, match="postprocessing metric"):
        choose(_cases(), NAMES, metric="hd95")


def test_out_of_fold_cases_are_kept_whole_and_read_back(tmp_path: Path) -> None:
    for c in _cases():
        save_case(tmp_path / "fold0", c.case_id, c.pred, c.ref, c.spacing, NAMES)
    (tmp_path / "fold0" / ".C.tmp.npz").write_bytes(b"half")  # an interrupted write
    cases, names = load_cases([tmp_path / "fold0"])
    assert names == NAMES and [c.case_id for c in cases] == ["A", "B"]
    assert np.array_equal(cases[0].pred, _cases()[0].pred)


def test_a_segmentation_task_postprocesses_what_it_predicts() -> None:
    import torch

    from medlit.tasks import SegmentationTask

    task = SegmentationTask(
        encoder="tu-test_resnet",
        num_classes=3,
        region_names=NAMES,
        threshold=0.0,  # every voxel in every region before postprocessing
        model_kwargs={"decoder_channels": [32, 16, 16, 8, 8]},
    ).eval()
    batch = {"case_id": ["x"], "image": torch.randn(1, 4, 3, 32, 32)}
    assert task.predict_step(batch, 0)[0]["regions"].all()
    # WT's one component is 3 × 32 × 32 voxels of 1 mm³: a 4000 mm³ minimum removes it
    task.postprocessing = Postprocessing(tuple(NAMES), min_volume_mm3={"WT": 4000.0})
    regions = task.predict_step(batch, 0)[0]["regions"]
    assert not regions[0].any() and regions[1:].all()


def test_the_lesion_wise_dice_can_choose_it() -> None:
    """BraTS 2023's lesion-wise Dice counts a false-positive component as a lesion of
    Dice 0: the ET speck inside the tumour (A) and the lone one of a case without ET (B)
    are what keeping the largest ET component and a minimum ET volume remove."""
    shape = (16, 40, 40)
    ref = np.zeros((3, *shape), bool)
    ref[0, 1:15, 2:38, 2:38] = True
    ref[1, 2:14, 4:30, 4:30] = True
    ref[2, 3:8, 5:10, 5:10] = True  # 125 mm³: above the 50 mm³ of a counted lesion
    a = ref.copy()
    a[2, 12, 25, 25] = True
    ref_b = ref.copy()
    ref_b[2] = False
    b = ref_b.copy()
    b[2, 8, 20, 20] = True
    cases = [Case("A", a, ref, (1.0, 1.0, 1.0)), Case("B", b, ref_b, (1.0, 1.0, 1.0))]
    chosen, table = choose(cases, NAMES, metric="lesion_dice")
    assert not chosen.keep_largest_foreground  # the specks lie inside the tumour
    assert chosen.keep_largest == ("ET",)
    assert set(chosen.min_volume_mm3) == {"ET"}
    assert table.attrs["start"] == pytest.approx([1, 1, 0.25])  # ET: (1/2 + 0) / 2
    assert table.attrs["end"] == pytest.approx([1, 1, 1])
    assert "lesion_dice_ET_after" in table
