"""Ensembles of checkpoints (``medlit.ensemble``): the members' probabilities averaged by
every segmentation (2.5D, 3D with mirroring) and classification path, and the members
that cannot be averaged refused, naming the checkpoint."""

from __future__ import annotations

import copy
from pathlib import Path

import pandas as pd
import pytest
import torch

from medlit.constraints import plain
from medlit.datamodules import BraTSDataModule
from medlit.ensemble import checkpoint_paths, load_members
from medlit.errors import ConfigError
from medlit.tasks import ClassificationTask, GANTask, Segmentation3DTask, SegmentationTask


def _other(task: torch.nn.Module, seed: int) -> torch.nn.Module:
    """A copy of ``task`` with other weights."""
    other = copy.deepcopy(task)
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in other.parameters():
            p.add_(torch.randn_like(p) * 0.5)
    return other.eval()


def _seg() -> SegmentationTask:
    return SegmentationTask(
        encoder="tu-test_resnet",
        in_channels=4,
        num_classes=3,
        region_names=["WT", "TC", "ET"],
        model_kwargs={"decoder_channels": [32, 16, 16, 8, 8]},
    ).eval()


def test_a_segmentation_ensemble_averages_each_member_s_whole_case_probabilities() -> None:
    lead = _seg()
    members = [lead, _other(lead, 1), _other(lead, 2)]
    volume = torch.randn(4, 3, 40, 24)
    alone = [m.volume_probabilities(volume) for m in members]
    assert lead.predict_volume(volume).equal(alone[0])  # no ensemble: the model itself
    lead.set_ensemble(members)
    mean = lead.predict_volume(volume)
    assert torch.allclose(mean, sum(alone) / 3, atol=1e-6)
    assert all((mean - a).abs().max() > 1e-3 for a in alone)  # not one member's output


def test_a_3d_ensemble_mirrors_every_member_in_test_and_none_in_validation() -> None:
    """Each member sees the lead's trainer: its stage decides the mirroring, for all."""
    from pytorch_lightning import Trainer
    from pytorch_lightning.trainer.states import TrainerFn

    lead = Segmentation3DTask(
        patch_size=[16, 16, 16],
        filters=[4, 8, 16],
        in_channels=1,
        num_classes=1,
        region_names=["A"],
        tta="mirror",
    ).eval()
    other = _other(lead, 3)
    lead.set_ensemble([lead, other])
    calls: list[int] = []
    for i, m in enumerate((lead, other)):
        m.model.register_forward_hook(lambda *_, i=i: calls.append(i))
    trainer = Trainer(logger=False, enable_checkpointing=False, enable_progress_bar=False)
    lead.trainer = trainer
    volume = torch.randn(1, 16, 16, 16)
    passes = {}
    for fn in (TrainerFn.VALIDATING, TrainerFn.TESTING):
        trainer.state.fn = fn
        calls.clear()
        out = lead.predict_volume(volume)
        passes[fn] = (calls.count(0), calls.count(1))
    assert passes == {TrainerFn.VALIDATING: (1, 1), TrainerFn.TESTING: (8, 8)}
    expected = (lead.volume_probabilities(volume) + other.volume_probabilities(volume)) / 2
    assert torch.allclose(out, expected, atol=1e-6)


def test_a_classification_ensemble_averages_the_softmax_not_the_logits() -> None:
    lead = ClassificationTask(model="test_resnet", num_classes=3).eval()
    other = _other(lead, 4)
    images = torch.randn(5, 3, 32, 32)
    soft = [m(images).softmax(1) for m in (lead, other)]
    lead.set_ensemble([lead, other])
    assert torch.allclose(lead.probabilities(images), (soft[0] + soft[1]) / 2, atol=1e-6)


def test_a_task_that_cannot_ensemble_refuses_several_checkpoints() -> None:
    gan = GANTask(base_channels=8, depth=2)
    with pytest.raises(ConfigError, match="GANTask does not ensemble several checkpoints"):
        gan.set_ensemble([gan, copy.deepcopy(gan)])


def _save(task: torch.nn.Module, path: Path, **extra: object) -> Path:
    hparams = plain(dict(task.hparams))
    torch.save({"state_dict": task.state_dict(), "hyper_parameters": hparams, **extra}, path)
    return path


