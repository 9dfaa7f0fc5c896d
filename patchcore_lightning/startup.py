"""What the entry points set up before Lightning is imported: no Triton; OpenMP left to the environment.

Called by ``lightning_cli.py`` and the benchmark's child processes through :func:`prepare_process`,
never by importing the package: a library must not change its importer's process.

Triton. ``torch._dynamo`` imports Triton (the GPU kernel compiler of ``torch.compile``) whenever it
is installed, and ``torch._dynamo`` itself is imported by torchvision (``torchvision.ops.roi_align``),
which torchmetrics and Lightning import: every process that imports Lightning loads Triton, ~80 MiB
of resident memory (measured: RSS 507 → 586 MiB for ``import triton`` after ``import torch``, 73 MiB
of it the pages of ``libtriton.so``), ~0.1 s, and nothing here ever uses it. PatchCore compiles
nothing: the backbone runs eagerly, the kNN is faiss or a matmul. :func:`skip_triton` makes
``import triton`` raise ImportError in this process, which torch treats as "Triton is not
installed" (``torch.utils._triton.has_triton_package``). ``PATCHCORE_IMPORT_TRITON=1`` keeps it.

OpenMP: nothing is set. The faiss wheel bundles its own libgomp, but torch loads its libgomp into
the process's global symbol scope first, and faiss's and its OpenBLAS's ``GOMP_parallel`` calls bind
to torch's copy (``LD_DEBUG=bindings``): one thread pool runs both, under the ``GOMP_SPINCOUNT`` /
``OMP_WAIT_POLICY`` the environment held when torch was imported. (An earlier version set
``GOMP_SPINCOUNT=2000`` after importing torch, meant for faiss's copy; it reached no parallel region:
CPU spun by the pool in the 50 ms after a search, median of 20: 8.9 ms with it, 8.5 ms without,
0.08 ms with ``GOMP_SPINCOUNT=2000`` set before Python started.)
"""

from __future__ import annotations

import os
import sys

__all__ = ["ENV_KEEP_TRITON", "prepare_process", "skip_triton"]

ENV_KEEP_TRITON = "PATCHCORE_IMPORT_TRITON"


def prepare_process() -> dict[str, bool]:
    """:func:`skip_triton`; what it did. Call before anything imports Lightning."""
    return {"triton_skipped": skip_triton()}


def skip_triton() -> bool:
    """Block ``import triton`` in this process; True if blocked, False if kept or already imported.

    Has no effect when Triton is already imported (blocking then would break its importers) or when
    ``PATCHCORE_IMPORT_TRITON=1``. Only ``torch.compile`` with the inductor backend on a GPU needs
    Triton, and torch then believes it is not installed (not exercised here: no GPU, and nothing
    in this package compiles).
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
