"""What the entry points set up before torch is imported: no Triton, short OpenMP spin-waits.

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
instructions, several milliseconds on this CPU: every switch between torch (backbone, aggregation,
blur) and faiss (kNN) leaves the other library's threads spinning on the cores the next phase
needs, and the DataLoader workers cannot decode meanwhile. :func:`limit_openmp_spin` sets
``GOMP_SPINCOUNT=20000`` (well over the gaps between one library's back-to-back regions) unless
``GOMP_SPINCOUNT`` or ``OMP_WAIT_POLICY`` is set already. It changes no number, only who waits
how. Measured with ``benchmarks/bench_eval.py`` on 2 cores: ratio total / (backbone + kNN) 1.263,
1.266, 1.271 with the default (three runs), 1.202 with 20000 and 1.214 with 2000 (one run each);
the kNN inside the loop took 56-63 ms/img against 47-48 alone by default, 47 against 49 with 20000.
"""

from __future__ import annotations

import os
import sys

__all__ = ["ENV_KEEP_TRITON", "OPENMP_SPINCOUNT", "limit_openmp_spin", "prepare_process", "skip_triton"]

ENV_KEEP_TRITON = "PATCHCORE_IMPORT_TRITON"
OPENMP_SPINCOUNT = "20000"


def prepare_process() -> dict[str, bool]:
    """:func:`limit_openmp_spin`, then :func:`skip_triton` (which imports torch); what each did.

    Call before anything imports torch.
    """
    spin_limited = limit_openmp_spin()
    return {"openmp_spin_limited": spin_limited, "triton_skipped": skip_triton()}


def limit_openmp_spin() -> bool:
    """Set ``GOMP_SPINCOUNT`` for the OpenMP runtimes torch and faiss load; True if set here.

    libgomp reads its environment once, when it is loaded: nothing is set (False) once torch or
    faiss is imported, nor when the user chose ``GOMP_SPINCOUNT`` or ``OMP_WAIT_POLICY``.
    """
    if "GOMP_SPINCOUNT" in os.environ or "OMP_WAIT_POLICY" in os.environ:
        return False
    if "torch" in sys.modules or "faiss" in sys.modules:
        return False
    os.environ["GOMP_SPINCOUNT"] = OPENMP_SPINCOUNT
    return True


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
