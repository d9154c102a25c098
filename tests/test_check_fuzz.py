"""Property: a damaged file either raises medlit's own error or loads exactly the original
voxels; never silently different voxels, never another exception.

Each format is damaged in the ways its bytes can be:

* ``.nii.gz``: truncated anywhere, any byte flipped anywhere, or a header that lies
  about the size (dimensions or data type changed, correctly re-compressed);
* ``.nii`` (uncompressed): truncated, or a lying header. A flipped voxel byte in an
  uncompressed file is undetectable by any reader (the format has no checksum), so it is
  not part of the property;
* ``.mhd`` + ``.raw``: the ``.raw`` truncated, any byte of the ``.mhd`` header flipped,
  or ``DimSize`` changed (the ``.raw`` voxels themselves, like ``.nii``'s, carry no checksum);
* ``.png`` (ISIC masks): truncated, any byte flipped, or an ``IHDR`` that lies about the
  size (its CRC recomputed so that the chunk itself looks intact);
* ``.jpg`` (ISIC images): truncated (JPEG has no checksum either).
"""

from __future__ import annotations

import gzip
import io
import tempfile
import zlib
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from medlit.datasets.brats.source import BraTSCase, _check_and_read
from medlit.datasets.io.images import read_rgb
from medlit.datasets.isic.source import check_image
from medlit.datasets.luna16.source import LunaScan, check_scan
from medlit.errors import MedlitError, Report

FUZZ = settings(
    max_examples=120,
    deadline=None,
    derandomize=True,  # the same examples on every CI run
    database=None,  # no .hypothesis folder in the checkout
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)

rng = np.random.default_rng(0)
VOLUME = rng.integers(-1000, 2000, size=(5, 6, 7)).astype(np.int16)


def _nifti_bytes(compress: bool) -> bytes:
    # A folder of this process's own: both xdist workers run this at collection, and a
    # fixed /tmp name let one delete the file the other was reading.
    with tempfile.TemporaryDirectory(prefix="medlit-fuzz-") as folder:
        tmp = Path(folder) / f"volume.nii{'.gz' if compress else ''}"
        image = sitk.GetImageFromArray(VOLUME)
        image.SetSpacing((0.9, 1.1, 2.5))
        sitk.WriteImage(image, str(tmp), useCompression=compress)
        return tmp.read_bytes()


NII_GZ = _nifti_bytes(True)
NII = _nifti_bytes(False)


def _lie_nifti(raw: bytes, field: int, delta: int) -> bytes:
    """Change one of dim[1..3] (field 0-2) by ``delta``, or the datatype (field 3)."""
    out = bytearray(raw)
    if field < 3:
        at = 42 + 2 * field
        value = int.from_bytes(out[at : at + 2], "little", signed=True) + delta
        out[at : at + 2] = value.to_bytes(2, "little", signed=True)
    else:  # datatype and bitpix: int16 -> another type of another size
        code, bits = {-2: (2, 8), -1: (8, 32), 1: (16, 32), 2: (64, 64)}.get(delta, (768, 32))
        out[70:72] = code.to_bytes(2, "little")
        out[72:74] = bits.to_bytes(2, "little")
    return bytes(out)


def _damage(data: bytes, how: str, at: int, mask: int) -> bytes:
    if how == "truncate":
        return data[: at % len(data)]
    out = bytearray(data)
    out[at % len(data)] ^= mask
    return bytes(out)


def _must_be_refused_or_exact(load, expected: np.ndarray) -> None:
    try:
        array = load()
    except MedlitError:
        return
    assert array.shape == expected.shape and array.dtype == expected.dtype, (
        array.shape,
        array.dtype,
    )
    np.testing.assert_array_equal(array, expected)


def _load_nifti(path: Path):
    case = BraTSCase("case", path.parent, {"t1": path}, None)
    return lambda: _check_and_read(case, path, Report())[0]


damage = st.sampled_from(["truncate", "flip"])
position = st.integers(0, 10**6)
mask = st.integers(1, 255)
lie = st.tuples(st.integers(0, 3), st.sampled_from([-2, -1, 1, 2]))


@FUZZ
@given(how=damage, at=position, mask=mask)
def test_nii_gz_damaged_bytes(tmp_path: Path, how: str, at: int, mask: int) -> None:
    path = tmp_path / "x.nii.gz"
    path.write_bytes(_damage(NII_GZ, how, at, mask))
    _must_be_refused_or_exact(_load_nifti(path), VOLUME)


@FUZZ
@given(lie=lie, compress=st.booleans())
def test_nifti_header_that_lies_about_the_size(
    tmp_path: Path, lie: tuple[int, int], compress: bool
) -> None:
    raw = gzip.decompress(NII_GZ) if compress else NII
    data = _lie_nifti(raw, *lie)
    path = tmp_path / ("x.nii.gz" if compress else "x.nii")
    path.write_bytes(gzip.compress(data) if compress else data)
    _must_be_refused_or_exact(_load_nifti(path), VOLUME)


@FUZZ
@given(at=position)
def test_nii_truncated(tmp_path: Path, at: int) -> None:
    path = tmp_path / "x.nii"
    path.write_bytes(NII[: at % len(NII)])
    _must_be_refused_or_exact(_load_nifti(path), VOLUME)


