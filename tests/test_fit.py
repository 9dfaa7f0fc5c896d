"""fit writes the original's format through Lightning's fit loop, on one or two processes; fit → test round
trips; test without model_paths builds first."""

from __future__ import annotations

import json
import logging
import os
import pickle
import subprocess
import sys
from pathlib import Path

import faiss
import numpy as np
import pytest
from lightning.pytorch.callbacks import Callback

from patchcore_lightning.cli import main
from patchcore_lightning.reporting import RESULTS_COLUMNS, read_results

from . import original_oracle as oracle
from .bounds import FEATURE_ROUNDING

RESIZE, IMAGESIZE = 72, 64


def _common(mvtec_root, weights, results_dir, *extra):
    return [
        "--data.root", str(mvtec_root),
        "--data.categories", "[alpha,beta]",
        "--data.resize", str(RESIZE),
        "--data.imagesize", str(IMAGESIZE),
        "--data.num_workers", "0",
        "--model.backbone_weights", str(weights),
        "--model.backbones", "[resnet18]",
        "--model.pretrain_embed_dimension", "96",
        "--model.target_embed_dimension", "64",
        "--model.percentage", "0.25",
        "--trainer.accelerator", "cpu",
        "--trainer.logger", "false",
        "--results_dir", str(results_dir),
        *extra,
    ]


@pytest.fixture(scope="module")
def fitted(tmp_path_factory, mvtec_root, resnet18_weights):
    out = tmp_path_factory.mktemp("fit")
    main(["fit", *_common(mvtec_root, resnet18_weights, out)])
    return out


def test_fit_writes_the_original_format(fitted, mvtec_root, resnet18_weights):
    folder = fitted / "models" / "mvtec_alpha"
    with open(folder / "patchcore_params.pkl", "rb") as handle:
        params = pickle.load(handle)  # the original reads it with plain pickle.load
    assert params == {
        "backbone.name": "resnet18",
        "layers_to_extract_from": ("layer2", "layer3"),
        "input_shape": (3, IMAGESIZE, IMAGESIZE),
        "pretrain_embed_dimension": 96,
        "target_embed_dimension": 64,
        "patchsize": 3,
        "patchstride": 1,
        "anomaly_scorer_num_nn": 1,
    }
    index = faiss.read_index(str(folder / "nnscorer_search_index.faiss"))
    assert type(index) is faiss.IndexFlatL2 and index.d == 64
    n_patches = 3 * 8 * 8  # 3 training images, an 8x8 layer2 grid at 64x64
    assert index.ntotal == int(n_patches * 0.25)
    # every bank vector is one of the training patch features, computed the original's way
    run = oracle.build_backbone("resnet18", resnet18_weights, ("layer2", "layer3"), (3, IMAGESIZE, IMAGESIZE))
    feats, _ = oracle.embed(run(oracle.load_train_images(mvtec_root / "alpha", RESIZE, IMAGESIZE)), ("layer2", "layer3"), 3, 96, 64)
    bank = np.asarray(index.reconstruct_n(0, index.ntotal), dtype=np.float64)
    d = ((bank[:, None, :] - feats.double().numpy()[None]) ** 2).sum(-1).min(axis=1)
    # two float32 forwards in other batches (other kernels), each within FEATURE_ROUNDING |x| of the exact
    assert bool((np.sqrt(d) <= 2 * FEATURE_ROUNDING * (1 + FEATURE_ROUNDING) * np.linalg.norm(bank, axis=1)).all())
    sidecar = json.loads((folder / "patchcore_lightning.json").read_text())
    assert sidecar["sampler"] == "approx_greedy_coreset" and sidecar["percentage"] == 0.25
    assert sidecar["n_train_images"] == 3 and len(sidecar["weights_sha256"]["resnet18"]) == 64


@pytest.mark.kernels
def test_fit_then_test_equals_test_without_model_paths(fitted, mvtec_root, resnet18_weights, tmp_path):
    folders = [fitted / "models" / "mvtec_alpha", fitted / "models" / "mvtec_beta"]
    main(["test", *_common(mvtec_root, resnet18_weights, tmp_path / "a"), "--model.model_paths", f"[{folders[0]},{folders[1]}]"])
    main(["test", *_common(mvtec_root, resnet18_weights, tmp_path / "b")])
    first, second = read_results(tmp_path / "a" / "results.csv"), read_results(tmp_path / "b" / "results.csv")
    assert list(first) == ["mvtec_alpha", "mvtec_beta", "mean"]
    assert first == second  # same seed, same banks, same numbers
    assert (tmp_path / "b" / "models" / "mvtec_beta" / "nnscorer_search_index.faiss").is_file()
    # test on fit's results_dir without model_paths evaluates the folders fit wrote, unchanged
    index = folders[0] / "nnscorer_search_index.faiss"
    stamp = index.stat().st_mtime_ns
    main(["test", *_common(mvtec_root, resnet18_weights, fitted)])
    assert index.stat().st_mtime_ns == stamp
    assert read_results(fitted / "results.csv") == first
    for name in RESULTS_COLUMNS:
        assert 0.0 <= first["mean"][name] <= 1.0


