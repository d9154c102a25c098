"""Framework overhead: training steps of ``medlit.fit`` against a hand-written PyTorch loop
with the same network, data, loss, optimizer and precision.

The two loops run in one process, step by step in turn: after every step of medlit's
run a callback makes one step of the plain loop and times it on its own. A slow spell of
the machine then hits both loops alike, which separate runs on a shared 2-core machine
cannot promise. medlit's step time is the whole cycle from the end of one plain step to
the next (fetching the batch, forward, backward, optimizer, logging to MLflow, callbacks,
progress bar); the plain step's is fetching its batch, forward, backward and optimizer.
Both read batches from medlit's BraTS data module in the main process (no workers), so
loading costs the same on both sides and takes no core from training.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import segmentation_models_pytorch as smp
import torch
import yaml
from pytorch_lightning import Callback, LightningModule, Trainer

from benchmarks.common import MODEL, Context, Row, Section, median, spread


class PlainLoop:
    """The hand-written loop: what a PyTorch user writes without a framework."""

    def __init__(self, data: dict[str, Any], model: dict[str, Any], lr: float, weight_decay: float):
        from medlit.datamodules import BraTSDataModule

        dm = BraTSDataModule(**data)
        dm.setup("fit")
        self.loader = dm.train_dataloader()
        self.batches = iter(self.loader)
        # The network medlit's SegmentationTask builds, straight from SMP.
        self.net = smp.create_model(
            model["arch"],
            encoder_name=model["encoder"],
            encoder_weights=None,
            in_channels=model["in_channels"],
            classes=model["num_classes"],
            **model["model_kwargs"],
        )
        self.net.train()
        self.optimizer = torch.optim.AdamW(self.net.parameters(), lr=lr, weight_decay=weight_decay)
        self.dice = smp.losses.DiceLoss("multilabel", from_logits=True)
        self.bce = torch.nn.BCEWithLogitsLoss()
        self.losses: list[float] = []

    def step(self) -> None:
        try:
            batch = next(self.batches)
        except StopIteration:
            self.batches = iter(self.loader)
            batch = next(self.batches)
        with torch.enable_grad():
            logits = self.net(batch["image"])
            loss = self.dice(logits, batch["mask"]) + self.bce(logits, batch["mask"].float())
            self.optimizer.zero_grad()
            loss.backward()
            self.optimizer.step()
        self.losses.append(loss.item())  # a plain loop reads its loss to print it


class Interleaved(Callback):
    """Runs one plain-loop step after each of medlit's training steps and records both
    step times (seconds) to ``out`` as JSON when training ends.

    Args:
        plain: keyword arguments of :class:`PlainLoop`.
        out: the JSON file written at the end.
    """

    def __init__(self, plain: dict[str, Any], out: str) -> None:
        self.plain_args, self.out = plain, out
        self.medlit: list[float] = []
        self.plain: list[float] = []
        self._resumed: float | None = None

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        self.loop = PlainLoop(**self.plain_args)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        now = time.perf_counter()
        if self._resumed is not None:
            self.medlit.append(now - self._resumed)
        start = time.perf_counter()
        self.loop.step()
        self.plain.append(time.perf_counter() - start)
        self._resumed = time.perf_counter()

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        # medlit's first cycle is only measured from the end of the first plain step.
        Path(self.out).write_text(json.dumps({"medlit": self.medlit, "plain": self.plain[1:]}))


def _config(ctx: Context, steps: int, out: Path) -> dict[str, Any]:
    s = ctx.sizes
    data = {
        "root": str(ctx.data["brats_root"]),
        "cache_dir": str(ctx.data["cache_dir"]),
        "split": {"val_fraction": 0.0, "test_fraction": 0.0},
        "patch_size": s.train_patch,
        "loader": {"batch_size": s.train_batch, "num_workers": 0},
        "foreground_fraction": 0.5,
        "samples_per_epoch": s.train_batch * (steps + 1),
    }
    lr, weight_decay = 0.002, 0.0001
    plain = {"data": data, "model": MODEL, "lr": lr, "weight_decay": weight_decay}
    return {
        "seed_everything": 42,
        "trainer": {
            "max_steps": steps,
            "max_epochs": 1,
            "accelerator": "cpu",
            "devices": 1,
            "precision": "32-true",
            "log_every_n_steps": 20,
            "num_sanity_val_steps": 0,
            "limit_val_batches": 0,
            "limit_test_batches": 0,
            "default_root_dir": str(ctx.workdir / "lightning"),
            "logger": {
                "class_path": "medlit.tracking.MLflowTracker",
                "init_args": {
                    "experiment_name": "benchmarks",
                    "tracking_uri": f"sqlite:///{ctx.workdir / 'mlruns' / 'mlflow.db'}",
                },
            },
            "callbacks": [
                {
                    "class_path": "benchmarks.overhead.Interleaved",
                    "init_args": {"plain": plain, "out": str(out)},
                }
            ],
        },
        "model": {
            "class_path": "medlit.tasks.SegmentationTask",
            "init_args": {
                **MODEL,
                "target": "regions",
                "region_names": ["WT", "TC", "ET"],
                "loss": "dice_ce",
                "lr": lr,
                "weight_decay": weight_decay,
                "log_images": False,
            },
        },
        "data": {"class_path": "medlit.datamodules.BraTSDataModule", "init_args": data},
    }


def run(ctx: Context, log=print) -> Section:
    from medlit.fit import main as fit

    s = ctx.sizes
    steps = s.warmup_steps + ctx.repeats * s.steps_per_repeat + 1
    out = ctx.workdir / "overhead.json"
    config = ctx.workdir / "overhead.yaml"
    (ctx.workdir / "mlruns").mkdir(exist_ok=True)
    config.write_text(yaml.safe_dump(_config(ctx, steps, out), sort_keys=False))
    start = time.perf_counter()
    fit([str(config)])
    log(f"  medlit.fit with the interleaved plain loop: {time.perf_counter() - start:.1f} s")
    times = json.loads(out.read_text())
    medlit = np.array(times["medlit"][s.warmup_steps :])
    plain = np.array(times["plain"][s.warmup_steps : s.warmup_steps + len(medlit)])
    n = s.steps_per_repeat
    blocks = [(medlit[i : i + n], plain[i : i + n]) for i in range(0, len(medlit) - n + 1, n)]
    medlit_ms = [1e3 * median(m) for m, _ in blocks]
    plain_ms = [1e3 * median(p) for _, p in blocks]
    ratio = median(medlit_ms) / median(plain_ms)
    section = Section("Framework overhead")
    section.rows.append(
        Row(
            f"Training step ({s.train_batch}×4×{s.train_patch}², U-Net ResNet-18, fp32, CPU): "
            "medlit.fit vs a hand-written PyTorch loop",
            f"{median(medlit_ms):.0f} ms/step",
            f"{median(plain_ms):.0f} ms/step",
            ratio,
            "time ratio ≤ 1.05x",
            ratio <= 1.05,
        )
    )
    paired = medlit / plain
    section.details += [
        f"{len(blocks)} repeats of {n} steps after {s.warmup_steps} warm-up steps; each repeat's "
        "median step, then the median over repeats.",
        "",
        "| loop | ms/step: median over repeats (min-max of repeat medians) |",
        "| --- | --- |",
        f"| medlit.fit (Lightning, MLflow logging, medlit's callbacks) | {spread(medlit_ms, '{:.0f}')} |",
        f"| hand-written loop | {spread(plain_ms, '{:.0f}')} |",
        "",
        f"Step by step (each medlit step over the plain step that followed it): median "
        f"{median(paired):.3f}, middle half {np.percentile(paired, 25):.3f}-"
        f"{np.percentile(paired, 75):.3f}.",
    ]
    if ratio > 1.05:
        overhead = median(medlit_ms) - median(plain_ms)
        section.misses.append(
            f"**Framework overhead ({ratio:.3f}x, {overhead:.0f} ms a step).** Lightning's "
            "loop (batch fetching through its profiler hooks, `self.log` bookkeeping, the "
            "progress bar, medlit's callbacks and MLflow logging every 20 steps) costs a "
            "roughly fixed few ms a step, so its share grows as steps get shorter; on a "
            "shared 2-core machine the step-to-step spread is itself several per cent. "
            "Larger batches or `log_every_n_steps` and `enable_progress_bar: false` shrink it."
        )
    return section
