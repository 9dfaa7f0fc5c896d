"""What lightning_cli.py sets up before torch loads (no Triton, GOMP_SPINCOUNT), and only there.

Each case runs in a fresh interpreter: the pytest process has long imported torch and Lightning.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

from patchcore_lightning import startup

ROOT = Path(__file__).resolve().parent.parent

needs_triton = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton not installed")

# after importing what the CLI imports: is Triton loaded, what does torch believe, what did it log
PROBE = """
import sys
import lightning, torchmetrics, torch.utils._triton as t
import patchcore_lightning.cli
import torch._dynamo
print("LOADED", sys.modules.get("triton") is not None, "HAS", t.has_triton_package())
"""


def _run(code: str, **env: str) -> subprocess.CompletedProcess:
    environment = {**os.environ, "PYTHONPATH": str(ROOT)}
    for name in ("PATCHCORE_IMPORT_TRITON", "GOMP_SPINCOUNT", "OMP_WAIT_POLICY", startup.ENV_SPIN_SET_HERE):
        environment.pop(name, None)
    environment.update(env)
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=environment, cwd=ROOT)


@needs_triton
def test_lightning_imports_triton_unless_skipped():
    plain = _run(PROBE)
    assert plain.returncode == 0, plain.stderr
    assert "LOADED True HAS True" in plain.stdout  # what skip_triton exists for

    skipped = _run("from patchcore_lightning.startup import skip_triton\nassert skip_triton()\n" + PROBE)
    assert skipped.returncode == 0, skipped.stderr
    assert "LOADED False HAS False" in skipped.stdout
    assert "triton" not in skipped.stderr.lower(), skipped.stderr  # flop_counter's warning is muted


@needs_triton
def test_the_entry_point_skips_triton_before_lightning_is_imported():
    # lightning_cli.py run as a module file (its main() only runs as __main__)
    probe = "import runpy\nrunpy.run_path('lightning_cli.py')\n" + PROBE
    result = _run(probe)
    assert result.returncode == 0, result.stderr
    assert "LOADED False HAS False" in result.stdout


SPIN_PROBE = """
import os, sys, runpy
runpy.run_path('lightning_cli.py')
torch_libgomp = [line.split()[-1] for line in open('/proc/self/maps') if 'torch/lib/libgomp' in line]
import faiss
print('SPIN', os.environ.get('GOMP_SPINCOUNT'), 'TORCH_GOMP_LOADED', bool(torch_libgomp))
"""


def test_the_entry_point_limits_openmp_spinning_for_faiss_only():
    # torch (and its libgomp) loaded before the value is set: libgomp reads it only when loaded
    out = _run(SPIN_PROBE).stdout
    assert f"SPIN {startup.FAISS_SPINCOUNT} TORCH_GOMP_LOADED True" in out
    # the user's choice stands
    assert "SPIN 5" in _run(SPIN_PROBE, GOMP_SPINCOUNT="5").stdout
    assert "SPIN None" in _run(SPIN_PROBE, OMP_WAIT_POLICY="passive").stdout
    # a value set by a parent's entry point (the DDP launcher's children inherit it) is set again after torch
    inherited = {"GOMP_SPINCOUNT": startup.FAISS_SPINCOUNT, startup.ENV_SPIN_SET_HERE: startup.FAISS_SPINCOUNT}
    probe = "from patchcore_lightning import startup\nprint('SET', startup.limit_openmp_spin())"
    assert "SET True" in _run(probe, **inherited).stdout
    assert "SET False" in _run(probe, GOMP_SPINCOUNT=startup.FAISS_SPINCOUNT).stdout  # the user's own 2000


def test_openmp_spin_is_not_set_once_faiss_is_loaded(monkeypatch):
    monkeypatch.delenv("GOMP_SPINCOUNT", raising=False)
    monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)
    monkeypatch.delenv(startup.ENV_SPIN_SET_HERE, raising=False)
    monkeypatch.setitem(sys.modules, "faiss", object())
    assert startup.limit_openmp_spin() is False
    assert "GOMP_SPINCOUNT" not in os.environ
    monkeypatch.delitem(sys.modules, "faiss")
    assert startup.limit_openmp_spin() is True
    assert os.environ["GOMP_SPINCOUNT"] == os.environ[startup.ENV_SPIN_SET_HERE] == startup.FAISS_SPINCOUNT


@needs_triton
def test_environment_variable_keeps_triton():
    probe = "from patchcore_lightning.startup import skip_triton\nassert not skip_triton()\n" + PROBE
    result = _run(probe, PATCHCORE_IMPORT_TRITON="1")
    assert result.returncode == 0, result.stderr
    assert "LOADED True HAS True" in result.stdout


def test_importing_the_package_changes_nothing():
    # the package itself never blocks anything: only entry points call skip_triton
    import patchcore_lightning.cli  # noqa: F401
    import patchcore_lightning.module  # noqa: F401

    assert "triton" not in sys.modules or sys.modules["triton"] is not None


def test_already_imported_triton_is_left_alone(monkeypatch):
    marker = object()
    monkeypatch.setitem(sys.modules, "triton", marker)
    monkeypatch.delenv(startup.ENV_KEEP_TRITON, raising=False)
    assert startup.skip_triton() is False
    assert sys.modules["triton"] is marker


def test_bad_environment_value_is_named(monkeypatch):
    monkeypatch.setenv(startup.ENV_KEEP_TRITON, "yes")
    with pytest.raises(ValueError, match=r"PATCHCORE_IMPORT_TRITON must be 0 or 1, got 'yes'"):
        startup.skip_triton()
