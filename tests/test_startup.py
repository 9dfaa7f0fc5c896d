"""What lightning_cli.py sets up before torch loads (no Triton; OpenMP left alone), and only there.

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
    for name in ("PATCHCORE_IMPORT_TRITON", "GOMP_SPINCOUNT", "OMP_WAIT_POLICY"):
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
import os, runpy
runpy.run_path('lightning_cli.py')
import faiss
print('SPIN', os.environ.get('GOMP_SPINCOUNT'), 'WAIT', os.environ.get('OMP_WAIT_POLICY'))
"""


def test_the_entry_point_leaves_openmp_settings_to_the_user():
    # faiss's parallel regions run in torch's libgomp (see startup.py): a value set after torch loads
    # reaches no thread, so the entry point sets none; the user's, set before start, governs both
    assert "SPIN None WAIT None" in _run(SPIN_PROBE).stdout
    assert "SPIN 5 WAIT passive" in _run(SPIN_PROBE, GOMP_SPINCOUNT="5", OMP_WAIT_POLICY="passive").stdout


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
