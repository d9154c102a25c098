"""Seeded synthetic dermoscopy in the official ISIC layouts (demo and tests).

Each lesion is a blob on a skin-toned, vignetted background; its colour, colour
variation, border irregularity, size and texture depend on the diagnosis (melanoma:
dark, multicoloured, irregular; naevus: even brown, round; vascular: red-purple with
lacunae; ...), with per-lesion randomness so classes overlap. Every lesion_id is
photographed several times (rotated, shifted, rescaled, re-lit), as in HAM10000.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

from medlit.datasets.io.files import MARKER
from medlit.datasets.isic.source import CLASSES, TRUTH_CSV

# class -> (mean RGB of the lesion, colour spread, border irregularity, radius range in
# fractions of the image height, texture strength, second colour for blotches or None)
LOOKS: dict[str, tuple] = {
    "MEL": ((70, 45, 35), 30, 0.30, (0.22, 0.38), 0.25, (60, 70, 95)),
    "NV": ((125, 80, 55), 12, 0.06, (0.15, 0.28), 0.08, None),
    "BCC": ((200, 130, 135), 20, 0.15, (0.16, 0.30), 0.12, (215, 80, 90)),
    "AKIEC": ((190, 95, 85), 22, 0.22, (0.15, 0.30), 0.35, None),
    "BKL": ((160, 115, 80), 18, 0.16, (0.16, 0.32), 0.18, (120, 85, 60)),
    "DF": ((150, 100, 90), 12, 0.08, (0.10, 0.20), 0.10, (225, 205, 195)),
    "VASC": ((150, 40, 70), 18, 0.10, (0.12, 0.24), 0.10, (90, 15, 40)),
    "AK": ((190, 95, 85), 22, 0.22, (0.15, 0.30), 0.35, None),
    "SCC": ((205, 150, 130), 25, 0.25, (0.15, 0.30), 0.30, (170, 60, 60)),
}
PRIORS = {
    "2018_task3": (0.15, 0.35, 0.10, 0.08, 0.14, 0.08, 0.10),
    "2019": (0.14, 0.30, 0.10, 0.08, 0.12, 0.08, 0.08, 0.10),
}


def _lesion_params(cls: str, rng: np.random.Generator) -> dict:
    colour, spread, irregular, radii, texture, second = LOOKS[cls]
    return {
        # Lighter or darker as a whole, with a little hue shift: stays a plausible colour.
        "colour": np.clip(
            np.asarray(colour) * rng.uniform(1 - spread / 150, 1 + spread / 150)
            + rng.normal(0, spread / 4, 3),
            0,
            255,
        ),
        "second": None
        if second is None
        else np.clip(np.asarray(second) + rng.normal(0, 15, 3), 0, 255),
        "harmonics": [
            (k, rng.uniform(0, irregular) / k**0.5, rng.uniform(0, 2 * np.pi)) for k in range(2, 8)
        ],
        "radius": rng.uniform(*radii),
        "aspect": rng.uniform(0.75, 1.0),
        "texture": texture,
        "softness": rng.uniform(0.01, 0.04),
        "skin": np.cumprod(
            [rng.uniform(185, 235), rng.uniform(0.72, 0.85), rng.uniform(0.82, 0.95)]
        ),
        "seed": int(rng.integers(2**31)),
    }


def render_lesion(
    p: dict, size: tuple[int, int], rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """One photograph of a lesion: (H, W, 3) uint8 RGB and (H, W) uint8 mask (0/255)."""
    h, w = size
    yy, xx = np.mgrid[0:h, 0:w] / h
    cy, cx = 0.5 + rng.normal(0, 0.06), w / h / 2 + rng.normal(0, 0.06)
    angle = rng.uniform(0, 2 * np.pi)
    scale = rng.uniform(0.85, 1.15)
    dy, dx = yy - cy, xx - cx
    u = (dx * np.cos(angle) + dy * np.sin(angle)) / p["aspect"]
    v = -dx * np.sin(angle) + dy * np.cos(angle)
    dist, theta = np.hypot(u, v), np.arctan2(v, u)
    radius = (
        p["radius"] * scale * (1 + sum(a * np.cos(k * theta + f) for k, a, f in p["harmonics"]))
    )
    alpha = 1 / (1 + np.exp(-(radius - dist) / p["softness"]))
    own = np.random.default_rng(p["seed"])  # the lesion's own texture, the same in every photo
    grain = own.normal(0, 1, (h // 4 + 2, w // 4 + 2))
    grain = np.kron(grain, np.ones((4, 4)))[:h, :w]
    lesion = p["colour"][None, None] * (1 + p["texture"] * grain[..., None] * 0.5)
    if p["second"] is not None:
        blotch = np.cos(7 * u + own.uniform(0, 6)) * np.cos(6 * v + own.uniform(0, 6)) > 0.3
        blotch &= dist < radius * 0.6
        lesion = np.where(blotch[..., None], p["second"][None, None], lesion)
    skin = p["skin"][None, None] * (1 + 0.05 * rng.normal(0, 1, (h, w, 1)))
    image = alpha[..., None] * lesion + (1 - alpha[..., None]) * skin
    vignette = 1 - 0.5 * np.clip(np.hypot(yy - 0.5, xx - w / h / 2) - 0.45, 0, None) * 2
    image = image * vignette[..., None] * rng.uniform(0.85, 1.1)
    for _ in range(rng.integers(0, 4)):  # hairs
        y0, slope = rng.uniform(0, 1), rng.uniform(-1, 1)
        image[np.abs(yy - (y0 + slope * (xx - cx))) < 0.004] *= 0.35
    mask = (dist < radius).astype(np.uint8) * 255
    return np.clip(image + rng.normal(0, 4, image.shape), 0, 255).astype(np.uint8), mask


def write_isic(
    root: str | Path,
    year: str = "2018_task3",
    lesions: int = 60,
    size: tuple[int, int] = (120, 160),
    images_per_lesion: tuple[int, int] = (1, 4),
    seed: int = 0,
) -> list[str]:
    """Write a synthetic release of ``year`` (2018_task1, 2018_task3, 2019, 2020) under ``root``.

    ``size`` is (height, width) in pixels. Returns the image ids.
    """
    root = Path(root)
    rng = np.random.default_rng(seed)
    classes = CLASSES.get(year, CLASSES["2018_task3"])
    prior = PRIORS.get(year, PRIORS["2018_task3"])
    names = {
        "2018_task1": ("ISIC2018_Task1-2_Training_Input", "ISIC2018_Task1_Training_GroundTruth"),
        "2018_task3": ("ISIC2018_Task3_Training_Input", "ISIC2018_Task3_Training_GroundTruth"),
        "2019": ("ISIC_2019_Training_Input", "."),
        "2020": ("jpeg/train", "."),
    }[year]
    image_dir, truth_dir = root / names[0], root / names[1]
    image_dir.mkdir(parents=True, exist_ok=True)
    truth_dir.mkdir(parents=True, exist_ok=True)
    rows, number = [], 24306
    for lesion in range(lesions):
        if year == "2020":
            label = int(rng.random() < 0.3)
            cls = ("NV", "MEL")[label]
        else:
            label = int(rng.choice(len(classes), p=np.asarray(prior) / sum(prior)))
            cls = classes[label]
        params = _lesion_params(cls, rng)
        for _ in range(rng.integers(images_per_lesion[0], images_per_lesion[1] + 1)):
            image_id = f"ISIC_{number:07d}"
            number += 1
            image, mask = render_lesion(params, size, rng)
            Image.fromarray(image).save(image_dir / f"{image_id}.jpg", quality=92)
            if year == "2018_task1":
                Image.fromarray(mask, "L").save(truth_dir / f"{image_id}_segmentation.png")
            rows.append(
                {
                    "image": image_id,
                    "label": label,
                    "lesion_id": f"HAM_{lesion:07d}",
                    "patient_id": f"IP_{lesion // 2:07d}",
                }
            )
    table = pd.DataFrame(rows)
    if year in ("2018_task3", "2019"):
        onehot = pd.DataFrame(np.eye(len(classes))[table["label"]], columns=list(classes))
        if year == "2019":
            onehot["UNK"] = 0.0
        pd.concat([table[["image"]], onehot], axis=1).to_csv(
            truth_dir / TRUTH_CSV[year], index=False
        )
        meta = table[["image", "lesion_id"]].assign(diagnosis_confirm_type="histopathology")
        meta_name = (
            "ISIC2018_Task3_Training_LesionGroupings.csv"
            if year == "2018_task3"
            else "ISIC_2019_Training_Metadata.csv"
        )
        meta.to_csv(root / meta_name, index=False)
    elif year == "2020":
        pd.DataFrame(
            {
                "image_name": table["image"],
                "patient_id": table["patient_id"],
                "diagnosis": np.where(table["label"] == 1, "melanoma", "nevus"),
                "benign_malignant": np.where(table["label"] == 1, "malignant", "benign"),
                "target": table["label"],
            }
        ).to_csv(truth_dir / "train.csv", index=False)
    (root / MARKER).write_text(
        json.dumps(
            {
                "dataset": "isic",
                "year": year,
                "lesions": lesions,
                "seed": seed,
                "size_hw": list(size),
            }
        )
    )
    return list(table["image"])