def test_ensemble_fit_writes_prefixed_members(mvtec_root, resnet18_weights, tmp_path):
    main([
        "fit", *_common(mvtec_root, resnet18_weights, tmp_path),
        "--data.categories", "[alpha]",
        "--model.backbones", "[resnet18,resnet50]",
        "--model.backbone_weights", f"{{resnet18: {resnet18_weights}, resnet50: random}}",
        "--model.layers", "{resnet18: [layer2, layer3], resnet50: [layer2]}",
        "--model.sampler", "random",
    ])
    folder = tmp_path / "models" / "mvtec_alpha"
    names = sorted(p.name for p in folder.iterdir())
    assert names == [
        "Ensemble-1-2_nnscorer_search_index.faiss",
        "Ensemble-1-2_patchcore_params.pkl",
        "Ensemble-2-2_nnscorer_search_index.faiss",
        "Ensemble-2-2_patchcore_params.pkl",
        "patchcore_lightning.json",
    ]
    with open(folder / "Ensemble-2-2_patchcore_params.pkl", "rb") as handle:
        second = pickle.load(handle)
    assert second["backbone.name"] == "resnet50" and second["layers_to_extract_from"] == ("layer2",)


class BatchCounter(Callback):
    """Counts the training batches Lightning's fit loop hands to the module."""

    batches = 0

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        type(self).batches += len(batch[0])


def test_fit_runs_through_lightnings_fit_loop(mvtec_root, resnet18_weights, tmp_path):
    BatchCounter.batches = 0
    main(["fit", *_common(mvtec_root, resnet18_weights, tmp_path), "--data.categories", "[alpha]",
          "--data.batch_size", "2", "--trainer.callbacks+=tests.test_fit.BatchCounter"])
    assert BatchCounter.batches == 3  # every training image, in Lightning's batches
    assert (tmp_path / "models" / "mvtec_alpha" / "nnscorer_search_index.faiss").is_file()


class _Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def test_fit_of_several_categories_shows_lightnings_device_lines_once(mvtec_root, resnet18_weights, tmp_path):
    """fit builds a Trainer per category; Lightning's accelerator lines are shown for the first only."""
    records = _Records()
    lightning_log = logging.getLogger("lightning.pytorch.utilities.rank_zero")
    lightning_log.addHandler(records)
    try:
        main(["fit", *_common(mvtec_root, resnet18_weights, tmp_path)])  # two categories
    finally:
        lightning_log.removeHandler(records)
    assert sum(m.startswith("GPU available") for m in records.messages) == 1, records.messages
    assert sum(m.startswith("TPU available") for m in records.messages) == 1, records.messages
    assert (tmp_path / "models" / "mvtec_beta" / "nnscorer_search_index.faiss").is_file()


@pytest.mark.kernels
def test_fit_on_two_processes_builds_the_one_process_bank(mvtec_root, resnet18_weights, tmp_path):
    """Each process embeds its shard of the training images; the features are gathered in image order,
    so both processes subsample what one process would, and rank 0 writes the same folder."""
    script = Path(__file__).parent.parent / "lightning_cli.py"
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1"}

    def fit(out, *extra):
        # batches of one: rank 0 embeds images 0 and 2, rank 1 image 1, so the gather must reorder
        args = ["fit", *_common(mvtec_root, resnet18_weights, out), "--data.batch_size", "1", *extra]
        proc = subprocess.run([sys.executable, str(script), *args], capture_output=True, text=True, env=env, timeout=600)
        assert proc.returncode == 0, proc.stderr[-3000:]
        return out / "models"

    one = fit(tmp_path / "one")
    two = fit(tmp_path / "two", "--trainer.devices", "2", "--trainer.strategy", "ddp")
    for category in ("mvtec_alpha", "mvtec_beta"):
        banks = [faiss.read_index(str(m / category / "nnscorer_search_index.faiss")) for m in (one, two)]
        vectors = [np.asarray(b.reconstruct_n(0, b.ntotal)) for b in banks]
        assert vectors[0].shape == vectors[1].shape and np.array_equal(vectors[0], vectors[1]), category
        sidecar = json.loads((two / category / "patchcore_lightning.json").read_text())
        assert sidecar["n_train_images"] == 3
