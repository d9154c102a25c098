"""Hostile files that used to cost gigabytes or minutes, each run in a child process under
a memory limit (``RLIMIT_AS``) and a time limit, not by reproducing the gigabytes: a PNG
whose image data inflates to 2 GiB, a PNG header of 50000² pixels, and a 1 KB YAML alias
bomb given as an experiment config and as a split file."""

from __future__ import annotations

import os
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
LIMIT = 1 << 30  # 1 GiB of address space: Python, NumPy and Pillow fit, a bomb does not


def _chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def _deflated_zeros(blocks: int) -> bytes:
    """A valid zlib stream of ``blocks`` × 16 MiB of zeros, made in milliseconds: after a
    full flush, deflate's output for the same 16 MiB repeats byte for byte, so the stream is
    one block repeated, an empty final block and the Adler-32 of all those zeros."""
    c = zlib.compressobj(1)
    zeros = bytes(1 << 24)
    head = c.compress(zeros) + c.flush(zlib.Z_FULL_FLUSH)
    block = c.compress(zeros) + c.flush(zlib.Z_FULL_FLUSH)
    adler = ((blocks << 24) % 65521) << 16 | 1  # a stays 1 over zeros; b counts the bytes
    return head + block * (blocks - 1) + b"\x03\x00" + struct.pack(">I", adler)


def _png(path: Path, width: int, height: int, idat: bytes) -> Path:
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)  # 8-bit greyscale
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", idat) + _chunk(b"IEND", b"")
    )
    return path


def _limited(code: str, *args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    """``code`` in a fresh interpreter with at most :data:`LIMIT` of address space."""
    prologue = f"import resource, sys\nresource.setrlimit(resource.RLIMIT_AS, ({LIMIT}, {LIMIT}))\n"
    env = {**os.environ, "OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [sys.executable, "-c", prologue + code, *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
        cwd=REPO,
    )


CHECK_PNG = "from medlit.datasets.io.images import png_problem; print(png_problem(sys.argv[1]))"


def test_a_png_whose_image_data_inflates_to_2_gib_is_refused_in_bounded_memory(
    tmp_path: Path,
) -> None:
    bomb = _png(tmp_path / "bomb.png", 100, 100, _deflated_zeros(128))
    assert bomb.stat().st_size < 10 << 20  # a few MB on disk, 2 GiB inflated
    done = _limited(CHECK_PNG, str(bomb))
    assert done.returncode == 0, done.stderr
    assert "damaged PNG (more than 10100 bytes of image data, 10100 expected" in done.stdout


def test_a_png_header_of_50000_squared_pixels_is_refused_before_inflating(tmp_path: Path) -> None:
    bomb = _png(tmp_path / "huge.png", 50_000, 50_000, _deflated_zeros(2))
    done = _limited(CHECK_PNG, str(bomb))
    assert done.returncode == 0, done.stderr
    assert "50000x50000 pixels, more than Pillow's decompression-bomb limit" in done.stdout


def _alias_bomb() -> str:
    text = 'a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]\n'
    for prev, name in zip("abcdefgh", "bcdefghi", strict=True):
        text += f"{name}: &{name} [{', '.join([f'*{prev}'] * 9)}]\n"
    return text  # 9^9 = 387 million strings once expanded


def test_a_yaml_alias_bomb_is_refused_in_bounded_memory_and_time() -> None:
    bomb = _alias_bomb()
    assert len(bomb) < 1024
    done = _limited(
        "from medlit import yamlsafe\n"
        "try:\n    yamlsafe.check(sys.argv[1], 'bomb.yaml')\n"
        "except Exception as e:\n    print(e)",
        bomb,
        timeout=20,
    )
    assert "bomb.yaml: its YAML aliases expand to more than 1,000,000 values" in done.stdout


@pytest.mark.parametrize("entry", ["medlit.fit", "medlit.check", "medlit.sweep", "medlit.cv"])
def test_an_alias_bomb_config_is_refused_in_one_line_before_parsing(
    tmp_path: Path, entry: str
) -> None:
    config = tmp_path / "bomb.yaml"
    config.write_text(_alias_bomb())
    done = subprocess.run(
        [sys.executable, "-m", entry, str(config)],
        capture_output=True,
        text=True,
        timeout=120,  # before: minutes, and 3.4 GB
        cwd=tmp_path,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert done.returncode == 2, done.stderr[-2000:]
    assert done.stderr.strip().splitlines() == [
        f"medlit: error: {config}: its YAML aliases expand to more than 1,000,000 values "
        "(an alias bomb?); refused before parsing"
    ], done.stderr[-2000:]
