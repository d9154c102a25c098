"""The 3D path's parts, against exact expectations and nnU-Net v2 itself: sliding-window
stitching, nnU-Net's Gaussian map, mirroring TTA, U-Net planning, deep-supervision weights,
and 3D patches that read only their patch from the memory-mapped cache."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from medlit.datasets.io.cache import CacheEntry
from medlit.datasets.patches import (
    Augment3D,
    PatchBatches,
    foreground_index,
    patch_bounds,
    patch_dims,
    read_patch,
)
from medlit.errors import ConfigError
from medlit.models.volumetric import create_network_3d, plan_unet
from medlit.sliding import Mirrored, gaussian_importance, sliding_window
from medlit.tasks.segmentation3d import deep_supervision_weights
from tests.helpers.nnunet import nnunet

REPO = Path(__file__).resolve().parents[1]


# ---- sliding windows ----------------------------------------------------------------


@pytest.mark.parametrize(
    "shape",
    [(9, 13, 7), (17, 23, 31), (41, 37, 53)],
    ids=["smaller-than-the-patch", "straddling", "larger"],
)
@pytest.mark.parametrize("overlap", [0.0, 0.5, 0.8])
def test_stitching_a_known_linear_predictor_reproduces_its_volume(
    shape: tuple[int, int, int], overlap: float
) -> None:
    """Windows of a per-voxel linear map, blended with the Gaussian weights, give the map
    of the whole volume, wherever the windows fall (odd sizes, smaller than the patch
    along some axes: padded and cropped back)."""
    torch.manual_seed(0)
    volume = torch.randn(1, 2, *shape)
    weight = torch.tensor([[1.5, -2.0], [0.25, 3.0], [-1.0, 0.5]])

    def linear(x: torch.Tensor) -> torch.Tensor:
        return torch.einsum("kc,bczyx->bkzyx", weight, x) + 0.75

    out = sliding_window(volume, linear, (16, 20, 12), overlap, batch_size=3)
    assert out.shape == (1, 3, *shape)
    torch.testing.assert_close(out, linear(volume), rtol=1e-6, atol=1e-5)


def test_stitching_blends_windows_by_the_gaussian_not_by_their_mean() -> None:
    """A predictor that answers where its window lies (its constant is the window's
    start) shows the weighting: where two windows overlap, the one whose centre is
    nearer dominates as the Gaussian says."""
    volume = torch.zeros(1, 1, 8, 8, 24)
    starts: list[int] = []

    def where(x: torch.Tensor) -> torch.Tensor:
        # The windows along x start at 0, 8 and 16 (16 voxels, overlap 0.5); MONAI hands
        # them over in that order, one per call.
        starts.append(len(starts) * 8)
        return torch.full_like(x, float(starts[-1]))

    out = sliding_window(volume, where, (8, 8, 16), 0.5, batch_size=1)[0, 0, 4, 4]
    g = gaussian_importance((8, 8, 16))[4, 4]
    x = 10  # covered by the windows at 0 (its voxel 10) and at 8 (its voxel 2)
    expected = (0 * g[10] + 8 * g[2]) / (g[10] + g[2])
    assert out[x].item() == pytest.approx(expected.item(), rel=1e-5)
    assert out[x].item() < 1.0  # the nearer window's answer, not their mean (4)


def test_the_gaussian_map_is_nnunet_v2_s_compute_gaussian() -> None:
    patches = [(128, 128, 128), (48, 64, 64), (37, 20, 11), (5, 5, 5)]
    theirs = nnunet(
        "import json, torch\n"
        "from nnunetv2.inference.sliding_window_prediction import compute_gaussian\n"
        f"out = {{str(p): compute_gaussian(p, 1/8, 10, dtype=torch.float32, "
        f"device=torch.device('cpu')).numpy().ravel()[::7].tolist() for p in {patches}}}\n"
        "print(json.dumps(out))"
    )
    for patch in patches:
        ours = gaussian_importance(patch, dtype=torch.float32, device="cpu").numpy().ravel()
        np.testing.assert_allclose(ours[::7], theirs[str(patch)], rtol=0, atol=1e-6)


def test_mirroring_changes_nothing_for_a_flip_equivariant_predictor() -> None:
    """A symmetric 3×3×3 convolution commutes with every flip: the 8 mirrored passes
    average to the plain prediction. A predictor that is not symmetric differs. In float64:
    in float32 the flipped passes sum in another order, and one voxel in 18900 was off by
    1.5e-5 (a tolerance wide enough for that would hide a small error of the mirroring)."""
    torch.manual_seed(1)
    kernel = torch.rand(2, 3, 3, 3, 3, dtype=torch.float64)
    symmetric = kernel
    for axis in (2, 3, 4):
        symmetric = symmetric + symmetric.flip(axis)
    conv = torch.nn.Conv3d(3, 2, 3, padding=1, dtype=torch.float64)
    conv.weight.data = symmetric
    volume = torch.randn(1, 3, 21, 18, 25, dtype=torch.float64)
    with torch.no_grad():
        plain = sliding_window(volume, conv, (16, 16, 16), 0.5)
        mirrored = sliding_window(volume, Mirrored(conv), (16, 16, 16), 0.5)
        assert mirrored.dtype == torch.float64
        torch.testing.assert_close(mirrored, plain, rtol=1e-6, atol=1e-9)
        conv.weight.data = kernel  # not symmetric
        plain = sliding_window(volume, conv, (16, 16, 16), 0.5)
        mirrored = sliding_window(volume, Mirrored(conv), (16, 16, 16), 0.5)
    assert (mirrored - plain).abs().max() > 1e-3


def test_mirroring_averages_the_logits_of_all_eight_flips() -> None:
    net = torch.nn.Conv3d(1, 1, (3, 1, 2), padding="same")
    x = torch.randn(2, 1, 6, 7, 8)
    flips = [(), (2,), (3,), (4,), (2, 3), (2, 4), (3, 4), (2, 3, 4)]
    with torch.no_grad():
        expected = sum(torch.flip(net(torch.flip(x, f)), f) if f else net(x) for f in flips) / 8
        torch.testing.assert_close(Mirrored(net)(x), expected)
    assert len(Mirrored(net).flips) == 8


# ---- networks -----------------------------------------------------------------------


@pytest.mark.parametrize("val_tta", [False, True])
def test_mirroring_is_for_test_and_prediction_not_each_epoch_s_validation(val_tta: bool) -> None:
    """``tta: mirror`` mirrors every window in test and predict; validation, in a fit or
    on its own (``medlit.evaluate --split val`` scores as the fit did), runs plain
    (nnU-Net's online validation) unless ``val_tta``."""
    from pytorch_lightning import Trainer
    from pytorch_lightning.trainer.states import TrainerFn

    from medlit.tasks import Segmentation3DTask

    task = Segmentation3DTask(
        patch_size=[16, 16, 16],
        filters=[4, 8, 16],
        in_channels=1,
        num_classes=1,
        region_names=["A"],
    )
    task.configure_models()
    task.hparams["tta"], task.hparams["val_tta"] = "mirror", val_tta
    calls = []
    task.model.register_forward_hook(lambda *_: calls.append(1))
    trainer = Trainer(logger=False, enable_checkpointing=False, enable_progress_bar=False)
    task.trainer = trainer
    passes = {}
    for fn in (TrainerFn.FITTING, TrainerFn.VALIDATING, TrainerFn.TESTING, TrainerFn.PREDICTING):
        trainer.state.fn = fn
        calls.clear()
        task.predict_volume(torch.zeros(1, 16, 16, 16))  # one window
        passes[fn] = len(calls)
    assert passes == {
        TrainerFn.FITTING: 8 if val_tta else 1,
        TrainerFn.VALIDATING: 8 if val_tta else 1,
        TrainerFn.TESTING: 8,
        TrainerFn.PREDICTING: 8,
    }
    task.hparams["tta"] = "none"
    assert not task.mirroring()


def test_unet_plans_are_nnunet_v2_s() -> None:
    """Kernels and strides for isotropic, anisotropic and odd shapes, against nnU-Net v2's
    planner (``get_pool_and_conv_props`` with its 3D settings)."""
    cases = [
        ((128, 128, 128), (1.0, 1.0, 1.0)),
        ((20, 160, 160), (3.0, 0.75, 0.75)),
        ((48, 64, 64), (2.5, 2.5, 2.5)),
        ((40, 224, 192), (5.0, 0.8, 0.8)),
        ((96, 160, 112), (1.0, 0.7, 0.7)),
        ((16, 32, 32), (1.0, 1.0, 1.0)),
    ]
    theirs = nnunet(
        "import json\n"
        "from nnunetv2.experiment_planning.experiment_planners.network_topology import "
        "get_pool_and_conv_props\n"
        "out = []\n"
        f"for patch, spacing in {cases}:\n"
        "    _, pools, convs, _, _ = get_pool_and_conv_props(spacing, patch, 4, 999999)\n"
        "    out.append([[list(k) for k in convs], [list(p) for p in pools]])\n"
        "print(json.dumps(out))"
    )
    for (patch, spacing), (kernels, strides) in zip(cases, theirs, strict=True):
        assert plan_unet(patch, spacing) == (kernels, strides), (patch, spacing)
    # What the rule gives, spelled out for two of them.
    assert plan_unet((128, 128, 128))[1] == [[1, 1, 1]] + [[2, 2, 2]] * 5
    kernels, strides = plan_unet((20, 160, 160), (3.0, 0.75, 0.75))
    assert strides[1] == [1, 2, 2] and kernels[0] == [1, 3, 3]


def test_a_patch_the_network_cannot_take_is_refused_with_sizes_that_fit() -> None:
    with pytest.raises(ConfigError, match=r"patch_size=\[32, 48, 50\].*50 -> 48 or 56"):
        create_network_3d("segresnet", 4, 3, (32, 48, 50))
    with pytest.raises(ConfigError, match="3D networks are dynunet, segresnet, swinunetr"):
        create_network_3d("unet", 4, 3, (32, 32, 32))
    net, heads = create_network_3d("dynunet", 4, 3, (32, 32, 32), filters=[4, 8, 16, 32])
    assert heads == 1
    net.train()
    assert net(torch.zeros(1, 4, 32, 32, 32)).shape == (1, 2, 3, 32, 32, 32)
    net.eval()
    assert net(torch.zeros(1, 4, 32, 32, 32)).shape == (1, 3, 32, 32, 32)


def test_deep_supervision_weights_are_nnunet_s() -> None:
    """nnU-Net: 1/2^i per output, the lowest resolution 0, normalised; medlit does not
    build that zero-weight head, and the other weights are the same."""
    for outputs in (2, 3, 5):
        theirs = np.array([1 / 2**i for i in range(outputs + 1)])
        theirs[-1] = 0
        theirs = theirs / theirs.sum()
        np.testing.assert_allclose(deep_supervision_weights(outputs), theirs[:-1])


# ---- patches ------------------------------------------------------------------------


class CountingArray:
    """A memory-mapped array that counts the bytes handed out by indexing, and the whole
    array's bytes when it is read whole (``np.asarray``)."""

    def __init__(self, array: np.ndarray) -> None:
        self.array = array
        self.shape, self.dtype, self.ndim = array.shape, array.dtype, array.ndim
        self.read = 0

    def __getitem__(self, index: object) -> np.ndarray:
        out = np.asarray(self.array[index])
        self.read += out.nbytes
        return out

    def __array__(self, dtype: object = None, copy: object = None) -> np.ndarray:
        self.read += self.array.nbytes
        return np.asarray(self.array, dtype=dtype)


def _entry(tmp_path: Path, shape: tuple[int, int, int]) -> CacheEntry:
    rng = np.random.default_rng(0)
    seg = np.zeros(shape, np.uint8)
    seg[10:14, 20:26, 30:33] = 1
    seg[40:42, 5:8, 60:64] = 4
    np.save(tmp_path / "image.npy", rng.normal(size=(4, *shape)).astype(np.float16))
    np.save(tmp_path / "seg.npy", seg)
    np.save(tmp_path / "fg_locations.npy", foreground_index(seg))
    arrays = {n: np.load(tmp_path / f"{n}.npy", mmap_mode="r") for n in ("image", "seg")}
    arrays["fg_locations"] = np.load(tmp_path / "fg_locations.npy")
    return CacheEntry(tmp_path, arrays, {"case_id": "case"})


def test_a_patch_reads_only_its_patch_of_the_cached_volume(tmp_path: Path) -> None:
    shape = (48, 64, 72)
    entry = _entry(tmp_path, shape)
    image, seg = CountingArray(entry.arrays["image"]), CountingArray(entry.arrays["seg"])
    entry.arrays.update(image=image, seg=seg)
    patch = (16, 24, 24)
    data = PatchBatches([entry], lambda s: s, patch, batch_size=3, foreground_fraction=0.5)
    volume_bytes = image.array.nbytes + seg.array.nbytes
    before = image.read + seg.read
    np.random.seed(0)
    for i in range(10):
        data[i]
    per_sample = (image.read + seg.read - before) / 30
    patch_bytes = np.prod(patch) * (4 * 2 + 1)
    assert per_sample <= patch_bytes  # only the patch (less where it sticks out)
    assert per_sample < volume_bytes / 10


def test_every_batch_has_its_share_of_foreground_patches(tmp_path: Path) -> None:
    """nnU-Net's rule: of B patches, the last B - round(B(1 - p)) contain foreground."""
    entry = _entry(tmp_path, (48, 64, 72))
    np.random.seed(3)
    for batch, fraction, forced in [(2, 0.33, 1), (3, 0.33, 1), (4, 0.5, 2), (2, 1.0, 2)]:
        data = PatchBatches([entry], lambda s: s, (8, 8, 8), batch, fraction)
        for i in range(20):
            item = data[i]
            assert item["image"].shape == (batch, 4, 8, 8, 8)
            has_fg = (item["mask"].reshape(batch, -1) > 0).any(1)
            assert has_fg[batch - forced :].all(), (batch, fraction, i)


def test_augmented_patches_leave_monai_s_metadata_setting_as_it_was(tmp_path: Path) -> None:
    """The loader runs MONAI's transforms on plain tensors, and gives the process back
    MONAI's setting: a user's own MONAI code beside it keeps its MetaTensors."""
    from monai.data import MetaTensor, get_track_meta
    from monai.transforms import ScaleIntensity

    entry = _entry(tmp_path, (48, 64, 72))
    data = PatchBatches([entry], lambda s: s, (16, 16, 16), 2, augment=Augment3D().build())
    np.random.seed(0)
    item = data[0]
    assert item["image"].shape == (2, 4, 16, 16, 16) and type(item["image"]) is torch.Tensor
    assert get_track_meta()
    assert isinstance(ScaleIntensity()(torch.rand(1, 4, 4)), MetaTensor)


def test_patches_are_padded_where_the_volume_is_smaller() -> None:
    array = np.arange(2 * 3 * 4 * 5).reshape(2, 3, 4, 5) + 1
    low, high = patch_bounds((3, 4, 5), (6, 4, 3))
    assert low == [-2, 0, 0] and high == [-1, 0, 2]  # nnU-Net's get_bbox
    block = read_patch(array, (-2, 0, 2), (6, 4, 3))
    assert block.shape == (2, 6, 4, 3)
    assert (block[:, :2] == 0).all() and (block[:, 5:] == 0).all()
    np.testing.assert_array_equal(block[:, 2:5], array[:, :, :, 2:5])


def test_3d_patch_settings_that_cannot_work_are_refused() -> None:
    assert patch_dims(96) is None
    assert patch_dims([32, 48, 48]) == (32, 48, 48)
    with pytest.raises(ConfigError, match="one side .* or \\[z, y, x\\]"):
        patch_dims([32, 48])
    with pytest.raises(ConfigError, match="context_slices=1"):
        patch_dims([32, 48, 48], context_slices=1)
