"""LUNA16 YOLO: medlit's Lightning training of the Ultralytics network against
Ultralytics' own ``model.train`` on the same LUNA16 slices, for the same number of steps:
the time per training step, and the test CPM of each side's final weights, both scored
by medlit's LUNA16 evaluation (whole scans, slices merged into 3D candidates, the
official FROC/CPM).

Both sides: YOLOv8n from its YAML (3 input channels: the slice and its two neighbours,
1 class, random init), 2.5D crops of the demo's geometry, the same batch, AdamW at
lr 0.002 with weight decay 5e-4 and a cosine schedule, the same loader workers, one
torch thread. medlit draws its crops afresh each epoch (a nodule-cutting slice half the
time, albumentations' flips, affine and brightness/contrast). Ultralytics trains on
medlit's crops of one epoch, drawn without augmentation and written as PNG (the windowed
HU in [0, 1] as 0-255) with YOLO label files, augmented by its own pipeline set to the
nearest of medlit's (flips 0.5 / 0.2, ±10°, scale 0.1, value 0.05; no mosaic, no hue or
saturation: the channels are CT slices, not colours); ``nbs`` is the batch, so every
batch is one optimizer step as in medlit (Ultralytics' default accumulates to 64 images
a step); ``plots=False`` and ``amp=False`` (its AMP check and plot fonts would be
downloaded); its warm-up is at least 100 iterations by design. Ultralytics saves its EMA
weights, which are what is scored for it; medlit has no EMA.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import yaml
from pytorch_lightning import Callback, LightningModule, Trainer

from benchmarks.common import REPO, Context, Row, Section, median

SETUP = {
    "full": {"scans": 100, "patch": 96, "batch": 8, "samples": 480, "epochs": 8},
    "tiny": {"scans": 10, "patch": 32, "batch": 2, "samples": 4, "epochs": 1},
}
SHAPE = ((40, 56), (96, 96), (96, 96))


class StepEnds(Callback):
    """Writes the ``perf_counter`` time of every training step's end to ``out``."""

    def __init__(self, out: str) -> None:
        self.out = out
        self.ends: list[float] = []

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, *args) -> None:
        self.ends.append(time.perf_counter())

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        Path(self.out).write_text(json.dumps(self.ends))


def _data(ctx: Context) -> Path:
    from medlit.datasets.io.files import is_synthetic
    from medlit.datasets.luna16.phantom import write_luna16

    root = ctx.workdir / "LUNA16-yolo"
    if not is_synthetic(root):
        write_luna16(root, SETUP[ctx.sizes.name]["scans"], seed=42, shape_range=SHAPE)
    return root


def _config(ctx: Context, root: Path, folder: Path) -> Path:
    s = SETUP[ctx.sizes.name]
    doc = yaml.safe_load((REPO / "experiments/demo/luna16_yolo.yaml").read_text())
    doc["trainer"].update(
        max_epochs=s["epochs"],
        accelerator="cpu",
        limit_val_batches=0,  # no validation: the last weights are tested, as Ultralytics'
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=str(folder / "runs"),
        callbacks=[
            {
                "class_path": "benchmarks.yolo.StepEnds",
                "init_args": {"out": str(folder / "ends.json")},
            }
        ],
    )
    doc["trainer"]["logger"]["init_args"]["tracking_uri"] = f"sqlite:///{folder / 'mlflow.db'}"
    doc["keep_last_checkpoint"] = True
    doc["data"]["init_args"].update(
        root=str(root),
        demo=False,
        cache_dir=str(ctx.workdir / "luna16-yolo-cache"),
        patch_size=s["patch"],
        samples_per_epoch=s["samples"],
    )
    doc["data"]["init_args"]["loader"].update(
        batch_size=s["batch"], num_workers=ctx.sizes.num_workers
    )
    path = folder / "medlit.yaml"
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


