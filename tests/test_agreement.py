"""Two CPU kernel settings evaluate the original's fixture model: their metrics lie within the bound
computed from the runs' own data (tests/agreement.py), as a GPU's and a CPU's must (bench_gpu.py)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch

from patchcore_lightning.model import Backbones, PatchCore

from .agreement import DeviceRun, agreement_bounds, category_tensors, device_run, metrics_of
from .bounds import FEATURE_ROUNDING
from .conftest import FIXTURE

ROOT = Path(__file__).parent.parent
# PyTorch's non-vectorised kernels and oneDNN's convolutions without AVX, one thread: other sums, in
# other orders, than this process's
OTHER_KERNELS = {"ATEN_CPU_CAPABILITY": "default", "ONEDNN_MAX_CPU_ISA": "SSE41", "OMP_NUM_THREADS": "1",
                 "MKL_ENABLE_INSTRUCTIONS": "SSE4_2"}

_RUN = """
import sys, torch
from tests.test_agreement import fixture_model, fixture_images
from tests.agreement import device_run
model = fixture_model(sys.argv[1])
images, _, _ = fixture_images()
device_run(model, images, "cpu").save(sys.argv[2])
"""


def fixture_model(weights) -> PatchCore:
    return PatchCore.from_folder(FIXTURE / "model", 224, Backbones(str(weights)))


def fixture_images() -> tuple[torch.Tensor, np.ndarray, np.ndarray]:
    """The fixture's test images (8, 3, 224, 224), labels (8,) and masks (8, 224, 224) uint8."""
    return category_tensors(FIXTURE / "data", "weave", 256, 224)


def test_two_kernel_settings_agree_within_the_bound_of_their_measured_rounding(resnet18_weights, tmp_path):
    model = fixture_model(resnet18_weights)
    images, labels, masks = fixture_images()
    ours = device_run(model, images, "cpu")
    env = {**os.environ, **OTHER_KERNELS, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    proc = subprocess.run([sys.executable, "-c", _RUN, str(resnet18_weights), str(tmp_path / "other.npz")],
                          capture_output=True, text=True, cwd=ROOT, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    other = DeviceRun.load(tmp_path / "other.npz")
    # each side's features are float32 roundings of the float64 forward: a few u, and within the a
    # priori bound of a float32 forward (bounds.FEATURE_ROUNDING)
    assert 0 < ours.rounding <= FEATURE_ROUNDING and 0 < other.rounding <= FEATURE_ROUNDING
    bounds = agreement_bounds(ours, other, model, labels, masks)
    a, b = metrics_of(ours, labels, masks), metrics_of(other, labels, masks)
    for name, bound in bounds.items():
        assert abs(a[name] - b[name]) <= bound, (name, a[name], b[name], bound)
    # the bound is the data's: here no (anomalous, normal) image pair ties within the rounding, so
    # the instance AUROC cannot move at all (its own float64 rounding aside)
    assert bounds["instance_auroc"] < 1e-12 and a["instance_auroc"] == b["instance_auroc"]