def test_members_that_predict_other_outputs_or_saw_other_data_are_refused(tmp_path: Path) -> None:
    lead, dm = _seg(), BraTSDataModule(root=str(tmp_path))
    a = _save(lead, tmp_path / "a.ckpt")
    other = _seg()
    other.hparams["region_names"] = ["WT", "TC", "NCR"]
    b = _save(other, tmp_path / "b.ckpt")
    with pytest.raises(ConfigError, match=r"b\.ckpt: its region_names is .*NCR.* must predict"):
        load_members(lead, dm, [a, b], "x.yaml")
    c = _save(_other(lead, 5), tmp_path / "c.ckpt", BraTSDataModule={"fingerprint": 2})
    with pytest.raises(ConfigError, match=r"c\.ckpt was trained on data preprocessed otherwise"):
        load_members(_seg(), dm, [a, c], "x.yaml")
    d = _save(_other(lead, 6), tmp_path / "d.ckpt")
    fresh = _seg()
    load_members(fresh, dm, [a, d], "x.yaml")
    assert len(fresh.members) == 2 and fresh.members[0] is fresh
    assert fresh.state_dict().keys() == lead.state_dict().keys()  # members not submodules
    want = _other(lead, 6).state_dict()
    assert all(torch.equal(v, want[k]) for k, v in fresh.members[1].state_dict().items())
    assert all(torch.equal(v, lead.state_dict()[k]) for k, v in fresh.state_dict().items())


def test_the_checkpoints_are_named_once(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="give --ckpt_path .* or --cv_run"):
        checkpoint_paths(["a.ckpt"], "0123", [])
    with pytest.raises(ConfigError, match="give --ckpt_path .* or --cv_run"):
        checkpoint_paths(None, None, [])


def test_uncertainty_is_the_entropy_of_the_mean_or_the_members_variance() -> None:
    from medlit.tasks.base import uncertainty_map

    uniform = torch.full((4, 2, 3), 0.25)  # 4 classes, every voxel undecided
    assert torch.allclose(
        uncertainty_map(uniform, None, "entropy", False), torch.log(torch.tensor(4.0))
    )
    halves = torch.full((3, 5), 0.5)  # 3 independent regions at 0.5
    assert torch.allclose(
        uncertainty_map(halves, None, "entropy", True), 3 * torch.log(torch.tensor(2.0))
    )
    sure = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    assert torch.allclose(uncertainty_map(sure, None, "entropy", False), torch.zeros(2), atol=1e-9)
    lead = _seg()
    members = [lead, _other(lead, 7), _other(lead, 8)]
    lead.set_ensemble(members)
    volume = torch.randn(4, 2, 32, 32)
    mean, var = lead.ensemble_moments(lambda m: m.volume_probabilities(volume), variance=True)
    each = torch.stack([m.volume_probabilities(volume) for m in members])
    assert torch.allclose(mean, each.mean(0), atol=1e-6)
    assert torch.allclose(var, each.var(0, unbiased=False), atol=1e-6)
    umap = uncertainty_map(mean, var, "variance", True)
    assert umap.shape == (2, 32, 32) and torch.allclose(umap, var.mean(0))


def test_detection_candidates_of_the_folds_cluster_within_a_nodule_s_radius() -> None:
    from medlit.tasks.detection import ensemble_candidates

    def marks(*rows: tuple[float, float, float, float, float]) -> pd.DataFrame:
        cols = ["coordX", "coordY", "coordZ", "probability", "diameter_mm"]
        return pd.DataFrame(rows, columns=cols).assign(seriesuid="s")

    a = marks((0, 0, 0, 0.9, 10), (50, 0, 0, 0.6, 6), (3, 0, 0, 0.5, 4))
    b = marks((2, 1, 0, 0.7, 8), (100, 0, 0, 0.4, 6))
    c = marks((1, 0, 1, 0.8, 10))
    out = ensemble_candidates([a, b, c])
    # the nodule at 0: one candidate of each model (a's second one nearby stays apart)
    assert out.iloc[0][["coordX", "probability"]].tolist() == pytest.approx(
        [0, (0.9 + 0.7 + 0.8) / 3]
    )
    # a model without a candidate there counts 0
    assert sorted(out["probability"].round(4))[:3] == pytest.approx(
        sorted([round(0.6 / 3, 4), round(0.5 / 3, 4), round(0.4 / 3, 4)])
    )
    assert len(out) == 4 and out["probability"].is_monotonic_decreasing
    assert ensemble_candidates([marks(), marks()]).empty
