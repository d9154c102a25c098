"""Export a trained network for deployment: ONNX (torch's current exporter) or a
``torch.export`` program (``.pt2``).

    python -m medlit.export CONFIG --ckpt_path PATH --format onnx|torch-export --output FILE

What is exported is the task's network alone, as the task runs it: logits from a batch of
inputs (2D/2.5D segmentation: slices with their context as channels, any batch and any
height and width that are multiples of 32 from 64 on (``medlit.predict --model`` pads
smaller slices with zeros); 3D segmentation: windows of the task's patch
size, any batch; classification: images of the data module's size, any batch). Slicing,
the sliding window, mirroring, thresholds, postprocessing and the writers stay in medlit
(``medlit.predict --model FILE.onnx`` runs them around the exported network). The file
carries what inference needs in its metadata (``medlit`` key: a JSON object with the
task, its input channels, regions or classes and their activation, patch size, spacing,
the data module's preprocessing state, medlit's version and the resolved config); for
ONNX as the model's metadata, for ``.pt2`` as the extra file ``medlit.json``.

The export is checked before it is kept: the exported network runs (onnxruntime, or the
exported program) on two inputs of different batch (and, where allowed, size) and its
largest difference from PyTorch is printed and stored (``parity_max_abs_diff``); above
1e-3 the export is refused. Detection (YOLO) and GAN generators are not exported yet.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from medlit.checkpoints import load_checkpoint
from medlit.errors import ConfigError, run_main
from medlit.overview import maybe_overview

log = logging.getLogger("medlit")
TOLERANCE = 1e-3  # refused above; fp32 exports come out near 1e-6


@dataclass
class Exportable:
    network: torch.nn.Module
    example: torch.Tensor
    other: torch.Tensor  # a second input of another batch (and size, where dynamic)
    dynamic: dict[int, Any]
    meta: dict[str, Any]


def exportable(model: Any, datamodule: Any) -> Exportable:
    """The network of a trained task, example inputs and the metadata inference needs."""
    from medlit.tasks import ClassificationTask, Segmentation3DTask, SegmentationTask

    h = dict(model.hparams)
    batch = torch.export.Dim("batch", min=1, max=4096)
    meta: dict[str, Any] = {"task": f"{type(model).__module__}.{type(model).__qualname__}"}
    if isinstance(model, Segmentation3DTask):
        patch = list(model.patch)
        c = int(h["in_channels"])
        example, other = torch.randn(2, c, *patch), torch.randn(3, c, *patch)
        dynamic: dict[int, Any] = {0: batch}
        meta |= {"kind": "segmentation3d", "patch_size": patch, "spacing": h.get("spacing")}
    elif isinstance(model, SegmentationTask):
        c = int(h["in_channels"])
        # At least two blocks of 32 per side: with one, the deepest feature map is 1 × 1
        # and the exported graph would hold only for that (broadcasting specialises).
        example, other = torch.randn(2, c, 64, 64), torch.randn(3, c, 96, 128)
        ys, xs = torch.export.Dim("y32", min=2, max=512), torch.export.Dim("x32", min=2, max=512)
        dynamic = {0: batch, 2: 32 * ys, 3: 32 * xs}
        meta |= {"kind": "segmentation", "multiple": 32, "min_size": 64}
    elif isinstance(model, ClassificationTask):
        size = int(getattr(datamodule, "hparams", {}).get("image_size", 224) or 224)
        c = int(h.get("in_channels") or 3)
        example, other = torch.randn(2, c, size, size), torch.randn(3, c, size, size)
        dynamic = {0: batch}
        meta |= {"kind": "classification", "image_size": size, "classes": model.class_names}
    else:
        raise ConfigError(
            f"medlit.export: {type(model).__name__} is not exported yet (segmentation and "
            "classification are)"
        )
    if isinstance(model, SegmentationTask):
        meta |= {
            "regions": list(model.region_names),
            "target": h["target"],
            "activation": "sigmoid" if h["target"] == "regions" else "softmax",
            "threshold": h.get("threshold"),
        }
    meta |= {"in_channels": int(example.shape[1]), "input": "image", "output": "logits"}
    return Exportable(model.model.eval(), example, other, dynamic, meta)


def _onnx(e: Exportable, path: Path) -> float:
    import onnx
    import onnxruntime as ort

    program = torch.onnx.export(
        e.network,
        (e.example,),
        dynamo=True,
        dynamic_shapes=(e.dynamic,),
        input_names=["image"],
        output_names=["logits"],
    )
    program.save(str(path))
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    diff = 0.0
    for x in (e.example, e.other):
        with torch.no_grad():
            want = e.network(x).float().numpy()
        got = session.run(None, {"image": x.numpy()})[0]
        diff = max(diff, float(np.abs(got - want).max()))
    proto = onnx.load(str(path))
    entry = proto.metadata_props.add()
    entry.key, entry.value = "medlit", json.dumps({**e.meta, "parity_max_abs_diff": diff})
    onnx.save(proto, str(path))
    return diff


def _torch_export(e: Exportable, path: Path) -> float:
    program = torch.export.export(e.network, (e.example,), dynamic_shapes=(e.dynamic,))
    diff = 0.0
    for x in (e.example, e.other):
        with torch.no_grad():
            want = e.network(x).float()
            got = program.module()(x).float()
        diff = max(diff, float((got - want).abs().max()))
    meta = json.dumps({**e.meta, "parity_max_abs_diff": diff})
    torch.export.save(program, str(path), extra_files={"medlit.json": meta})
    return diff


class OnnxNetwork(torch.nn.Module):
    """An exported ONNX network run by onnxruntime, in place of a task's PyTorch network
    (``medlit.predict --model``): logits from a batch, on the input's device."""

    def __init__(self, path: Path, threads: int | None = None, min_size: int = 0) -> None:
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
        self.path, self.min_size = path, min_size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2:]
        if x.ndim == 4 and min(h, w) < self.min_size:  # smaller slices: zero-padded
            x = torch.nn.functional.pad(
                x, (0, max(self.min_size - w, 0), 0, max(self.min_size - h, 0))
            )
        out = self.session.run(None, {"image": x.detach().float().cpu().numpy()})[0]
        return torch.from_numpy(out[..., :h, :w] if x.ndim == 4 else out).to(x.device)


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
    preprocessing state loaded from the file's metadata. Returns the metadata."""
    if path.suffix != ".onnx":
        raise ConfigError(f"--model {path}: give an ONNX file from medlit.export")
    meta = read_metadata(path)
    task = f"{type(model).__module__}.{type(model).__qualname__}"
    if meta.get("task") != task:
        raise ConfigError(
            f"--model {path} was exported from a {meta.get('task')}, the config's task is {task}"
        )
    names = list(getattr(model, "region_names", None) or getattr(model, "class_names", []) or [])
    theirs = meta.get("regions") or meta.get("classes") or []
    channels = int(model.hparams.get("in_channels") or 3)
    if list(theirs) != names or int(meta.get("in_channels", channels)) != channels:
        raise ConfigError(
            f"--model {path}: exported for {meta.get('in_channels')} input channels and "
            f"{theirs}; the config's model takes {channels} and predicts {names}"
        )
    if meta.get("data_state") and hasattr(datamodule, "load_state_dict"):
        datamodule.load_state_dict(meta["data_state"])
    model.model = OnnxNetwork(path, torch.get_num_threads(), int(meta.get("min_size", 0)))
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
    sys.exit(run_main(main))