def _metaimage(folder: Path) -> tuple[Path, Path]:
    image = sitk.GetImageFromArray(VOLUME)
    image.SetSpacing((0.7, 0.7, 2.5))
    image.SetOrigin((-100.0, -120.5, -300.25))
    mhd = folder / "1.2.3.mhd"
    sitk.WriteImage(image, str(mhd))
    return mhd, folder / "1.2.3.raw"


def _load_scan(mhd: Path, raw: Path):
    scan = LunaScan("1.2.3", 0, mhd, raw)

    def load():
        checked = check_scan(scan, Report())
        assert checked is not None  # a strict report raises instead
        return sitk.GetArrayFromImage(checked[0])

    return load


@FUZZ
@given(at=position, mask=mask)
def test_mhd_header_with_a_flipped_byte(tmp_path: Path, at: int, mask: int) -> None:
    mhd, raw = _metaimage(tmp_path)
    mhd.write_bytes(_damage(mhd.read_bytes(), "flip", at, mask))
    _must_be_refused_or_exact(_load_scan(mhd, raw), VOLUME)


@FUZZ
@given(at=position, axis=st.integers(0, 2), delta=st.sampled_from([-2, -1, 1, 2]))
def test_raw_truncated_or_dimsize_that_lies(tmp_path: Path, at: int, axis: int, delta: int) -> None:
    mhd, raw = _metaimage(tmp_path)
    if at % 2:
        raw.write_bytes(_damage(raw.read_bytes(), "truncate", at, 0))
    else:
        lines = mhd.read_text().split("\n")
        i = next(k for k, ln in enumerate(lines) if ln.startswith("DimSize"))
        dims = [int(v) for v in lines[i].split("=")[1].split()]
        dims[axis] = max(1, dims[axis] + delta)
        lines[i] = "DimSize = " + " ".join(map(str, dims))
        mhd.write_text("\n".join(lines))
    _must_be_refused_or_exact(_load_scan(mhd, raw), VOLUME)


MASK = (rng.random((23, 31)) > 0.5).astype(np.uint8) * 255


def _png_bytes() -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(MASK, "L").save(buffer, format="PNG")
    return buffer.getvalue()


PNG = _png_bytes()


def _load_png(path: Path):
    def load():
        check_image("ISIC_0000000", path, report=Report())
        with Image.open(path) as im:
            return np.asarray(im)

    return load


@FUZZ
@given(how=damage, at=position, mask=mask)
def test_png_damaged_bytes(tmp_path: Path, how: str, at: int, mask: int) -> None:
    path = tmp_path / "ISIC_0000000_segmentation.png"
    path.write_bytes(_damage(PNG, how, at, mask))
    _must_be_refused_or_exact(_load_png(path), MASK)


@FUZZ
@given(field=st.integers(0, 1), delta=st.sampled_from([-3, -1, 1, 3]))
def test_png_header_that_lies_about_the_size(tmp_path: Path, field: int, delta: int) -> None:
    data = bytearray(PNG)
    at = 16 + 4 * field  # IHDR width, height
    data[at : at + 4] = (int.from_bytes(data[at : at + 4], "big") + delta).to_bytes(4, "big")
    data[29:33] = zlib.crc32(bytes(data[12:29])).to_bytes(4, "big")  # a valid chunk CRC
    path = tmp_path / "ISIC_0000000_segmentation.png"
    path.write_bytes(bytes(data))
    _must_be_refused_or_exact(_load_png(path), MASK)


@pytest.fixture(scope="module")
def jpeg() -> tuple[bytes, np.ndarray]:
    buffer = io.BytesIO()
    colour = rng.integers(0, 255, size=(40, 48, 3)).astype(np.uint8)
    Image.fromarray(colour).save(buffer, format="JPEG", quality=90)
    decoded = np.asarray(Image.open(io.BytesIO(buffer.getvalue())).convert("RGB"))
    return buffer.getvalue(), decoded


@FUZZ
@given(at=position)
def test_jpeg_truncated(tmp_path: Path, jpeg: tuple[bytes, np.ndarray], at: int) -> None:
    data, decoded = jpeg
    path = tmp_path / "ISIC_0000000.jpg"
    path.write_bytes(data[: at % len(data)])

    def load():
        check_image("ISIC_0000000", path, report=Report())
        return read_rgb(path)

    _must_be_refused_or_exact(load, decoded)


def test_png_every_single_bit_flip_in_the_image_data(tmp_path: Path) -> None:
    """Exhaustive over the IDAT chunk: Pillow alone returns different pixels for about 2%
    of these flips (it checks neither IDAT's CRC nor zlib's Adler-32)."""
    start = PNG.index(b"IDAT")
    length = int.from_bytes(PNG[start - 4 : start], "big")
    path = tmp_path / "ISIC_0000000_segmentation.png"
    for at in range(start + 4, start + 4 + length):
        for bit in range(8):
            path.write_bytes(_damage(PNG, "flip", at, 1 << bit))
            _must_be_refused_or_exact(_load_png(path), MASK)


def test_mhd_every_single_bit_flip_in_the_header(tmp_path: Path) -> None:
    """Exhaustive over the ``.mhd`` header: SimpleITK reads a boolean it cannot parse as
    False, ignores a key it does not know, and so on."""
    mhd, raw = _metaimage(tmp_path)
    header = mhd.read_bytes()
    for at in range(len(header)):
        for bit in range(8):
            mhd.write_bytes(_damage(header, "flip", at, 1 << bit))
            _must_be_refused_or_exact(_load_scan(mhd, raw), VOLUME)
