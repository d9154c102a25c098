"""Detections in NumPy, shared by :class:`~medlit.tasks.DetectionTask` and
``medlit.deploy`` (an exported detector on onnxruntime, no torch): Ultralytics' NMS of a
YOLO head's decoded output, slice boxes merged into 3D candidates, and the candidates as
LUNA16 submission rows in world mm.

The NMS is a port of ``ultralytics.utils.nms.non_max_suppression`` at the settings the
task calls it with (one best class per box, class-aware, no rotated boxes): Ultralytics'
and torchvision's NMS are torch-only, and deployment has no torch. A test holds the two
equal on a trained detector's outputs.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd

from medlit.datasets.io.volume import Geometry


def nms(boxes: np.ndarray, scores: np.ndarray, iou_threshold: float) -> np.ndarray:
    """Indices of the boxes (n, 4) x1, y1, x2, y2 greedy NMS keeps, by descending score
    (``torchvision.ops.nms``: a box is dropped when its IoU with a kept one exceeds the
    threshold)."""
    order = np.argsort(-scores, kind="stable")
    x1, y1, x2, y2 = (boxes[:, i] for i in range(4))
    area = (x2 - x1) * (y2 - y1)
    keep = []
    while len(order):
        i = order[0]
        keep.append(i)
        rest = order[1:]
        w = np.clip(np.minimum(x2[i], x2[rest]) - np.maximum(x1[i], x1[rest]), 0, None)
        h = np.clip(np.minimum(y2[i], y2[rest]) - np.maximum(y1[i], y1[rest]), 0, None)
        inter = w * h
        iou = inter / (area[i] + area[rest] - inter)
        order = rest[~(iou > iou_threshold)]
    return np.asarray(keep, dtype=np.int64)


def yolo_nms(
    prediction: np.ndarray,
    conf_threshold: float,
    iou_threshold: float,
    max_det: int,
    max_nms: int = 30000,
    max_wh: int = 7680,
) -> list[np.ndarray]:
    """A YOLO head's decoded output (B, 4 + classes, anchors: box centre x, y, width,
    height in pixels, then each class's probability) -> per image (n, 6) x1, y1, x2, y2,
    score, class, as Ultralytics' ``non_max_suppression`` returns them (its defaults:
    the best class of each box above ``conf_threshold``, at most ``max_nms`` boxes by
    score into a class-aware NMS, whose classes are kept apart by ``max_wh`` pixels)."""
    out = []
    for x in np.swapaxes(prediction, 1, 2):
        cls = x[:, 4:]
        conf, j = cls.max(1), cls.argmax(1)
        keep = conf > conf_threshold
        x, conf, j = x[keep], conf[keep], j[keep].astype(x.dtype)
        xy, half = x[:, :2], x[:, 2:4] / 2
        det = np.concatenate([xy - half, xy + half, conf[:, None], j[:, None]], 1)
        if len(det) > max_nms:
            det = det[np.argsort(-det[:, 4], kind="stable")[:max_nms]]
        kept = nms(det[:, :4] + det[:, 5:6] * max_wh, det[:, 4], iou_threshold)[:max_det]
        out.append(det[kept])
    return out


def merge_detections(
    slices: list[tuple[int, np.ndarray]],
    spacing: np.ndarray,
    tolerance_slices: float = 1.0,
    max_radius_mm: float = 16.0,
) -> np.ndarray:
    """Merge per-slice boxes into 3D candidates.

    ``slices`` holds ``(z, boxes)`` with boxes (n, 5) = pixel x1, y1, x2, y2, score;
    ``spacing`` is (z, y, x) mm. Boxes are taken in descending score; a box joins the
    nearest existing candidate whose centre lies within ``max(radius of the candidate,
    radius of the box) + tolerance_slices · z-spacing`` mm (3D distance), otherwise it
    starts a new one. The reach is capped at ``max_radius_mm`` (LUNA16 nodules are at most
    30 mm across), so one huge low-quality box cannot swallow a scan. A candidate's centre is the score-weighted mean of its boxes'
    centres (a nodule's boxes on neighbouring slices average to its centre slice), its
    diameter the widest box, and its score the highest box score.

    Returns (m, 5): z, y, x (continuous voxel index), diameter_mm, score; by score.
    """
    rows = [
        np.column_stack(
            [
                np.full(len(b), z, float),
                (b[:, 1] + b[:, 3]) / 2 - 0.5,  # pixel centre -> voxel index
                (b[:, 0] + b[:, 2]) / 2 - 0.5,
                np.maximum((b[:, 3] - b[:, 1]) * spacing[1], (b[:, 2] - b[:, 0]) * spacing[2]) / 2,
                b[:, 4],
            ]
        )
        for z, b in slices
        if len(b)
    ]
    if not rows:
        return np.zeros((0, 5))
    dets = np.concatenate(rows)
    dets = dets[np.argsort(-dets[:, 4], kind="stable")]
    centres: list[np.ndarray] = []  # mm, weighted sums
    weights: list[float] = []
    radius: list[float] = []
    score: list[float] = []
    tol = tolerance_slices * spacing[0]
    for d in dets:
        p = d[:3] * spacing
        if centres:
            c = np.asarray(centres) / np.asarray(weights)[:, None]
            dist = np.linalg.norm(c - p, axis=1)
            allowed = np.minimum(np.maximum(np.asarray(radius), d[3]), max_radius_mm) + tol
            j = int(np.argmin(dist / allowed))
            if dist[j] <= allowed[j]:
                centres[j] = centres[j] + d[4] * p
                weights[j] += d[4]
                radius[j] = max(radius[j], d[3])
                continue
        centres.append(d[4] * p)
        weights.append(d[4])
        radius.append(d[3])
        score.append(d[4])
    c = np.asarray(centres) / np.asarray(weights)[:, None] / spacing
    return np.column_stack([c, 2 * np.asarray(radius), np.asarray(score)])


def candidate_table(
    seriesuid: str,
    merged: np.ndarray,
    score: np.ndarray,
    geometry: dict[str, Any],
    max_candidates: int,
) -> pd.DataFrame:
    """A scan's merged candidates (``merge_detections``' rows, scored by ``score``) as
    LUNA16 submission rows in world mm (``geometry``: the grid the detector saw), with
    ``diameter_mm``: the ``max_candidates`` most probable, rounded as the submission CSV
    stores them (so scoring the file gives the same)."""
    world = Geometry.from_dict(geometry).index_to_world(merged[:, :3]) if len(merged) else None
    table = pd.DataFrame(
        {
            "seriesuid": seriesuid,
            "coordX": world[:, 0] if world is not None else [],
            "coordY": world[:, 1] if world is not None else [],
            "coordZ": world[:, 2] if world is not None else [],
            "probability": score,
            "diameter_mm": merged[:, 3],
        }
    )
    table = table.sort_values("probability", ascending=False, kind="stable")
    return table.head(max_candidates).round(6).reset_index(drop=True)
