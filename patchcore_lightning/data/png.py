"""PNG decoding by libspng (``pyspng``) for the common case, pixel for pixel what PIL decodes.

Decoding a 1024² RGB PNG (MVTec AD's size) is most of a data item's CPU time; on a 2-core machine
the DataLoader workers take those cycles from the backbone. libspng decodes the same pixels in
~30 % less CPU than PIL (``benchmarks/bench_data.py``). PNG is lossless: any correct decoder gives
the same 8-bit values, and only the unambiguous case is taken here: a single-frame PNG whose
pixels PIL reads as 8-bit RGB or 8-bit gray without conversion (PIL's raw mode equals its mode).
Palettes, alpha, 16-bit and 1/2/4-bit images, APNG and every other format stay with PIL.

libspng is run without its CRC checks (pyspng's choice); :func:`check_chunks` verifies every
chunk's CRC first, so that a damaged file is never decoded to other pixels than PIL's: whatever
:func:`load_png` rejects, the caller hands to PIL, which decodes it or raises its own error.
Without ``pyspng`` installed, everything is decoded by PIL (the same numbers, slower).
"""

from __future__ import annotations

import struct
import zlib
from pathlib import Path

import numpy as np
from PIL import Image

try:
    import pyspng
except ImportError:  # optional: PIL decodes everything
    pyspng = None

__all__ = ["check_chunks", "fast_case", "load_png"]

SIGNATURE = b"\x89PNG\r\n\x1a\n"


def fast_case(img: Image.Image) -> bool:
    """True when ``img`` (opened, not loaded) is a single-frame 8-bit RGB or gray PNG that PIL reads as is."""
    if pyspng is None or img.format != "PNG" or img.mode not in ("RGB", "L") or getattr(img, "is_animated", False):
        return False
    if len(img.tile) != 1:
        return False
    codec, _, _, rawmode = tuple(img.tile[0])[:4]
    return codec == "zip" and rawmode == img.mode


def check_chunks(data: bytes) -> None:
    """Raise ValueError unless ``data`` is a PNG signature followed by chunks with valid CRCs up to IEND."""
    if not data.startswith(SIGNATURE):
        raise ValueError("not a PNG file (signature)")
    pos, end = len(SIGNATURE), len(data)
    view = memoryview(data)
    while True:
        if pos + 8 > end:
            raise ValueError(f"truncated PNG: chunk header at byte {pos} of {end}")
        length, kind = struct.unpack_from(">I4s", data, pos)
        body_end = pos + 8 + length
        if body_end + 4 > end:
            raise ValueError(f"truncated PNG: chunk {kind!r} at byte {pos} needs {length + 12} bytes, {end - pos} left")
        (crc,) = struct.unpack_from(">I", data, body_end)
        if zlib.crc32(view[pos + 4 : body_end]) != crc:
            raise ValueError(f"broken PNG file: chunk {kind!r} at byte {pos} fails its CRC")
        if kind == b"IEND":
            return
        pos = body_end + 4


def load_png(img: Image.Image, path: str | Path) -> Image.Image:
    """Decode ``img`` (opened from ``path``, ``fast_case(img)`` true) with libspng: PIL's pixels, same mode."""
    data = Path(path).read_bytes()
    check_chunks(data)
    pixels = pyspng.load(data, format=img.mode)  # (H, W, 3) or (H, W) uint8
    expected = (img.size[1], img.size[0], 3) if img.mode == "RGB" else (img.size[1], img.size[0])
    if pixels.shape != expected or pixels.dtype != np.uint8:
        raise ValueError(f"libspng decoded {pixels.shape} {pixels.dtype}, the header says {expected} uint8")
    return Image.fromarray(pixels)