def _export(config: Path, out: Path) -> Path:
    """medlit's training crops of one epoch, without augmentation, as Ultralytics' dataset
    (PNG images, YOLO label files, a data YAML); returns the YAML."""
    import cv2

    from medlit.datamodules import LUNA16DataModule

    args = yaml.safe_load(config.read_text())["data"]["init_args"]
    dm = LUNA16DataModule(**{**args, "augment": False})
    dm.prepare_data()
    dm.setup("fit")
    images, labels = out / "images" / "train", out / "labels" / "train"
    images.mkdir(parents=True)
    labels.mkdir(parents=True)
    ds = dm.datasets["train"]
    np.random.seed(0)
    for i in range(len(ds)):
        item = ds[i]
        hwc = np.round(item["image"].numpy().transpose(1, 2, 0) * 255).astype(np.uint8)
        # Ultralytics reads BGR and turns it to RGB: the channels written reversed reach
        # the network in medlit's order (the slice below, the slice, the slice above).
        cv2.imwrite(str(images / f"{i:05d}.png"), hwc[..., ::-1])
        rows = [f"0 {x:.6f} {y:.6f} {w:.6f} {h:.6f}" for x, y, w, h in item["boxes"].tolist()]
        (labels / f"{i:05d}.txt").write_text("\n".join(rows) + ("\n" if rows else ""))
    data = out / "data.yaml"
    data.write_text(
        yaml.safe_dump(
            {
                "path": str(out),
                "train": "images/train",
                "val": "images/train",
                "names": {0: "nodule"},
            }
        )
    )
    return data


def _medlit(config: Path) -> tuple[list[float], float, Path]:
    """Step times (s), test CPM of the last weights, and the last checkpoint."""
    from medlit.fit import main as fit

    metrics = fit([str(config)])
    ends = json.loads((config.parent / "ends.json").read_text())
    [last] = config.parent.glob("**/last.ckpt")  # kept: keep_last_checkpoint
    return list(np.diff(ends)), metrics["test/cpm"], last


def _ultralytics(ctx: Context, data: Path, folder: Path) -> tuple[list[float], Path, int]:
    """Step times (s), Ultralytics' last checkpoint, and its torch threads."""
    from ultralytics import YOLO

    s = SETUP[ctx.sizes.name]
    ends: list[float] = []
    threads = []
    with _integrations_off():
        model = YOLO("yolov8n.yaml", task="detect")
        return _train(model, ctx, data, folder, s, ends, threads)


@contextlib.contextmanager
def _integrations_off() -> Iterator[None]:
    """Ultralytics' logger integrations (MLflow is installed here: it logged into the
    MLflow store medlit's run had set, and turned on MLflow autologging for Lightning in
    this process) and its usage analytics off for the run, the user's settings restored
    after it (Ultralytics keeps them in its settings file)."""
    from ultralytics.utils import SETTINGS

    keys = ("clearml", "comet", "dvc", "mlflow", "raytune", "tensorboard", "wandb", "sync")
    saved = {k: SETTINGS[k] for k in keys if k in SETTINGS}
    SETTINGS.update(dict.fromkeys(saved, False))
    try:
        yield
    finally:
        SETTINGS.update(saved)


def _train(model, ctx: Context, data: Path, folder: Path, s: dict, ends: list, threads: list):
    import torch

    model.add_callback("on_train_batch_end", lambda trainer: ends.append(time.perf_counter()))
    model.add_callback("on_train_start", lambda trainer: threads.append(torch.get_num_threads()))
    model.train(
        data=str(data),
        epochs=s["epochs"],
        batch=s["batch"],
        nbs=s["batch"],
        imgsz=s["patch"],
        workers=ctx.sizes.num_workers,
        device="cpu",
        optimizer="AdamW",
        lr0=0.002,
        lrf=0.01,
        cos_lr=True,
        momentum=0.9,
        weight_decay=0.0005,
        warmup_epochs=1,
        pretrained=False,
        amp=False,
        plots=False,
        val=False,
        mosaic=0.0,
        close_mosaic=0,
        hsv_h=0.0,
        hsv_s=0.0,
        hsv_v=0.05,
        degrees=10.0,
        translate=0.0,
        scale=0.1,
        fliplr=0.5,
        flipud=0.2,
        seed=42,
        deterministic=False,
        project=str(folder),
        name="train",
        exist_ok=True,
        verbose=False,
    )
    return list(np.diff(ends)), folder / "train" / "weights" / "last.pt", threads[0]


