"""PNG decoding by libspng (``pyspng``) where it gives PIL's pixels, in ~60 % of PIL's time.

Decoding dominates a data item of MVTec-sized PNGs (1024²: ~24 ms with PIL, ~15 with libspng, of
an item of ~32 and ~25 ms), and on a GPU the DataLoader workers' decoding is the floor of the test
loop's speed (``benchmarks/bench_decode.py``). PNG is lossless, so every correct decoder gives the same 8-bit
values. libspng gets only the plain case: a single-frame PNG that PIL reads as 8-bit RGB or gray
in the mode asked for, without conversion. Every other file (palette, alpha, 16-bit, 1/2/4-bit,
animated, another mode asked for, another format) is PIL's.

pyspng runs libspng without checking the chunks' CRCs, and a damaged file then decodes to other
pixels without an error. :func:`decode_png` checks every chunk's CRC first and declines a file
that fails, or that libspng cannot decode, so that PIL decodes it or raises its own error.
"""

from __future__ import annotations

import struct
import zlib

import pyspng
from PIL import Image

__all__ = ["crcs_valid", "decode_png", "plain_png"]

SIGNATURE = b"\x89PNG\r\n\x1a\n"


def plain_png(img: Image.Image, mode: str) -> bool:
    """``img`` (opened, not loaded) is a single-frame PNG whose 8-bit pixels PIL reads as ``mode``
    ("RGB" or "L") as they are stored."""
    if img.format != "PNG" or mode not in ("RGB", "L") or img.mode != mode or getattr(img, "is_animated", False):
        return False
    if len(img.tile) != 1:
        return False
    codec, _, _, rawmode = tuple(img.tile[0])[:4]
    return codec == "zip" and rawmode == mode


def crcs_valid(data: bytes) -> bool:
    """``data`` is a PNG signature and chunks with valid CRCs up to IEND."""
    if not data.startswith(SIGNATURE):
        return False
    view, pos = memoryview(data), len(SIGNATURE)
    while pos + 12 <= len(data):
        length, kind = struct.unpack_from(">I4s", data, pos)
        end = pos + 8 + length  # the chunk's CRC follows its type and data
        if end + 4 > len(data) or zlib.crc32(view[pos + 4 : end]) != struct.unpack_from(">I", data, end)[0]:
            return False
        if kind == b"IEND":
            return True
        pos = end + 4
    return False


def decode_png(data: bytes, mode: str) -> Image.Image | None:
    """The pixels of a plain PNG (``plain_png``) in ``mode``, decoded by libspng; None where its CRCs
    fail or libspng cannot decode it (PIL then decides)."""
    if not crcs_valid(data):
        return None
    try:
        pixels = pyspng.load(data, format=mode)  # (H, W, 3) or (H, W) uint8
    except Exception:
        return None
    return Image.fromarray(pixels)
