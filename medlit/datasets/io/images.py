"""2D image files (JPEG/PNG): decoding, and verifying a PNG to its last byte."""

from __future__ import annotations

import zlib
from pathlib import Path

import numpy as np
from PIL import Image


def read_rgb(path: Path) -> np.ndarray:
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"))


def read_mask(path: Path) -> np.ndarray:
    """Binary mask, thresholded as the ISIC scorer does (> 128)."""
    with Image.open(path) as im:
        return (np.asarray(im.convert("L")) > 128).astype(np.uint8)


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
    if width * height > Image.MAX_IMAGE_PIXELS:
        # Before inflating anything: a few MB of zeros can inflate to gigabytes.
        return (
            f"{width}x{height} pixels, more than Pillow's decompression-bomb limit of "
            f"{Image.MAX_IMAGE_PIXELS} (PIL.Image.MAX_IMAGE_PIXELS)"
        )
    bits = _PNG_CHANNELS[colour] * depth
    passes = _ADAM7 if interlace else ((0, 0, 1, 1),)
    expected = 0
    for x0, y0, dx, dy in passes:
        w, h = -(-(width - x0) // dx), -(-(height - y0) // dy)
        if w > 0 and h > 0:
            expected += h * (1 + -(-w * bits // 8))
    # Inflated in bounded pieces and only counted, so memory stays small whatever the
    # stream holds; more bytes than the header implies stops it at once.
    inflate, size = zlib.decompressobj(), 0
    try:
        for body in idat:
            while body and size <= expected:
                size += len(inflate.decompress(body, 1 << 20))
                body = inflate.unconsumed_tail
            if size > expected:
                break
        if size <= expected:
            size += len(inflate.flush())
    except zlib.error as e:
        return f"damaged PNG image data ({e})"
    if size <= expected and not inflate.eof:
        return "damaged PNG image data (the compressed stream is truncated)"
    if size != expected:
        found = f"more than {expected}" if size > expected else str(size)
        return (
            f"damaged PNG ({found} bytes of image data, {expected} expected for "
            f"{width}x{height} at {bits} bits per pixel)"
        )
    return None
