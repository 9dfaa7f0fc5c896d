"""The GPU scripts run to their end on the CPU (``--device cpu``). What they compute and check there is
the code a GPU runs, so a change that breaks them (a renamed bound, a moved helper) fails here, not
first on a lent GPU."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

from patchcore_lightning.metrics import METRIC_NAMES

ROOT = Path(__file__).resolve().parent.parent


def _script(name: str, *args: str) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / name), *args], capture_output=True, text=True,
                          cwd=ROOT, timeout=900)
    assert proc.returncode == 0, (proc.stdout[-3000:], proc.stderr[-3000:])
    return proc


def test_bench_gpu_runs_to_its_end_and_holds_its_agreement_check(tmp_path):
    _script("bench_gpu.py", "--device", "cpu", "--quick", "--workdir", str(tmp_path / "work"),
            "--json", str(tmp_path / "out.json"))
    eq = json.loads((tmp_path / "out.json").read_text())["equivalence"]
    assert eq["within_bound"] is True and set(eq["bound"]) == set(METRIC_NAMES)
    # both sides ran on this CPU at the same batch size: the same computation, bit for bit
    assert set(eq["difference"].values()) == {0.0} and set(eq["cli_difference"].values()) == {0.0}
    # the bound is the data's and not vacuous: features a few tens of u from float64 give ~1e-5 on these
    # data (the bound grows about linearly with them), so 1e-3 leaves another CPU's kernels a factor ~70
    assert all(0 < bound < 1e-3 for name, bound in eq["bound"].items() if name != "instance_auroc")


def test_gpu_equivalence_runs_to_its_end_and_holds_every_setting_to_its_bound(tmp_path):
    out = _script("gpu_equivalence.py", "--device", "cpu", "--workdir", str(tmp_path / "work")).stdout
    assert "every difference within its bound" in out
    # two categories, three settings, five metrics each: the difference of this process's and of
    # results.csv's metrics and its bound
    checks = re.findall(r"  (\w+): \|(\S+) - cpu\| (\S+) \(CLI (\S+)\), bound (\S+)", out)
    assert len(checks) == 2 * 3 * 5 and {c[0] for c in checks} == set(METRIC_NAMES)
    assert {c[1] for c in checks} == {"gpu", "gpu+faiss", "gpu+tf32"}
    assert all(float(diff) == float(cli) == 0.0 and float(bound) > 0 for _, _, diff, cli, bound in checks)
    # this process computes what the CLI wrote, so the bound it derives holds results.csv
    same = re.findall(r"this process's CPU metrics vs the CLI's results.csv: largest difference (\S+)", out)
    assert same == ["0", "0"]
