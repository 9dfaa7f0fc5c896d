"""Running ``lightning_cli.py`` in a child process, as a user does, and timing it from the inside.

``run_cli(tree, argv)`` runs ``<tree>/lightning_cli.py`` with ``argv`` in a child process with this
folder prepended to its ``PYTHONPATH`` and ``--trainer.callbacks+=cli_timing.Stopwatch`` added; the child reports, at its
exit, the moments the stopwatch saw (relative to the process start), its peak RSS and that of its
largest DataLoader worker, and its peak GPU memory. The wrapper uses nothing of the checkout but its
command line, so any checkout with the same options can be timed.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from lightning.pytorch.callbacks import Callback

HERE = Path(__file__).resolve().parent

_WRAPPER = """
import atexit, json, os, resource, runpy, sys, time
out, script = sys.argv[1], sys.argv[2]
os.environ["STOPWATCH_START"] = repr(time.perf_counter())
def report():
    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    start = float(os.environ["STOPWATCH_START"])
    marks = {k[10:].lower(): float(v) - start for k, v in os.environ.items()
             if k.startswith("STOPWATCH_") and k != "STOPWATCH_START" and not k.startswith(("STOPWATCH_SUM_", "STOPWATCH_OPEN_"))}
    sums = {k[14:].lower(): float(v) for k, v in os.environ.items() if k.startswith("STOPWATCH_SUM_")}
    gpu = None
    if "torch" in sys.modules and sys.modules["torch"].cuda.is_initialized():
        gpu = sys.modules["torch"].cuda.max_memory_allocated() / 2**20
    with open(out, "w") as f:
        json.dump({"marks": marks, "sums": sums, "end": time.perf_counter() - start, "peak_rss_mib": me.ru_maxrss / 1024,
                   "workers_peak_rss_mib": kids.ru_maxrss / 1024, "gpu_peak_allocated_mib": gpu}, f)
atexit.register(report)
sys.argv = [script, *sys.argv[3:]]
sys.path.insert(0, os.path.dirname(script))
runpy.run_path(script, run_name="__main__")
"""


def _mark(name: str, first: bool = True) -> None:
    key = f"STOPWATCH_{name.upper()}"
    if not first or key not in os.environ:
        os.environ[key] = repr(time.perf_counter())


def _begin(name: str) -> None:
    os.environ[f"STOPWATCH_OPEN_{name.upper()}"] = repr(time.perf_counter())


def _end(name: str) -> None:
    """Adds the seconds since ``_begin(name)`` to the sum ``name``."""
    began = os.environ.pop(f"STOPWATCH_OPEN_{name.upper()}", None)
    if began is not None:
        key = f"STOPWATCH_SUM_{name.upper()}"
        os.environ[key] = repr(float(os.environ.get(key, "0")) + time.perf_counter() - float(began))


class Stopwatch(Callback):
    """Notes (in the environment, which the wrapper reads at exit) when the first test (predict) batch
    starts, when the last one ends, and where fit's epoch starts, ends and the model is written; and sums
    ``test_loop``: per category, from the moment the test DataLoader is requested (its workers
    start and decode the first batch after that) to the end of the last batch, before the metrics.
    """

    def setup(self, trainer, pl_module, stage: str) -> None:
        datamodule = trainer.datamodule
        if stage != "test" or datamodule is None or getattr(datamodule, "_stopwatch", False):
            return
        requested = datamodule.test_dataloader

        def test_dataloader():  # the same loader, noted when Lightning asks for it
            _begin("test_loop")
            _mark("test_loop_start")
            return requested()

        datamodule.test_dataloader = test_dataloader
        datamodule._stopwatch = True

    def on_test_epoch_end(self, trainer, pl_module) -> None:  # runs before the module's: the metrics follow
        _end("test_loop")

    def on_test_end(self, trainer, pl_module) -> None:  # after the callbacks' outputs of the category
        _mark("test_end", first=False)

    def on_test_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0) -> None:
        _mark("test_first_batch")

    def on_test_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        _mark("test_last_batch", first=False)

    def on_predict_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0) -> None:
        _mark("predict_first_batch")

    def on_predict_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        _mark("predict_last_batch", first=False)

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        _mark("fit_epoch_start")

    def on_train_epoch_end(self, trainer, pl_module) -> None:  # runs before the module's: features collected
        _mark("fit_features_done")

    def on_train_end(self, trainer, pl_module) -> None:  # after the module's epoch end: the banks are built
        _mark("fit_banks_done")


def run_cli(tree: Path, argv: list[str], env: dict | None = None) -> dict:
    """``lightning_cli.py`` of ``tree`` with ``argv`` in a child process: wall time, the stopwatch's
    marks, peak memory; raises SystemExit with the child's stderr if it fails."""
    with tempfile.TemporaryDirectory() as tmp:
        usage = Path(tmp) / "usage.json"
        environment = {**os.environ, **(env or {})}
        # prepended, never replaced: where packages were added with ``pip install --target DIR`` and
        # PYTHONPATH=DIR (torch preinstalled), the child needs DIR as much as this folder
        environment["PYTHONPATH"] = os.pathsep.join(p for p in (str(HERE), environment.get("PYTHONPATH")) if p)
        argv = [*argv, "--trainer.callbacks+=cli_timing.Stopwatch"]
        start = time.perf_counter()
        proc = subprocess.run([sys.executable, "-c", _WRAPPER, str(usage), str(tree / "lightning_cli.py"), *argv],
                              cwd=tree, capture_output=True, text=True, env=environment)
        wall = time.perf_counter() - start
        if proc.returncode != 0:
            raise SystemExit(f"{tree}: lightning_cli.py {argv[0]} failed:\n{proc.stderr[-3000:]}")
        return {"wall_s": wall, **json.loads(usage.read_text()), "stderr": proc.stderr}
