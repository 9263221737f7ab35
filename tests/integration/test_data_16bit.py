"""16-bit images: the torchvision loader's decode (load_rgb) gives DALI's pixels exactly (was: a
16-bit gray PNG decoded almost entirely white), and `addernet-data check` flags what no loader
decodes faithfully (32-bit int/float images), which load_rgb refuses the same way."""

from __future__ import annotations

import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from addernet_dist.data.check import inspect_image
from addernet_dist.data.folder import CorruptImageError, load_rgb


def _png16(path, a: np.ndarray) -> str:
    """A 16-bit PNG of ``a`` (H, W, C) uint16, C = 1 gray, 2 gray+alpha, 3 RGB, 4 RGBA (PIL
    writes 16-bit gray only)."""
    h, w, c = a.shape
    raw = b"".join(b"\0" + a[y].astype(">u2").tobytes() for y in range(h))

    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data))

    ihdr = struct.pack(">IIBBBBB", w, h, 16, {1: 0, 2: 4, 3: 2, 4: 6}[c], 0, 0, 0)
    with open(path, "wb") as f:
        f.write(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(raw)))
        f.write(chunk(b"IEND", b""))
    return str(path)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("png16")
    rng = np.random.default_rng(0)
    out = {}
    for c in (1, 2, 3, 4):
        a = rng.integers(0, 65536, size=(9, 11, c), dtype=np.uint16)
        a[0, :4, 0] = [0, 128, 383, 32768]  # -> 0, 0, 1, 128 (round(v / 257))
        out[f"c{c}"] = (_png16(d / f"c{c}.png", a), a)
    gray = out["c1"][1][..., 0]
    Image.fromarray(gray).save(d / "g16.tif")  # I;16 TIFF
    out["tif"] = (str(d / "g16.tif"), gray[..., None])
    return out


def _dali_decode(paths: list[str]) -> list[np.ndarray]:
    """DALI's CPU decoder (device_id=None), as the DALI loader's pipelines call it."""
    pytest.importorskip("nvidia.dali", reason="DALI (nvidia-dali) is not installed")
    import nvidia.dali.fn as fn
    import nvidia.dali.types as types
    from nvidia.dali import pipeline_def

    @pipeline_def(batch_size=len(paths), num_threads=1, device_id=None)
    def pipe():
        enc, _ = fn.readers.file(files=paths, labels=[0] * len(paths))
        return fn.decoders.image(enc, device="cpu", output_type=types.RGB)

    p = pipe()
    p.build()
    out = p.run()[0]
    return [np.array(out[i]) for i in range(len(paths))]


@pytest.mark.timeout(60)
def test_16bit_images_decode_to_dalis_pixels(files):
    names = sorted(files)
    dali = _dali_decode([files[n][0] for n in names])
    for n, ref in zip(names, dali):
        ours = np.array(load_rgb(files[n][0]))
        assert ours.dtype == np.uint8 and ours.shape == ref.shape, n
        np.testing.assert_array_equal(ours, ref, err_msg=n)


@pytest.mark.timeout(60)
def test_16bit_values_are_scaled_not_clipped(files):
    for n, (path, a) in files.items():
        x = np.array(load_rgb(path)).astype(np.int64)
        want = (a.astype(np.int64) * 255 + 32767) // 65535
        want = np.repeat(want[..., :1], 3, -1) if a.shape[2] <= 2 else want[..., :3]
        np.testing.assert_array_equal(x, want, err_msg=n)
        assert x[0, :4, 0].tolist() == [0, 0, 1, 128], n  # PIL's convert: [0, 128, 255, 255]
        assert "sixteen_bit" in inspect_image(path).oddities, n


@pytest.mark.timeout(60)
@pytest.mark.parametrize("dtype", [np.int32, np.float32])
def test_32bit_images_are_flagged_by_the_check_and_refused_by_the_loader(tmp_path, dtype):
    path = str(tmp_path / "deep.tif")
    Image.fromarray(np.full((5, 5), 70000, dtype=dtype)).save(path)
    r = inspect_image(path)
    assert r.error is not None and "cannot be decoded faithfully" in r.error, r
    with pytest.raises(CorruptImageError, match="deep.tif.*no faithful 8-bit RGB decode"):
        load_rgb(path)
