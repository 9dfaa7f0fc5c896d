"""Keeping Triton out of the evaluation process.

``torch._dynamo`` imports Triton (the GPU kernel compiler of ``torch.compile``) whenever it is
installed, and ``torch._dynamo`` itself is imported by torchvision (``torchvision.ops.roi_align``),
which torchmetrics and Lightning import: every process that imports Lightning loads Triton, ~80 MiB
of resident memory (measured: RSS 507 → 586 MiB for ``import triton`` after ``import torch``, 73 MiB
of it the pages of ``libtriton.so``), ~0.1 s, and nothing here ever uses it. PatchCore compiles
nothing: the backbone runs eagerly, the kNN is faiss or a matmul.

:func:`skip_triton` is called by the entry points (``lightning_cli.py``, the benchmark's child
processes) before Lightning is imported, never by importing the package: a library must not change
what its importer's ``torch.compile`` can do. It makes ``import triton`` raise ImportError in this
process, which torch treats as "Triton is not installed" (``torch.utils._triton.has_triton_package``).
Set ``PATCHCORE_IMPORT_TRITON=1`` to keep the normal import.
"""

from __future__ import annotations

import os
import sys

__all__ = ["ENV_KEEP_TRITON", "skip_triton"]

ENV_KEEP_TRITON = "PATCHCORE_IMPORT_TRITON"


def skip_triton() -> bool:
    """Block ``import triton`` in this process; True if blocked, False if kept or already imported.

    Has no effect when Triton is already imported (blocking then would break its importers) or when
    ``PATCHCORE_IMPORT_TRITON=1``. Only ``torch.compile`` with the inductor backend on a GPU needs
    Triton; it then fails loudly ("Cannot find a working triton installation"), never silently.
    """
    keep = os.environ.get(ENV_KEEP_TRITON, "0")
    if keep not in ("0", "1"):
        raise ValueError(f"{ENV_KEEP_TRITON} must be 0 or 1, got {keep!r}")
    if keep == "1" or "triton" in sys.modules:
        return False
    sys.modules["triton"] = None  # the import system's marker for "this module cannot be imported"
    _import_quietly("torch.utils.flop_counter")
    return True


def _import_quietly(name: str) -> None:
    """Import ``name`` with its logger's warnings muted, then restore the logger's level.

    ``torch.utils.flop_counter`` (imported by Lightning's throughput utilities) logs "triton not found;
    flop counting will not work for triton kernels" on import in a CUDA build of torch: true, and the
    direct consequence of :func:`skip_triton`, so it is not repeated to the user on every run.
    """
    import importlib
    import logging

    import torch  # noqa: F401  (torch configures its loggers on import; the level is set after that)

    logger = logging.getLogger(name)
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        importlib.import_module(name)
    finally:
        logger.setLevel(level)
