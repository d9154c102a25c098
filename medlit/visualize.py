"""Figures logged with runs: image slices with reference and prediction overlaid."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # headless: runs on servers and CI without a display

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

COLOURS = ["#ffd400", "#ff3b30", "#00c7ff", "#34c759", "#af52de"]


def save_overlays(shown: Sequence[dict], region_names: Sequence[str], path: str | Path) -> None:
    """One row per case: the image, the reference contours, the predicted contours.

    Each item of ``shown`` has ``image`` (Y, X), ``ref``/``pred`` (R, Y, X) booleans,
    ``case_id`` and ``z`` (the slice index); with ``cam`` (Y, X, in [0, 1]) and
    ``cam_region``, a fourth column shows that explanation over the image.
    """
    columns = 4 if any("cam" in item for item in shown) else 3
    fig, axes = plt.subplots(
        len(shown), columns, figsize=(3 * columns, 3 * len(shown)), squeeze=False
    )
    for row, item in zip(axes, shown, strict=True):
        if columns == 4:  # Seg-Grad-CAM of one region (medlit.explain) over the image
            ax = row[3]
            ax.imshow(item["image"], cmap="gray")
            if "cam" in item:  # the slice's own range: the case's peak may lie elsewhere
                top = float(np.max(item["cam"])) or 1.0
                ax.imshow(item["cam"], cmap="jet", alpha=0.45, vmin=0, vmax=top)
            ax.set_axis_off()
            ax.set_title(
                f"{item['case_id']} Grad-CAM {item.get('cam_region', '')} (slice-scaled)",
                fontsize=8,
            )
        for ax, title, masks in zip(
            row[:3],
            ("image", "reference", "prediction"),
            (None, item["ref"], item["pred"]),
            strict=True,
        ):
            ax.imshow(item["image"], cmap="gray")
            ax.set_axis_off()
            ax.set_title(f"{item['case_id']} z={item['z']} {title}", fontsize=8)
            if masks is None:
                continue
            for k, mask in enumerate(masks):
                if np.any(mask):
                    ax.contour(
                        mask.astype(float),
                        levels=[0.5],
                        colors=COLOURS[k % len(COLOURS)],
                        linewidths=1.0,
                    )
    handles = [
        plt.Line2D([], [], color=COLOURS[k % len(COLOURS)], label=n)
        for k, n in enumerate(region_names)
    ]
    fig.legend(handles=handles, loc="lower center", ncol=len(handles), fontsize=8)
    fig.tight_layout(rect=(0, 0.04, 1, 1))
    fig.savefig(path, dpi=100)
    plt.close(fig)


def save_confusion(
    matrix: np.ndarray, names: Sequence[str], path: str | Path, title: str | None = None
) -> None:
    """Confusion matrix (rows: truth, columns: prediction), counts and row-normalised
    colour (the share of each true class), with a title saying which images it counts."""
    k = len(names)
    fig, ax = plt.subplots(figsize=(1.0 + 0.6 * k, 0.8 + 0.6 * k))
    rates = matrix / np.maximum(matrix.sum(1, keepdims=True), 1)
    ax.imshow(rates, cmap="Blues", vmin=0, vmax=1)
    for i in range(k):
        for j in range(k):
            ax.text(
                j,
                i,
                int(matrix[i, j]),
                ha="center",
                va="center",
                fontsize=7,
                color="white" if rates[i, j] > 0.5 else "black",
            )
    ax.set_xticks(range(k), names, rotation=45, fontsize=7)
    ax.set_yticks(range(k), names, fontsize=7)
    ax.set_xlabel("prediction")
    ax.set_ylabel("truth")
    if title:
        ax.set_title(title, fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def save_gradcam(
    task,
    items: Sequence[dict],
    names: Sequence[str],
    path: str | Path,
    mean: Sequence[float] = (0.485, 0.456, 0.406),
    std: Sequence[float] = (0.229, 0.224, 0.225),
) -> None:
    """Grad-CAM (captum) of the predicted class on the last convolution, over each image.

    ``items`` are dataset items with a normalised ``image`` (3, H, W) and ``label``.
    """
    import torch
    from captum.attr import LayerAttribution, LayerGradCam

    convs = [m for m in task.model.modules() if isinstance(m, torch.nn.Conv2d)]
    if not convs:
        return  # e.g. a pure transformer: no convolutional feature map to explain
    was_training = task.training
    task.eval()
    x = torch.stack([it["image"] for it in items]).to(task.device).requires_grad_(True)
    with torch.enable_grad():
        pred = task.model(x).argmax(1)
        cam = LayerGradCam(task.model, convs[-1]).attribute(x, target=pred)
        cam = LayerAttribution.interpolate(cam, tuple(x.shape[-2:]), interpolate_mode="bilinear")
    task.train(was_training)
    cam = cam.detach().clamp(min=0)[:, 0].cpu().numpy()
    rgb = x.detach().cpu().numpy().transpose(0, 2, 3, 1) * np.asarray(std) + np.asarray(mean)
    fig, axes = plt.subplots(2, len(items), figsize=(2.2 * len(items), 4.6), squeeze=False)
    for i, item in enumerate(items):
        heat = cam[i] / (cam[i].max() + 1e-8)
        axes[0, i].imshow(np.clip(rgb[i], 0, 1))
        axes[0, i].set_title(f"{item['case_id']}\ntruth {names[int(item['label'])]}", fontsize=7)
        axes[1, i].imshow(np.clip(rgb[i], 0, 1))
        axes[1, i].imshow(heat, cmap="jet", alpha=0.45)
        axes[1, i].set_title(f"Grad-CAM: {names[int(pred[i])]}", fontsize=7)
    for ax in axes.flat:
        ax.set_axis_off()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def save_detections(shown: Sequence[dict], path: str | Path) -> None:
    """Slices with reference boxes (green) and detected boxes (red, with their score).

    Each item has ``image`` (Y, X), ``ref`` (M, 4) and ``pred`` (N, 5: x1, y1, x2, y2,
    score) in pixels, and a ``title``.
    """
    fig, axes = plt.subplots(1, len(shown), figsize=(3.2 * len(shown), 3.4), squeeze=False)
    for ax, item in zip(axes[0], shown, strict=True):
        ax.imshow(item["image"], cmap="gray", vmin=0, vmax=1)
        ax.set_axis_off()
        ax.set_title(item["title"], fontsize=8)
        for boxes, colour in ((item["ref"], "#34c759"), (item["pred"], "#ff3b30")):
            for b in boxes:
                ax.add_patch(
                    plt.Rectangle(
                        (b[0] - 0.5, b[1] - 0.5),
                        b[2] - b[0],
                        b[3] - b[1],
                        fill=False,
                        edgecolor=colour,
                        linewidth=1.0,
                    )
                )
                if len(b) > 4:
                    ax.text(b[0], b[1] - 1, f"{b[4]:.2f}", color=colour, fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
