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
    ``case_id`` and ``z`` (the slice index).
    """
    fig, axes = plt.subplots(len(shown), 3, figsize=(9, 3 * len(shown)), squeeze=False)
    for row, item in zip(axes, shown, strict=True):
        for ax, title, masks in zip(
            row,
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