def _score_ultralytics(config: Path, medlit_ckpt: Path, weights: Path) -> float:
    """Test CPM of Ultralytics' weights through medlit's evaluation: medlit's last
    checkpoint with its network's weights replaced by Ultralytics' (the same
    ``DetectionModel`` built from the same YAML: the same parameter names)."""
    import torch

    from medlit.evaluate import main as evaluate

    saved = torch.load(weights, map_location="cpu", weights_only=False)
    net = (saved.get("ema") or saved["model"]).float().state_dict()
    ckpt = torch.load(medlit_ckpt, map_location="cpu", weights_only=True)
    ours = {k.removeprefix("model."): k for k in ckpt["state_dict"] if k.startswith("model.")}
    if set(ours) != set(net):
        raise RuntimeError(
            f"Ultralytics' and medlit's networks differ: {sorted(set(ours) ^ set(net))[:10]}"
        )
    for name, key in ours.items():
        ckpt["state_dict"][key] = net[name].to(ckpt["state_dict"][key].dtype)
    path = config.parent / "ultralytics-weights.ckpt"
    torch.save(ckpt, path)
    return evaluate([str(config), "--ckpt_path", str(path), "--split", "test"])["test/cpm"]


def run(ctx: Context, log=print) -> Section:
    s = SETUP[ctx.sizes.name]
    section = Section("LUNA16 YOLO: medlit's Lightning training vs Ultralytics' trainer")
    folder = ctx.workdir / "yolo"
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    root = _data(ctx)
    config = _config(ctx, root, folder)
    data = _export(config, folder / "ultralytics-data")
    start = time.perf_counter()
    medlit_steps, medlit_cpm, last = _medlit(config)
    log(f"  medlit: {time.perf_counter() - start:.0f} s")
    start = time.perf_counter()
    ultra_steps, weights, threads = _ultralytics(ctx, data, folder / "ultralytics")
    log(f"  Ultralytics: {time.perf_counter() - start:.0f} s")
    ultra_cpm = _score_ultralytics(config, last, weights)
    steps = s["epochs"] * s["samples"] // s["batch"]
    # The first step of each epoch waits for the loader's workers: left out on both sides.
    per_epoch = s["samples"] // s["batch"]

    def steady(times: list[float]) -> list[float]:
        return [t for i, t in enumerate(times, start=1) if i % per_epoch != 0] or times

    ms = {
        "medlit": 1e3 * median(steady(medlit_steps)),
        "Ultralytics": 1e3 * median(steady(ultra_steps)),
    }
    ratio = ms["Ultralytics"] / ms["medlit"]
    what = f"LUNA16 YOLOv8n, {s['batch']}×3×{s['patch']}² crops, {steps} steps"
    section.rows += [
        Row(
            f"{what}: training step, medlit (Lightning) vs Ultralytics `model.train`",
            f"{ms['medlit']:.0f} ms/step",
            f"{ms['Ultralytics']:.0f} ms/step",
            ratio,
            "speed-up ≥ 0.9x",
            ratio >= 0.9,
        ),
        Row(
            f"{what}: test CPM of the final weights (medlit's LUNA16 evaluation), medlit vs "
            "Ultralytics `model.train`",
            f"{medlit_cpm:.3f}",
            f"{ultra_cpm:.3f}",
            medlit_cpm - ultra_cpm,
            "difference ≥ -0.05 (one run each)",
            medlit_cpm - ultra_cpm >= -0.05,
        ),
    ]
    section.details += [
        f"{s['scans']} LUNA16 phantoms ({SHAPE[0][0]}-{SHAPE[0][1]} × 96 × 96 voxels, "
        "resampled to the demo's 1.5 × 1.5 × 2 mm), the demo's split (validation subset 8, "
        f"test subset 9); {s['epochs']} epochs of {s['samples']} crops, one run each. Step "
        "times are between consecutive step ends, an epoch's first step (the workers' "
        f"start) left out; Ultralytics ran on {threads} torch thread(s). The CPM row's ratio "
        "column is medlit's CPM minus Ultralytics'.",
        "",
        "| side | ms/step: median (min-max, n) | test CPM |",
        "| --- | --- | --- |",
        f"| medlit | {ms['medlit']:.0f} ({1e3 * min(medlit_steps):.0f}-{1e3 * max(medlit_steps):.0f}, n={len(medlit_steps)}) | {medlit_cpm:.3f} |",
        f"| Ultralytics | {ms['Ultralytics']:.0f} ({1e3 * min(ultra_steps):.0f}-{1e3 * max(ultra_steps):.0f}, n={len(ultra_steps)}) | {ultra_cpm:.3f} |",
    ]
    for row in section.rows:
        if not row.met:
            section.misses.append(
                f"**{row.comparison}: {row.medlit} vs {row.other}.** One run a side on a "
                "2-core machine; the sides differ in what is described above (fresh crops "
                "per epoch against one epoch's crops re-augmented, EMA weights on "
                "Ultralytics' side)."
            )
    shutil.rmtree(folder / "runs", ignore_errors=True)
    return section
