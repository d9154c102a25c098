"""Torch datasets over 2D image files (JPEG/PNG): classification labels or binary masks.

Segmentation evaluation items follow the whole-case protocol of ``CaseDataset`` (an image
is a one-slice volume) and keep the mask at the file's own resolution, so metrics are
computed where the official scorers compute them.
"""

from __future__ import annotations

import zlib
from collections.abc import Sequence
from pathlib import Path

import albumentations as A
import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from medlit.datasets.seeding import seed_transforms


def read_rgb(path: Path) -> np.ndarray:
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"))


def read_mask(path: Path) -> np.ndarray:
    """Binary mask, thresholded as the ISIC scorer does (> 128)."""
    with Image.open(path) as im:
        return (np.asarray(im.convert("L")) > 128).astype(np.uint8)


class ImageDataset(Dataset):
    """Items ``image`` (3, H, W) float, ``case_id``, and ``label`` or ``mask`` (1, H, W).

    Args:
        ids: image ids, in order.
        images: image id -> file.
        transform: albumentations pipeline (image, and mask when given), ending in
            normalisation.
        labels: image id -> class index (classification).
        masks: image id -> mask file (segmentation).
        evaluation: segmentation evaluation items: ``image`` (3, 1, H', W') transformed,
            ``mask`` (1, 1, H, W) at the file's resolution, unit ``spacing`` and ``shape``;
            without masks (prediction), ``size`` (H, W) of the file instead.
    """

    def __init__(
        self,
        ids: Sequence[str],
        images: dict[str, Path],
        transform: A.Compose,
        labels: dict[str, int] | None = None,
        masks: dict[str, Path] | None = None,
        evaluation: bool = False,
    ) -> None:
        self.ids = list(ids)
        self.images, self.labels, self.masks = images, labels, masks
        self.transform = transform
        self.evaluation = evaluation

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, index: int) -> dict:
        seed_transforms(self.transform)
        image_id = self.ids[index]
        image = read_rgb(self.images[image_id])
        item: dict = {"case_id": image_id}
        if self.masks is None and self.evaluation:  # prediction: a one-slice volume
            x = self.transform(image=image)["image"].transpose(2, 0, 1)
            item["image"] = torch.from_numpy(x[:, None].copy())
            item["size"] = torch.tensor(image.shape[:2])
            return item
        if self.masks is None:
            item["image"] = torch.from_numpy(
                self.transform(image=image)["image"].transpose(2, 0, 1).copy()
            )
            if self.labels is not None:
                item["label"] = torch.tensor(self.labels[image_id])
            return item
        mask = read_mask(self.masks[image_id])
        if self.evaluation:
            x = self.transform(image=image)["image"].transpose(2, 0, 1)
            item["image"] = torch.from_numpy(x[:, None].copy())
            item["mask"] = torch.from_numpy(mask[None, None])
            item["spacing"] = torch.ones(3, dtype=torch.float64)
            item["shape"] = torch.tensor([1, *mask.shape])
            return item
        out = self.transform(image=image, mask=mask)
        item["image"] = torch.from_numpy(out["image"].transpose(2, 0, 1).copy())
        item["mask"] = torch.from_numpy(out["mask"][None].astype(np.uint8))
        return item


_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_PNG_CHANNELS = {0: 1, 2: 3, 3: 1, 4: 2, 6: 4}
_ADAM7 = (
    (0, 0, 8, 8),
    (4, 0, 8, 8),
    (0, 4, 4, 8),
    (2, 0, 4, 4),
    (0, 2, 2, 4),
    (1, 0, 2, 2),
    (0, 1, 1, 2),
)


def png_problem(path: str | Path) -> str | None:
    """Verify a PNG to its last byte: what is wrong with it, or None.

    Pillow checks the CRCs of the header chunks but not of the image data (``IDAT``),
    and stops inflating once it has the pixels, before zlib's own checksum; so a damaged
    byte there can load as different pixels. Every chunk's CRC is checked here, and the
    image data is inflated whole (zlib then checks its Adler-32) and must be exactly the
    size the header implies. Written by hand: no library verifies a PNG this way.
    """
    data = Path(path).read_bytes()
    if not data.startswith(_PNG_SIGNATURE):
        return "not a PNG file (bad signature)"
    pos, idat, header = len(_PNG_SIGNATURE), [], None
    while True:
        if pos + 12 > len(data):
            return f"truncated PNG (the file ends at byte {len(data)}, before the IEND chunk)"
        length = int.from_bytes(data[pos : pos + 4], "big")
        kind = data[pos + 4 : pos + 8]
        body = data[pos + 8 : pos + 8 + length]
        if pos + 12 + length > len(data):
            return f"truncated PNG (chunk {kind!r} at byte {pos} runs past the end of the file)"
        crc = int.from_bytes(data[pos + 8 + length : pos + 12 + length], "big")
        if zlib.crc32(kind + body) != crc:
            return f"damaged PNG (chunk {kind!r} at byte {pos} fails its CRC)"
        if kind == b"IHDR":
            header = body
        elif kind == b"IDAT":
            idat.append(body)
        elif kind == b"IEND":
            break
        pos += 12 + length
    if header is None or len(header) != 13:
        return "damaged PNG (no valid IHDR chunk)"
    width, height = int.from_bytes(header[:4], "big"), int.from_bytes(header[4:8], "big")
    depth, colour, interlace = header[8], header[9], header[12]
    if colour not in _PNG_CHANNELS:
        return f"damaged PNG (colour type {colour})"
    try:
        pixels = zlib.decompress(b"".join(idat))
    except zlib.error as e:
        return f"damaged PNG image data ({e})"
    bits = _PNG_CHANNELS[colour] * depth
    passes = _ADAM7 if interlace else ((0, 0, 1, 1),)
    expected = 0
    for x0, y0, dx, dy in passes:
        w, h = -(-(width - x0) // dx), -(-(height - y0) // dy)
        if w > 0 and h > 0:
            expected += h * (1 + -(-w * bits // 8))
    if len(pixels) != expected:
        return (
            f"damaged PNG ({len(pixels)} bytes of image data, {expected} expected for "
            f"{width}x{height} at {bits} bits per pixel)"
        )
    return None
