"""3D whole-case inference: medlit's ``Segmentation3DTask.predict_volume`` against nnU-Net
v2's ``nnUNetPredictor`` and MONAI's ``SlidingWindowInferer``, with the same DynUNet
weights (the 3D demo's network, random init) on the same case, read as evaluation reads it.

Every side slides windows of the network's patch with overlap 0.5 (nnU-Net's
``tile_step_size`` 0.5), batches of windows as its docs advise, and returns probabilities
(sigmoid of the stitched logits; nnU-Net's region nonlinearity):

* against nnU-Net, both sides mirror every window over the 8 combinations of axis flips
  and average the logits, with nnU-Net's Gaussian weights (medlit gives MONAI's inferer
  nnU-Net's map); nnU-Net runs one window per call and stitches in float16, as it does
  on every device, and runs in its own environment (``.venv-nnunet``, which has MONAI for
  the network's class);
* against MONAI, neither mirrors: MONAI blends with its own Gaussian (``mode="gaussian"``)
  and runs medlit's window batch; MONAI's bare defaults (overlap 0.25, one window a call,
  constant weights: less work) are timed in the details.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

import numpy as np
import torch

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
    timed,
)
from medlit.datamodules import BraTSDataModule
from medlit.datasets.brats.phantom import write_brats
from medlit.datasets.io.files import is_synthetic

PEER = NNUNET_PYTHON

# The 3D demo's case geometry and network (experiments/demo/brats_unet3d.yaml); tiny: a
# 4-stage network on small phantoms, which only checks that every side runs.
SETUP = {
    "full": {"shape": (62, 96, 96), "patch": [48, 64, 64], "filters": [8, 16, 32, 64, 128]},
    "tiny": {"shape": (24, 40, 40), "patch": [16, 32, 32], "filters": [4, 8, 16, 32]},
}


class NnUNetSide:
    """``benchmarks/peers/nnunet_inference.py`` in nnU-Net's environment, kept up between
    requests (imports and first-call set-up paid once, as for a folder of cases)."""

    def __init__(self, threads: int, workdir: Path) -> None:
        self.process = subprocess.Popen(
            [str(PEER), str(REPO / "benchmarks/peers/nnunet_inference.py"), str(threads)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            env=nnunet_env(workdir / "nnunet", threads),
        )

    def predict(self, **request: Any) -> dict[str, Any]:
        assert self.process.stdin is not None and self.process.stdout is not None
        self.process.stdin.write(json.dumps(request) + "\n")
        self.process.stdin.flush()
        reply = json.loads(self.process.stdout.readline() or '{"error": "no reply"}')
        if "error" in reply:
            raise RuntimeError(f"nnU-Net's predictor failed:\n{reply['error']}")
        return reply

    def close(self) -> None:
        self.process.kill()
        self.process.wait()


def _case(ctx: Context, shape: tuple[int, int, int]) -> torch.Tensor:
    """A held-out case (C, Z, Y, X) after the brain crop and normalisation, as the test
    stage hands it to ``predict_volume``."""
    root = ctx.workdir / "BraTS3D"
    if not is_synthetic(root):
        write_brats(root, 2, shape=shape, spacing=2.5, seed=0)
    dm = BraTSDataModule(
        root=str(root),
        cache_dir=str(ctx.workdir / "medlit-cache-3d"),
        split={"val_fraction": 0.5, "test_fraction": 0.0},
        patch_size=SETUP[ctx.sizes.name]["patch"],
    )
    dm.prepare_data()
    dm.setup("validate")
    return dm.datasets["val"][0]["image"].float().contiguous()


class Passes:
    """Counts the windows a network sees (forward pre-hook)."""

    def __init__(self, net: torch.nn.Module) -> None:
        self.count = 0
        self.handle = net.register_forward_pre_hook(self._hook)

    def _hook(self, _module: torch.nn.Module, args: tuple) -> None:
        self.count += int(args[0].shape[0])


def run(ctx: Context, log=print) -> Section:
    from monai.inferers import SlidingWindowInferer

    from medlit.tasks import Segmentation3DTask

    setup = SETUP[ctx.sizes.name]
    patch = setup["patch"]
    volume = _case(ctx, setup["shape"])
    torch.manual_seed(0)
    common = {
        "arch": "dynunet",
        "patch_size": patch,
        "filters": setup["filters"],
        "deep_supervision": True,
        "in_channels": 4,
        "num_classes": 3,
        "overlap": 0.5,
    }
    mirrored = Segmentation3DTask(**common, tta="mirror").eval()
    plain = Segmentation3DTask(**common, tta="none").eval()
    net = plain.model = mirrored.model  # one set of weights for every side
    model_file, volume_file = ctx.workdir / "dynunet3d.pt", ctx.workdir / "case3d.npy"
    torch.save(net, model_file)
    np.save(volume_file, volume.numpy())
    windows = plain.hparams["sw_batch_size"]

    def monai(inferer: SlidingWindowInferer) -> torch.Tensor:
        with torch.no_grad():
            return inferer(volume[None], net)[0].sigmoid()

    gaussian = SlidingWindowInferer(
        roi_size=patch, sw_batch_size=windows, overlap=0.5, mode="gaussian", progress=False
    )
    defaults = SlidingWindowInferer(roi_size=patch, progress=False)
    here = {
        "medlit, mirrored": lambda: mirrored.predict_volume(volume),
        "medlit": lambda: plain.predict_volume(volume),
        "MONAI, Gaussian": lambda: monai(gaussian),
        "MONAI, defaults": lambda: monai(defaults),
    }
    section = Section("3D whole-case inference")
    peer = NnUNetSide(ctx.threads, ctx.workdir) if PEER.exists() else None
    if peer is None:
        section.notes.append(
            f"nnU-Net v2's predictor was not measured: {PEER.relative_to(REPO)} is missing "
            "(`bash benchmarks/peers/nnunet.sh` makes it)."
        )
    request = {
        "model": str(model_file),
        "volume": str(volume_file),
        "classes": 3,
        "patch": patch,
        "step": 0.5,
        "mirror": True,
    }
    try:
        # Untimed first calls (oneDNN sets up its kernels for the window shape), which
        # also count the windows each side runs and keep its output.
        outputs, passes = {}, {}
        for name, fn in here.items():
            counted = Passes(net)
            outputs[name] = fn()
            passes[name] = counted.count
            counted.handle.remove()
        sides = {name: lambda r, fn=fn: timed(fn)[0] for name, fn in here.items()}
        if peer is not None:
            nnunet = peer.predict(**request, out=str(ctx.workdir / "nnunet3d.npy"))
            outputs["nnU-Net v2, mirrored"] = torch.from_numpy(
                np.load(ctx.workdir / "nnunet3d.npy")
            )
            passes["nnU-Net v2, mirrored"] = nnunet["passes"]
            sides["nnU-Net v2, mirrored"] = lambda r: peer.predict(**request)["seconds"]
        seconds = interleave(sides, ctx.repeats, log)
    finally:
        if peer is not None:
            peer.close()
    shape = "×".join(str(n) for n in volume.shape[1:])
    what = f"BraTS case ({shape} at 2.5 mm after the brain crop, the 3D demo's DynUNet, " + (
        f"{'×'.join(map(str, patch))} windows, overlap 0.5, CPU)"
    )
    t = {k: median(v) for k, v in seconds.items()}
    if peer is not None:
        ratio = t["nnU-Net v2, mirrored"] / t["medlit, mirrored"]
        section.rows.append(
            Row(
                f"{what}, 8 mirrorings: medlit `predict_volume` vs nnU-Net v2 `nnUNetPredictor`",
                f"{t['medlit, mirrored']:.2f} s/case",
                f"{t['nnU-Net v2, mirrored']:.2f} s/case",
                ratio,
                "speed-up ≥ 1.0x",
                ratio >= 1.0,
            )
        )
        if ratio < 1.0:
            section.misses.append(
                _miss(
                    "nnU-Net v2's predictor",
                    seconds["medlit, mirrored"],
                    seconds["nnU-Net v2, mirrored"],
                    ratio,
                )
            )
    ratio_monai = t["MONAI, Gaussian"] / t["medlit"]
    section.rows.append(
        Row(
            f"{what}, no mirroring: medlit `predict_volume` vs MONAI `SlidingWindowInferer`",
            f"{t['medlit']:.2f} s/case",
            f"{t['MONAI, Gaussian']:.2f} s/case",
            ratio_monai,
            "speed-up ≥ 1.0x",
            ratio_monai >= 1.0,
        )
    )
    if ratio_monai < 1.0:
        section.misses.append(
            _miss("MONAI's inferer", seconds["medlit"], seconds["MONAI, Gaussian"], ratio_monai)
        )
    section.details += [
        "| side | s/case: median (min-max, n) | windows through the network |",
        "| --- | --- | --- |",
        *(f"| {k} | {spread(v)} | {passes[k]} |" for k, v in seconds.items()),
        "",
        f"medlit runs {windows} windows a call (`sw_batch_size`), MONAI's Gaussian side the "
        "same; nnU-Net's predictor one (it has no batch option); MONAI's defaults one, "
        "overlap 0.25 and constant weights.",
    ]
    if peer is not None:
        ours, theirs = outputs["medlit, mirrored"], outputs["nnU-Net v2, mirrored"]
        diff = (ours - theirs).abs().flatten()
        agree = float(((ours > 0.5) == (theirs > 0.5)).float().mean())
        section.details.append(
            f"\nmedlit against nnU-Net (mirrored): probability difference median "
            f"{float(diff.median()):.1g}, 99.9th percentile "
            f"{float(diff.kthvalue(max(1, int(0.999 * diff.numel()))).values):.2g}, largest "
            f"{float(diff.max()):.2g}; {100 * agree:.3f} % of voxels thresholded alike. "
            "nnU-Net stitches in float16, whose range ends near the Gaussian's corner weights "
            "(1e-10 of the peak for these windows): the largest differences are at the "
            "volume's faces, covered only by window borders."
        )
    diff_monai = float((outputs["medlit"] - outputs["MONAI, Gaussian"]).abs().max())
    section.details.append(
        f"\nmedlit against MONAI (no mirroring): largest probability difference "
        f"{diff_monai:.2g} (MONAI's Gaussian is built differently from nnU-Net's: "
        "`medlit/sliding.py`)."
    )
    return section


def _miss(peer: str, ours: list[float], theirs: list[float], ratio: float) -> str:
    """What a missed 3D-inference target says: whether the repeats of the two sides
    overlap (noise of a shared machine) or not (a real gap)."""
    overlap = min(ours) <= max(theirs) and min(theirs) <= max(ours)
    return (
        f"**3D inference against {peer} ({ratio:.2f}x).** Both sides run the same network "
        "over the same windows, which is nearly all of the time on a CPU. medlit "
        f"{spread(ours)} s, {peer} {spread(theirs)} s: "
        + (
            "the repeats overlap, so the gap is within this machine's repeat-to-repeat "
            "spread; more repeats on a quiet machine would tell."
            if overlap
            else "the repeats do not overlap; profile both sides' loops (the window batch, "
            "the stitching) to find the difference."
        )
    )
