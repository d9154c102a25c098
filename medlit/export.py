"""Export a trained network for deployment: ONNX (torch's current exporter) or a
``torch.export`` program (``.pt2``).

    python -m medlit.export CONFIG --ckpt_path PATH --format onnx|torch-export --output FILE

What is exported is the task's network alone, as the task runs it, for any batch:

* 2D/2.5D segmentation: logits from slices with their context as channels, any height
  and width that are multiples of 32 from 64 on (``medlit.predict --model`` pads smaller
  slices with zeros and crops the logits back);
* 3D segmentation: logits from windows of the task's patch size;
* classification: logits from images of the data module's size;
* detection (Ultralytics YOLO): the head's decoded output before NMS, (N, 4 + classes,
  anchors): per anchor point of every stride the box centre x, y, width and height in
  input pixels, then each class's probability (Ultralytics' own export format), from
  slices of any height and width that are multiples of the largest stride (32) from twice
  that on. NMS within a slice, the merging of slice boxes into 3D candidates and
  false-positive reduction stay in medlit;
* GAN generator (the weight average when trained with one): pix2pix, image -> image
  (slices, any height and width that are multiples of 2**depth from twice that on);
  unconditional, noise (N, latent_dim) -> images (N, C, S, S) in [-1, 1], and for a
  class-conditional generator a second input, the classes (N,) int64.

Slicing, the sliding window, mirroring, thresholds, postprocessing and the writers stay
in medlit (``medlit.predict --model FILE.onnx`` runs them around the exported network,
for segmentation, classification and detection). The file carries what inference needs
in its metadata (``medlit`` key: a JSON object with the task and ``kind``, the names of
the inputs and the output, input channels, regions or classes and their activation,
patch size, spacing, stride and NMS / merging settings, the generator's value range, the
data module's preprocessing state, medlit's version and the resolved config); for ONNX
as the model's metadata, for ``.pt2`` as the extra file ``medlit.json``.

The export is checked before it is kept: the exported network runs (onnxruntime, or the
exported program) on two inputs of different batch (and, where allowed, size) and its
largest difference from PyTorch is printed and stored (``parity_max_abs_diff``); above
1e-3 the export is refused.
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import sys
import tempfile
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from medlit.checkpoints import load_checkpoint
from medlit.errors import ConfigError, exit_process, run_main
from medlit.overview import maybe_overview

log = logging.getLogger("medlit")
# Refused above. fp32 exports come out near 1e-6; YOLO's boxes, in pixels (hundreds, where
# float32 steps by 3e-5), a few steps apart (3e-5 to 1.2e-4).
TOLERANCE = 1e-3
BATCH = torch.export.Dim("batch", min=1, max=4096)


@dataclass
class Exportable:
    """A network with two example inputs of different batch (and size, where dynamic):
    each a tuple of the network's inputs (a class-conditional generator takes noise and
    classes), with the dynamic dimensions of each input, and the metadata. The names of
    the inputs and of the output are ``meta["inputs"]`` and ``meta["output"]``.

    ``strict``: trace with ``torch.export``'s strict (TorchDynamo) tracer, which keeps
    ``len(x)`` symbolic; the default non-strict tracer runs the Python code, where
    ``len(x)`` must be an int, so a network calling it would export for one batch only.
    """

    network: torch.nn.Module
    example: tuple[torch.Tensor, ...]
    other: tuple[torch.Tensor, ...]
    dynamic: tuple[dict[int, Any], ...]
    meta: dict[str, Any]
    strict: bool = False


def exportable(model: Any, datamodule: Any) -> Exportable:
    """The network of a trained task, example inputs and the metadata inference needs."""
    from medlit.datamodules.base import BaseDataModule
    from medlit.tasks import (
        ClassificationTask,
        DetectionTask,
        GANTask,
        Segmentation3DTask,
        SegmentationTask,
    )

    h = dict(model.hparams)
    meta: dict[str, Any] = {"task": task_name(model)}
    if isinstance(model, Segmentation3DTask):
        patch = list(model.patch)
        c = int(h["in_channels"])
        e = Exportable(
            model.model.eval(),
            (torch.randn(2, c, *patch),),
            (torch.randn(3, c, *patch),),
            ({0: BATCH},),
            {"kind": "segmentation3d", "patch_size": patch, "spacing": h.get("spacing")},
        )
    elif isinstance(model, SegmentationTask):
        e = _slices(model.model.eval(), int(h["in_channels"]), 32)
        e.meta["kind"] = "segmentation"
    elif isinstance(model, ClassificationTask):
        size = int(_data_hparams(datamodule).get("image_size", 224) or 224)
        c = int(h.get("in_channels") or 3)
        e = Exportable(
            model.model.eval(),
            (torch.randn(2, c, size, size),),
            (torch.randn(3, c, size, size),),
            ({0: BATCH},),
            {"kind": "classification", "image_size": size, "classes": model.class_names},
        )
    elif isinstance(model, DetectionTask):
        e = _detector(model, datamodule)
    elif isinstance(model, GANTask):
        e = _generator(model, datamodule)
    else:
        raise ConfigError(
            f"medlit.export: {type(model).__name__} is not exported (segmentation, "
            "classification, detection and GAN generators are)"
        )
    if isinstance(model, SegmentationTask):
        e.meta |= {
            "regions": list(model.region_names),
            "target": h["target"],
            "activation": "sigmoid" if h["target"] == "regions" else "softmax",
            "threshold": h.get("threshold"),
            "num_classes": h.get("num_classes"),
            "class_to_region": h.get("class_to_region"),
        }
        e.meta |= segmentation_inference(model, datamodule)
    # How the data module reads, preprocesses and writes cases (medlit.deploy).
    gan = isinstance(model, GANTask)
    if not gan and isinstance(datamodule, BaseDataModule) and (state := datamodule.deploy_state()):
        e.meta["deploy"] = state
    e.meta = {
        **meta,
        **e.meta,
        "in_channels": e.meta.get("in_channels", int(e.example[0].shape[1])),
        "inputs": e.meta.get("inputs", ["image"]),
        "output": e.meta.get("output", "logits"),
    }
    return e


def segmentation_inference(model: Any, datamodule: Any) -> dict[str, Any]:
    """How a segmentation task runs its network over a whole case (``medlit.deploy`` does
    the same): slices per pass (2D), or the window overlap, windows per pass and the
    mirrored axes at test (3D)."""
    from medlit.datamodules.base import BaseDataModule
    from medlit.tasks import Segmentation3DTask

    h = model.hparams
    if isinstance(model, Segmentation3DTask):
        mirror = h["tta"] == "mirror"
        axes = datamodule.mirror_axes() if isinstance(datamodule, BaseDataModule) else (0, 1, 2)
        out: dict[str, Any] = {
            "overlap": h["overlap"],
            "sw_batch_size": h["sw_batch_size"],
            "mirror_axes": list(axes) if mirror else [],
        }
    else:
        out = {"inference_batch_size": h["inference_batch_size"]}
    return out


def task_name(model: Any) -> str:
    """The task's class as the metadata names it (``medlit.tasks.detection.DetectionTask``)."""
    return f"{type(model).__module__}.{type(model).__qualname__}"


