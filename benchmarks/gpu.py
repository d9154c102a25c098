"""GPU training throughput: images per second of the BraTS 2D U-Net, the BraTS 3D DynUNet,
the ISIC classifier and the LUNA16 YOLO detector under ``bf16-mixed`` and
``channels_last``, and the share of each step spent waiting for data.

``python -m benchmarks --only gpu`` (not part of the default run). Each network is its
README demo's config, unchanged but for the settings a GPU run gets: ``precision:
bf16-mixed``, ``channels_last: true``, a GPU batch (``BATCH``), loader workers for the
machine's cores, a fixed number of steps and no validation or test. Each runs in a
process of its own (``python -m medlit.fit``) with :class:`StepClock` among its
callbacks, which synchronises CUDA at the start and end of every training step: the
step's time is its forward, backward and optimizer on the device; the time between one
step's end and the next one's start is the loop's wait for the next batch (the data
loader, the host-to-device copy and Lightning's hooks between steps, so an upper bound
of the data wait). The first ``WARMUP`` steps (cuDNN autotuning, allocator growth,
worker start-up) are not counted.

Without a CUDA device the section says so and measures nothing; ``--tiny`` then runs the
same processes on the CPU in fp32 for a few steps on small demo data, which checks the
module runs (its numbers mean nothing).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import yaml
from pytorch_lightning import Callback, LightningModule, Trainer

from benchmarks.common import REPO, Context, Row, Section, median, with_benchmarks
from benchmarks.report import GPU_SECTION

EXPERIMENTS = REPO / "experiments" / "demo"
TARGET_WAIT = 0.10
WARMUP = {"full": 20, "tiny": 1}
STEPS = {"full": 120, "tiny": 3}
# name -> (demo config, GPU batch, tiny overrides: small demo data for the CPU check)
MODELS: dict[str, tuple[str, int, dict[str, Any]]] = {
    "BraTS 2D U-Net (ResNet-18)": (
        "brats_unet.yaml",
        64,
        {"data.init_args.demo_cases": 6, "data.init_args.patch_size": 64},
    ),
    "BraTS 3D DynUNet": (
        "brats_unet3d.yaml",
        4,
        {"data.init_args.demo_cases": 6},
    ),
    "ISIC classifier": ("isic_classifier.yaml", 128, {"data.init_args.demo_lesions": 40}),
    "LUNA16 YOLOv8n": (
        "luna16_yolo.yaml",
        64,
        {"data.init_args.demo_scans": 12, "data.init_args.patch_size": 64},
    ),
}


class StepClock(Callback):
    """Times every training step on the device and the wait between steps within an
    epoch (a wait across an epoch's end, with its checkpoint and the loader's restart, is
    left out); writes ``{"batch": N, "step": [...], "wait": [...]}`` (seconds) to ``out``
    when training ends, ``wait[i]`` the wait before ``step[i]`` (None for an epoch's
    first)."""

    def __init__(self, out: str) -> None:
        self.out = out
        self.step: list[float] = []
        self.wait: list[float] = []
        self.batch = 0
        self._start = self._end = None

    @staticmethod
    def _now() -> float:
        import torch

        if torch.cuda.is_available():
            torch.cuda.synchronize()
        return time.perf_counter()

    @staticmethod
    def _size(batch: Any) -> int:
        """Images in a batch: the first dimension of its first 4D or 5D tensor."""
        import torch

        values = batch.values() if isinstance(batch, dict) else batch
        for v in values if isinstance(values, list | tuple) else list(values):
            if isinstance(v, torch.Tensor) and v.ndim >= 4:
                return int(v.shape[0])
        raise ValueError("StepClock: the batch holds no image tensor")

    def on_train_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._end = None

    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch, idx):
        self._start = self._now()
        self.wait.append(None if self._end is None else self._start - self._end)
        self.batch = self._size(batch)

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, *args) -> None:
        self._end = self._now()
        self.step.append(self._end - self._start)

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        Path(self.out).write_text(
            json.dumps({"batch": self.batch, "step": self.step, "wait": self.wait})
        )


def _set(doc: dict[str, Any], dotted: str, value: Any) -> None:
    *path, last = dotted.split(".")
    for key in path:
        doc = doc.setdefault(key, {})
    doc[last] = value


def config(ctx: Context, name: str, gpu: bool) -> Path:
    """The demo's config with the GPU run's settings, written under the work folder."""
    file, batch, tiny = MODELS[name]
    size = ctx.sizes.name
    doc = yaml.safe_load((EXPERIMENTS / file).read_text())
    folder = ctx.workdir / "gpu" / file.removesuffix(".yaml")
    folder.mkdir(parents=True, exist_ok=True)
    workers = max(1, min(8, (os.cpu_count() or 2) - 2)) if gpu else 0
    trainer = {
        "accelerator": "gpu" if gpu else "cpu",
        "devices": 1,
        "precision": "bf16-mixed" if gpu else "32-true",
        "max_steps": WARMUP[size] + STEPS[size],
        "max_epochs": 1000,  # max_steps ends the run (the schedules need a length)
        "limit_val_batches": 0,
        "limit_test_batches": 0,
        "num_sanity_val_steps": 0,
        "enable_progress_bar": False,
        "enable_model_summary": False,
        "default_root_dir": str(folder / "runs"),
        "logger": False,
        "callbacks": [
            {
                "class_path": "benchmarks.gpu.StepClock",
                "init_args": {"out": str(folder / "steps.json")},
            }
        ],
    }
    for k, v in trainer.items():
        _set(doc, f"trainer.{k}", v)
    doc["trainer"].pop("check_val_every_n_epoch", None)
    doc["channels_last"] = True
    _set(doc, "data.init_args.root", str(ctx.workdir / "gpu-data" / file.removesuffix(".yaml")))
    _set(doc, "data.init_args.cache_dir", str(ctx.workdir / "gpu-cache"))
    _set(doc, "data.init_args.loader.batch_size", batch if gpu else 2)
    _set(doc, "data.init_args.loader.num_workers", workers)
    if "samples_per_epoch" in doc["data"]["init_args"]:  # patch datasets; ISIC's is its images
        steps = WARMUP[size] + STEPS[size] + 1  # one epoch: no epoch boundary among them
        _set(doc, "data.init_args.samples_per_epoch", (batch if gpu else 2) * steps)
    if size == "tiny":
        for k, v in tiny.items():
            _set(doc, k, v)
    path = folder / "config.yaml"
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


def measure(ctx: Context, name: str, gpu: bool, log) -> dict[str, float]:
    path = config(ctx, name, gpu)
    out = path.parent / "steps.json"
    out.unlink(missing_ok=True)
    start = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-m", "medlit.fit", str(path)],
        cwd=path.parent,
        env=with_benchmarks(),
        capture_output=True,
        text=True,
    )
    if done.returncode != 0 or not out.exists():
        raise RuntimeError(f"{name}: medlit.fit failed:\n{done.stderr[-3000:]}")
    log(f"  {name}: {time.perf_counter() - start:.0f} s")
    steps = json.loads(out.read_text())
    warm = WARMUP[ctx.sizes.name]
    pairs = [(s, w) for s, w in zip(steps["step"], steps["wait"], strict=True)][warm:]
    pairs = [(s, w) for s, w in pairs if w is not None]  # not across an epoch's end
    step, wait = [s for s, _ in pairs], [w for _, w in pairs]
    total = sum(step) + sum(wait)
    return {
        "images/s": steps["batch"] * len(step) / total,
        "wait": sum(wait) / total,
        "step_ms": 1e3 * median(step),
        "wait_ms": 1e3 * median(wait),
        "batch": steps["batch"],
        "steps": len(step),
        "workers": yaml.safe_load(path.read_text())["data"]["init_args"]["loader"]["num_workers"],
    }


def run(ctx: Context, log=print) -> Section:
    import torch

    section = Section(f"{GPU_SECTION} (bf16-mixed, channels_last)")
    gpu = torch.cuda.is_available()
    if not gpu and ctx.sizes.name != "tiny":
        section.notes.append(
            "GPU rows were not measured: no CUDA device on this machine "
            "(`python -m benchmarks --only gpu` measures them on a machine with one)."
        )
        return section
    device = torch.cuda.get_device_name(0) if gpu else "CPU, fp32 (a check that it runs)"
    results = {name: measure(ctx, name, gpu, log) for name in MODELS}
    table = [
        "| network | batch | loader workers | steps timed | images/s | step (ms, median) | "
        "wait (ms, median) | waiting |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for name, r in results.items():
        section.rows.append(
            Row(
                f"{name} training on {device}: share of step time waiting for data",
                f"{r['images/s']:.0f} images/s; {100 * r['wait']:.1f} % waiting",
                "-",
                r["wait"],
                f"< {100 * TARGET_WAIT:.0f} % waiting",
                r["wait"] < TARGET_WAIT,
            )
        )
        table.append(
            f"| {name} | {r['batch']} | {r['workers']} | {r['steps']} | {r['images/s']:.0f} | "
            f"{r['step_ms']:.1f} | {r['wait_ms']:.1f} | {100 * r['wait']:.1f} % |"
        )
        if r["wait"] >= TARGET_WAIT:
            section.misses.append(
                f"**{name} waits {100 * r['wait']:.0f} % of its steps for data.** The loader's "
                f"{r['workers']} workers do not keep up with the device: more workers, or "
                "cheaper augmentation per sample."
            )
    section.details += [
        "Each demo's network, data and augmentation; a GPU batch, loader workers for the "
        f"machine's {os.cpu_count()} cores (at most 8), {WARMUP[ctx.sizes.name]} warm-up "
        "steps not counted; images/s over the counted steps and waits. The ratio column is "
        "the share of time waiting (lower is better).",
        "",
        *table,
    ]
    return section
