"""The exported search is bounded: a 200,000-row bank scores one image under ONNX Runtime with a
peak RSS below the model's files + 1 GB (the child process's VmHWM). One graph without the
chunked Loop takes 2.15 GB here (its distance block, and ONNX Runtime's pre-packed copy of a
constant bank): benchmarks/README.md."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import torch

from patchcore_lightning.export import export_model
from patchcore_lightning.memory_bank import MemoryBank
from patchcore_lightning.model import Backbones, PatchCore

from .conftest import FIXTURE
from .test_export import DEPLOY, without_torch

ROWS = 200_000

_MEASURE = """
import importlib.util, json, sys
import numpy as np
spec = importlib.util.spec_from_file_location("patchcore_onnx", sys.argv[1])
deploy = importlib.util.module_from_spec(spec)
spec.loader.exec_module(deploy)
runtime = deploy.Runtime(sys.argv[2], "onnxruntime", "onnx")
images = np.random.default_rng(0).integers(0, 256, (1, 224, 224, 3), dtype=np.uint8)
score, members, maps = runtime(images)
# VmHWM: this program's own peak. (ru_maxrss would carry the parent's peak over the fork and exec.)
peak = next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmHWM:"))
print(json.dumps({"peak_kib": peak, "score": float(score[0])}))
"""


def test_a_200k_row_bank_runs_within_its_files_plus_1_gb(resnet18_weights, tmp_path):
    backbones = Backbones(str(resnet18_weights))
    fixture = PatchCore.from_folder(FIXTURE / "model", 224, backbones)  # resnet18, D = 1024, 28 x 28 patches
    vectors = torch.randn(ROWS, 1024, generator=torch.Generator().manual_seed(0))
    real = fixture.banks[0].vectors
    vectors[: len(real)] = real  # the real bank inside: scores of a real size
    model = PatchCore(fixture.params, list(fixture.extractors), [MemoryBank(vectors)])
    export = tmp_path / "export"
    export_model(model, export, 256, backbones.sha256)
    del model, vectors
    files = sum(p.stat().st_size for p in export.iterdir())
    assert files > ROWS * 1024 * 4
    result = subprocess.run([sys.executable, "-c", _MEASURE, str(DEPLOY), str(export)], env=without_torch(tmp_path),
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    measured = json.loads(result.stdout.strip().splitlines()[-1])
    peak = measured["peak_kib"] * 1024
    assert peak < files + (1 << 30), (peak / 2**20, files / 2**20)
    assert np.isfinite(measured["score"]) and measured["score"] > 0