def predicted_names(model: Any, datamodule: Any) -> list[str]:
    """What the task's outputs are: its regions (segmentation), classes (classification)
    or the data module's box classes (detection); empty for a generator."""
    from medlit.datamodules.base import BaseDataModule
    from medlit.tasks import ClassificationTask, DetectionTask, SegmentationTask

    if isinstance(model, SegmentationTask):
        return list(model.region_names)
    if isinstance(model, ClassificationTask):
        return list(model.class_names)
    if isinstance(model, DetectionTask) and isinstance(datamodule, BaseDataModule):
        return list(datamodule.classes)
    return []


def _data_hparams(datamodule: Any) -> dict[str, Any]:
    return dict(getattr(datamodule, "hparams", None) or {})


def _slices(
    network: torch.nn.Module, channels: int, multiple: int, sample: Any = torch.randn
) -> Exportable:
    """A fully convolutional network on (N, channels, H, W) slices, H and W multiples of
    ``multiple``, its example inputs drawn by ``sample`` (the inputs' domain: z-scored
    intensities by default). At least two multiples per side: with one, the deepest
    feature map is 1 × 1 and the exported graph would hold only for that (broadcasting
    specialises)."""
    ys = torch.export.Dim(f"y{multiple}", min=2, max=16384 // multiple)
    xs = torch.export.Dim(f"x{multiple}", min=2, max=16384 // multiple)
    m = multiple
    return Exportable(
        network,
        (sample(2, channels, 2 * m, 2 * m),),
        (sample(3, channels, 3 * m, 4 * m),),
        ({0: BATCH, 2: m * ys, 3: m * xs},),
        {"multiple": m, "min_size": 2 * m},
    )


def _detector(model: Any, datamodule: Any) -> Exportable:
    """A DetectionTask's YOLO network, returning its decoded head output alone.

    In eval mode Ultralytics' ``DetectionModel`` returns (decoded output, raw head maps);
    medlit's NMS reads the first, the maps only serve the loss. Its export mode returns
    the first alone, and its dynamic mode rebuilds the anchor grid from each input's
    shape (otherwise the grid of the last shape seen is cached). Both are set on a copy,
    so the task's own network is untouched.

    The parity check's inputs are uniform in [0, 1], the range of the windowed slices
    the detector sees: its boxes are in pixels (hundreds, where float32 resolves 3e-5),
    and on z-scored noise far outside that range a YOLO network with measured BatchNorm
    statistics differs from its own float64 result by 5e-3 pixels, in PyTorch as in
    onnxruntime."""
    h = dict(model.hparams)
    network = copy.deepcopy(model.model).eval()
    head = network.model[-1]
    head.export, head.dynamic = True, True
    strides = [int(s) for s in network.stride.tolist()]
    e = _slices(network, int(h["in_channels"]), max(strides), torch.rand)
    data = _data_hparams(datamodule)
    e.meta |= {
        "kind": "detection",
        "output": "detections",
        "layout": "(N, 4 + classes, anchors): box centre x, y, width, height in input "
        "pixels, then each class's probability",
        "context_slices": (int(h["in_channels"]) - 1) // 2,
        "image_size": data.get("patch_size"),  # the slices it was trained on
        "spacing": data.get("spacing"),
        "strides": strides,
        "classes": predicted_names(model, datamodule)
        or [f"class_{i}" for i in range(int(h["num_classes"]))],
        "num_classes": int(h["num_classes"]),
        **{
            k: h[k]
            for k in (
                "conf_threshold",
                "iou_threshold",
                "max_det",
                "merge_tolerance",
                "max_candidates",
                "lung_margin_mm",
                "inference_batch_size",
            )
        },
        # Its re-ranking classifier is not in the file (medlit.deploy refuses the model).
        "fpr": bool(h.get("fpr_checkpoint")),
    }
    return e


def _generator(model: Any, datamodule: Any) -> Exportable:
    """A GANTask's generator as evaluation and sampling use it (its weight average when
    trained with one)."""
    h = dict(model.hparams)
    network = model.sampler.eval()
    meta = {"kind": "generator", "mode": h["mode"], "out_channels": int(h["out_channels"])}
    if h["mode"] == "paired":
        e = _slices(network, int(h["in_channels"]), 2 ** int(h["depth"]))
        # The U-Net's last layer is linear: intensities normalised as the data module
        # normalises the target modality.
        meta |= {
            "image_size": _data_hparams(datamodule).get("patch_size"),  # trained on
            "activation": "none",
            "value_range": None,
        }
        e.meta |= meta | {"output": "generated"}
        return e
    latent, classes = int(h["latent_dim"]), int(h["num_classes"])
    example: tuple[torch.Tensor, ...] = (torch.randn(2, latent),)
    other: tuple[torch.Tensor, ...] = (torch.randn(3, latent),)
    dynamic: tuple[dict[int, Any], ...] = ({0: BATCH},)
    inputs = ["latent"]
    if classes:
        example += (torch.arange(2) % classes,)
        other += (torch.arange(3) % classes,)
        dynamic += ({0: BATCH},)
        inputs.append("labels")
    meta |= {
        "in_channels": None,  # noise, not an image
        "image_size": int(h["image_size"]),
        "latent_dim": latent,
        "num_classes": classes,
        "activation": "tanh",
        "value_range": [-1.0, 1.0],
        "inputs": inputs,
        "output": "generated",
    }
    # DCGANGenerator.forward takes the batch as len(z): kept symbolic by the strict tracer.
    return Exportable(network, example, other, dynamic, meta, strict=True)


@contextmanager
def _anchor_cache_quiet() -> Iterator[None]:
    """Ultralytics' Detect head stores its anchor grid in plain tensor attributes, which
    torch.export warns about. In dynamic mode (set by :func:`_detector`) the grid is
    rebuilt from the input's shape on every call, so the exported graph computes it and
    the attributes are never read back: the warning says nothing about the export."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"The tensor attributes .*(anchors|strides)")
        yield


def _run(network: torch.nn.Module, inputs: tuple[torch.Tensor, ...]) -> torch.Tensor:
    with torch.no_grad():
        return network(*inputs).float()


class TwoPassInstanceNorm(torch.nn.Module):
    """An ``InstanceNorm`` without running statistics, as primitive ops: the mean, then
    the variance of the centred values (two passes), for the ONNX export. Written by hand
    because onnxruntime's ``InstanceNormalization`` kernel loses precision on what trained
    networks feed it (activations with an offset, or mostly zero): measured on 2 × 8 ×
    48 × 64 × 64, 8.6e-3 from float64 on ReLU'd noise where PyTorch's is 4e-6, and a
    trained 3D DynUNet's logits 3.4e-3 from PyTorch's on BraTS windows (6.6e-5 between
    PyTorch's float32 and float64). ONNX has no other instance norm to use."""

    def __init__(self, norm: torch.nn.modules.instancenorm._InstanceNorm) -> None:
        super().__init__()
        self.eps, self.weight, self.bias = norm.eps, norm.weight, norm.bias

    @staticmethod
    def _mean(x: torch.Tensor) -> torch.Tensor:
        # Axis by axis: each reduction sums tens of values, not a whole volume's
        # (onnxruntime's ReduceMean accumulates in float32 as it goes).
        for dim in range(x.ndim - 1, 1, -1):
            x = x.mean(dim, keepdim=True)
        return x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        centred = x - self._mean(x)
        y = centred * torch.rsqrt(self._mean(centred * centred) + self.eps)
        if self.weight is None:
            return y
        shape = (1, -1) + (1,) * (x.ndim - 2)
        return y * self.weight.view(shape) + self.bias.view(shape)


def two_pass_norms(network: torch.nn.Module) -> torch.nn.Module:
    """A copy of ``network`` with every instance norm that normalises by each input's own
    statistics made a :class:`TwoPassInstanceNorm` (the network itself untouched)."""
    norms = torch.nn.modules.instancenorm._InstanceNorm
    if not any(isinstance(m, norms) and not m.track_running_stats for m in network.modules()):
        return network
    network = copy.deepcopy(network)
    for name, m in list(network.named_modules()):
        if isinstance(m, norms) and not m.track_running_stats:
            parent, _, attr = name.rpartition(".")
            setattr(network.get_submodule(parent), attr, TwoPassInstanceNorm(m))
    return network


def _program(e: Exportable, onnx: bool = False) -> torch.export.ExportedProgram:
    """The network traced by ``torch.export``, which both formats start from (for ONNX,
    with :func:`two_pass_norms`): its errors (a dimension the code fixes, an op it cannot
    trace) surface as they are."""
    network = two_pass_norms(e.network) if onnx else e.network
    with _anchor_cache_quiet():
        return torch.export.export(network, e.example, dynamic_shapes=e.dynamic, strict=e.strict)


def _checked_inputs(e: Exportable) -> list[tuple[torch.Tensor, ...]]:
    """What the parity check runs: the two example inputs and, for image networks, the
    second with 60 % of its voxels zero (the background of masked normalisation, where
    normalisation layers see sparse activations)."""
    inputs = [e.example, e.other]
    if e.meta.get("inputs", ["image"]) == ["image"]:
        x = e.other[0]
        keep = torch.rand(x.shape[0], 1, *x.shape[2:], generator=torch.Generator().manual_seed(0))
        inputs.append((x * (keep > 0.6),))
    return inputs


def _onnx(e: Exportable, path: Path) -> float:
    import onnx
    import onnxruntime as ort

    names = list(e.meta["inputs"])
    onnx_program = torch.onnx.export(
        _program(e, onnx=True),
        e.example,
        dynamo=True,
        input_names=names,
        output_names=[e.meta["output"]],
    )
    onnx_program.save(str(path))
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    diff = 0.0
    for x in _checked_inputs(e):
        want = _run(e.network, x).numpy()
        got = session.run(None, {n: t.numpy() for n, t in zip(names, x, strict=True)})[0]
        diff = max(diff, float(np.abs(got - want).max()))
    proto = onnx.load(str(path))
    entry = proto.metadata_props.add()
    entry.key, entry.value = "medlit", json.dumps({**e.meta, "parity_max_abs_diff": diff})
    onnx.save(proto, str(path))
    return diff


def _torch_export(e: Exportable, path: Path) -> float:
    program = _program(e)
    diff = 0.0
    for x in _checked_inputs(e):
        want, got = _run(e.network, x), _run(program.module(), x)
        diff = max(diff, float((got - want).abs().max()))
    meta = json.dumps({**e.meta, "parity_max_abs_diff": diff})
    torch.export.save(program, str(path), extra_files={"medlit.json": meta})
    return diff


class OnnxNetwork(torch.nn.Module):
    """An exported ONNX network run by onnxruntime, in place of a task's PyTorch network
    (``medlit.predict --model``): its output from a batch, on the input's device.

    Segmentation slices smaller than the export's ``min_size`` are zero-padded and the
    logits cropped back. A detector's slices cannot be: padding would add anchors and
    move the boxes near the edge, so smaller slices are refused. For a detector,
    ``stride`` holds its strides as Ultralytics' ``DetectionModel.stride`` does (what
    :meth:`~medlit.tasks.DetectionTask.detect_slices` pads slices to a multiple of)."""

    def __init__(self, path: Path, meta: dict[str, Any], threads: int | None = None) -> None:
        super().__init__()
        try:
            import onnxruntime as ort
        except ImportError:
            raise ConfigError(
                "--model FILE.onnx needs onnxruntime: pip install 'medlit[export]'"
            ) from None
        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
        self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        self.path, self.min_size = path, int(meta.get("min_size", 0))
        self.input = meta.get("inputs", ["image"])[0]
        self.maps = meta.get("kind") == "segmentation"  # logits of the slice's size
        strides = torch.tensor(meta.get("strides", []), dtype=torch.float32)
        self.register_buffer("stride", strides, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2:]
        if x.ndim == 4 and min(h, w) < self.min_size:
            if not self.maps:
                raise ConfigError(
                    f"--model {self.path}: slices of {h} × {w} pixels; the exported "
                    f"network takes {self.min_size} × {self.min_size} and larger"
                )
            x = torch.nn.functional.pad(
                x, (0, max(self.min_size - w, 0), 0, max(self.min_size - h, 0))
            )
        out = self.session.run(None, {self.input: x.detach().float().cpu().numpy()})[0]
        return torch.from_numpy(out[..., :h, :w] if self.maps else out).to(x.device)


def read_metadata(path: Path) -> dict[str, Any]:
    """The ``medlit`` metadata of an exported file (ONNX or ``.pt2``)."""
    try:
        if path.suffix == ".onnx":
            import onnx

            props = {
                p.key: p.value
                for p in onnx.load(str(path), load_external_data=False).metadata_props
            }
            return json.loads(props["medlit"])
        extra = {"medlit.json": ""}
        torch.export.load(str(path), extra_files=extra)
        return json.loads(extra["medlit.json"])
    except (OSError, KeyError, ValueError, RuntimeError) as e:
        raise ConfigError(f"{path}: not a model exported by medlit.export ({e})") from None


def use_exported(model: Any, datamodule: Any, path: Path) -> dict[str, Any]:
    """Make ``model`` run the ONNX network ``path`` (``medlit.predict --model``): checked
    against the experiment (task, input channels, regions or classes), the data module's
    preprocessing state loaded from the file's metadata. Returns the metadata.

    The task's own settings (thresholds, NMS, merging) come from the config, as with a
    checkpoint; the file's copies of them are for other runtimes."""
    if path.suffix != ".onnx":
        raise ConfigError(f"--model {path}: give an ONNX file from medlit.export")
    meta = read_metadata(path)
    task = task_name(model)
    if meta.get("task") != task:
        raise ConfigError(
            f"--model {path} was exported from a {meta.get('task')}, the config's task is {task}"
        )
    names = predicted_names(model, datamodule)
    theirs = meta.get("regions") or meta.get("classes") or []
    channels = int(model.hparams.get("in_channels") or 3)
    if list(theirs) != names or int(meta.get("in_channels", channels)) != channels:
        raise ConfigError(
            f"--model {path}: exported for {meta.get('in_channels')} input channels and "
            f"{theirs}; the config's model takes {channels} and predicts {names}"
        )
    if meta.get("data_state") and hasattr(datamodule, "load_state_dict"):
        datamodule.load_state_dict(meta["data_state"])
    model.model = OnnxNetwork(path, meta, torch.get_num_threads())
    return meta


def main(argv: list[str] | None = None) -> Path | None:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    parser = argparse.ArgumentParser(prog="python -m medlit.export", add_help=False)
    parser.add_argument("--ckpt_path", required=True)
    parser.add_argument("--format", choices=("onnx", "torch-export"), default="onnx")
    parser.add_argument("--output", required=True)
    args = list(sys.argv[1:] if argv is None else argv)
    if maybe_overview("medlit.export", args):
        return None
    ours, rest = parser.parse_known_args(args)
    if not rest:
        raise ConfigError("give the experiment's CONFIG file first")
    from medlit.cli import build, normalise_args
    from medlit.ensemble import load_members
    from medlit.tracking.metadata import package_versions
    from medlit.tuning.worker import resolve

    ckpt = Path(ours.ckpt_path).expanduser()
    load_checkpoint(ckpt)
    experiment = build(rest, track=False)
    model, dm = experiment.model, experiment.datamodule
    load_members(model, dm, [ckpt], normalise_args(rest)[1])
    e = exportable(model, dm)
    state = dm.state_dict() if hasattr(dm, "state_dict") else {}
    _, config_yaml = resolve(rest)
    e.meta |= {
        "medlit_version": (versions := package_versions()).get("medlit", "unknown"),
        "versions": versions,
        "checkpoint": str(ckpt),
        "data_state": json.loads(json.dumps(state, default=str)),
        "config": config_yaml,
    }
    out = Path(ours.output).expanduser()
    out.parent.mkdir(parents=True, exist_ok=True)
    suffix = ".onnx" if ours.format == "onnx" else ".pt2"
    with tempfile.TemporaryDirectory(dir=out.parent, prefix=".export-") as tmp:
        path = Path(tmp) / f"model{suffix}"
        diff = _onnx(e, path) if ours.format == "onnx" else _torch_export(e, path)
        if not diff <= TOLERANCE:
            raise ConfigError(
                f"medlit.export: the exported network differs from PyTorch by {diff:.3g} "
                f"(more than {TOLERANCE}); nothing written"
            )
        path.replace(out)
    print(
        f"medlit.export: {e.meta['kind']} network of {ckpt.name} -> {out} ({ours.format}); "
        f"largest difference from PyTorch on two test inputs: {diff:.2g}"
    )
    return out


if __name__ == "__main__":
    exit_process(run_main(main))
