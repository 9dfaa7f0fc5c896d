"""PNG decoding by libspng (``pyspng``) where it gives PIL's pixels, in ~60 % of PIL's time.

Decoding dominates a data item of MVTec-sized PNGs (1024²: ~24 ms with PIL, ~15 with libspng, of
an item of ~32 and ~25 ms), and on a GPU the DataLoader workers' decoding is the floor of the test
loop's speed (``benchmarks/bench_decode.py``). PNG is lossless, so every correct decoder gives the same 8-bit
values. libspng gets only the plain case: a single-frame PNG that PIL reads as 8-bit RGB or gray
in the mode asked for, without conversion, and a 16-bit gray or RGB PNG asked for as RGB, whose
samples libspng reduces to their top 8 bits as PIL does for 16-bit colour (and ``images.py`` for
16-bit gray). Every other file (palette, alpha, 1/2/4-bit, animated, another mode asked for,
another format) is PIL's.

pyspng runs libspng without checking the chunks' CRCs, and a damaged file then decodes to other
pixels without an error. :func:`decode_png` checks every chunk's CRC first and declines a file
that fails, or that libspng cannot decode, so that PIL decodes it or raises its own error.
"""

from __future__ import annotations

import struct
import zlib

import numpy as np
import pyspng
from PIL import Image

__all__ = ["crcs_valid", "decode_png", "plain_png", "png_sample_depth", "png_samples"]

SIGNATURE = b"\x89PNG\r\n\x1a\n"


# (PIL's mode, its raw mode) of the 16-bit PNGs whose RGB libspng gives: the samples' top 8 bits.
_SIXTEEN_BIT_RGB = frozenset({("RGB", "RGB;16B"), ("I;16", "I;16B")})


def plain_png(img: Image.Image, mode: str) -> bool:
    """``img`` (opened, not loaded) is a single-frame PNG whose pixels PIL reads as ``mode`` ("RGB"
    or "L") as they are stored (8-bit), or a 16-bit gray or RGB one asked for as "RGB"."""
    if img.format != "PNG" or mode not in ("RGB", "L") or getattr(img, "is_animated", False):
        return False
    if len(img.tile) != 1:
        return False
    codec, _, _, rawmode = tuple(img.tile[0])[:4]
    if codec != "zip":
        return False
    return (img.mode == mode and rawmode == mode) or (mode == "RGB" and (img.mode, rawmode) in _SIXTEEN_BIT_RGB)


def png_sample_depth(img: Image.Image) -> int:
    """The bits of a sample of ``img`` (a PNG, opened, not loaded): 16 or 8 (8 also for 1, 2, 4)."""
    return 16 if img.tile and ";16" in str(tuple(img.tile[0])[3]) else 8


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


def png_samples(data: bytes) -> np.ndarray | None:
    """A PNG's samples as stored, by libspng: (H, W, 4) RGBA or (H, W, 2) gray+alpha, uint16 for a
    16-bit PNG (alpha 65535 where the file has none); None where its CRCs fail or libspng cannot
    decode it."""
    if not crcs_valid(data):
        return None
    try:
        return pyspng.load(data)
    except Exception:
        return None
