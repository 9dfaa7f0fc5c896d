"""Handing freed heap memory back to the operating system.

glibc keeps memory that the process has freed in its heap for reuse; on a CPU run that is most of
the difference between the memory the evaluation uses and its peak RSS: a batch's working memory
(backbone activations, patch features, kNN blocks) stays in the heap, in pieces too small for the
large blocks that come next (the category's normalised maps). ``malloc_trim`` returns the free
pages; it is called a few times per category (after the models are loaded, before the metrics are
computed), never per batch: pages handed back must be faulted in again.
"""

from __future__ import annotations

import ctypes
import functools
import sys

__all__ = ["release_free_heap"]


@functools.lru_cache(maxsize=1)
def _malloc_trim():
    """glibc's ``malloc_trim``, or None where the C library has none (macOS, Windows, musl)."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        trim = ctypes.CDLL(None).malloc_trim  # the C library this process already runs on
    except (OSError, AttributeError):
        return None
    trim.argtypes = [ctypes.c_size_t]
    trim.restype = ctypes.c_int
    return trim


def release_free_heap() -> bool:
    """Return the free pages of the C heap to the operating system; False where that is unavailable.

    Frees nothing that is in use and changes no number: it only makes peak RSS track live memory.
    """
    trim = _malloc_trim()
    if trim is None:
        return False
    trim(0)
    return True
