"""What the entry points set up before torch is imported: no Triton, short OpenMP spin-waits for faiss.

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

OpenMP. torch and faiss each bring their own GNU OpenMP runtime (two libgomp copies, two thread
pools). After a parallel region a libgomp thread spins before it sleeps, by default 300,000 pause
instructions, several milliseconds on this CPU. torch's threads need that: its backbone runs one
parallel region after another, and threads that slept in the gaps wake late when the DataLoader
workers hold the cores. faiss's do not: after each search (one per batch) its threads spun on the
cores the blur and the next backbone pass needed. :func:`limit_openmp_spin` therefore loads torch
first, with the environment as it is, and only then sets ``GOMP_SPINCOUNT=2000`` for the runtime
faiss loads later; nothing when ``GOMP_SPINCOUNT`` or ``OMP_WAIT_POLICY`` is set by the user. It
changes no number, only who waits how. Measured with ``benchmarks/bench_eval.py`` on 2 cores
(ratio total / (backbone + kNN), one run each unless said): libgomp's default 1.263, 1.266, 1.271;
``GOMP_SPINCOUNT=20000`` for both 1.177, 1.202, 1.223, 1.275 (the backbone inside the loop
126-133 ms/img against 104-113 alone); 2000 for faiss only 1.173 and 1.209 (backbone 109.5-109.8
against 103-114 alone).
"""

from __future__ import annotations

import os
import sys

__all__ = [
    "ENV_KEEP_TRITON", "ENV_SPIN_SET_HERE", "FAISS_SPINCOUNT", "limit_openmp_spin", "prepare_process", "skip_triton"
]

ENV_KEEP_TRITON = "PATCHCORE_IMPORT_TRITON"
ENV_SPIN_SET_HERE = "PATCHCORE_SET_GOMP_SPINCOUNT"  # marks a GOMP_SPINCOUNT that limit_openmp_spin set
FAISS_SPINCOUNT = "2000"


def prepare_process() -> dict[str, bool]:
    """:func:`limit_openmp_spin` (it imports torch, which does not import Triton), then :func:`skip_triton`.

    What each did. Call before anything imports torch.
    """
    spin_limited = limit_openmp_spin()
    return {"openmp_spin_limited": spin_limited, "triton_skipped": skip_triton()}


def limit_openmp_spin() -> bool:
    """Load torch's OpenMP runtime as the environment says, then set ``GOMP_SPINCOUNT`` for faiss's.

    True if set here. libgomp reads its environment once, when it is loaded: nothing is set once
    faiss is imported, nor when the user chose ``GOMP_SPINCOUNT`` or ``OMP_WAIT_POLICY``. A value
    this function set in a parent process (Lightning's DDP launcher starts the entry point again
    with the parent's environment) is taken back before torch loads, so that every process splits
    the same way.
    """
    inherited = os.environ.pop(ENV_SPIN_SET_HERE, None)
    if inherited is not None and inherited == os.environ.get("GOMP_SPINCOUNT") and "torch" not in sys.modules:
        del os.environ["GOMP_SPINCOUNT"]  # ours, from a parent process: not the user's choice
    if "GOMP_SPINCOUNT" in os.environ or "OMP_WAIT_POLICY" in os.environ or "faiss" in sys.modules:
        return False
    import torch  # noqa: F401  (its libgomp is loaded now, with libgomp's default spin)

    os.environ["GOMP_SPINCOUNT"] = os.environ[ENV_SPIN_SET_HERE] = FAISS_SPINCOUNT
    return True


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
