"""The GPU path's logic, on the CPU: the torch search gives the original's numbers, the data settings
follow the device, and fit's on-device coreset selects what a direct computation selects."""

from __future__ import annotations

import json

import faiss
import pytest
import torch

from patchcore_lightning.cli import PatchCoreCLI, main
from patchcore_lightning.coreset import approx_greedy_coreset
from patchcore_lightning.data.datamodule import GPU_MAX_WORKERS, loader_settings
from patchcore_lightning.data.mvtec import MVTecDataset, list_samples
from patchcore_lightning.model import Backbones, PatchCore
from patchcore_lightning.model_io import PatchCoreParams

from .conftest import FIXTURE, fixture_args

META = json.loads((FIXTURE / "original_metrics.json").read_text())


@pytest.mark.kernels
def test_the_torch_search_gives_the_faiss_searchs_numbers(resnet18_weights, tmp_path):
    """Both searches take their candidates by the float32 formula, whose last bits depend on the BLAS
    kernel (faiss's, MKL's, a GPU's), and compute the candidates' distances exactly (memory_bank): the
    same raw scores and maps, bit for bit, so the same metrics, on any CPU."""
    runs = {}
    for backend in ("torch", "faiss"):
        cli = PatchCoreCLI(args=[
            "test", *fixture_args(resnet18_weights, tmp_path / backend, "--model.knn_backend", backend, "--trainer.logger", "false")
        ])
        assert cli.model.model.banks[0].kind == backend
        runs[backend] = cli.evaluation
    assert torch.equal(runs["torch"].raw_scores, runs["faiss"].raw_scores)
    assert torch.equal(runs["torch"].maps, runs["faiss"].maps)  # normalised from equal raw maps
    for name in META["metrics"]:
        assert getattr(runs["torch"], name) == getattr(runs["faiss"], name), name


def test_loader_settings_follow_the_device(monkeypatch):
    from patchcore_lightning.data import datamodule

    monkeypatch.setattr(datamodule, "_cores", lambda: 40)
    assert loader_settings(None, None, "cpu") == (2, 2)  # the backbone needs the cores
    assert loader_settings(None, None, "cuda") == (32, GPU_MAX_WORKERS)
    assert loader_settings(None, None, "cuda", processes_per_node=4) == (32, 9)  # 40 cores / 4 ranks, less one
    assert loader_settings(8, 3, "cuda") == (8, 3) and loader_settings(4, 0, "cpu") == (4, 0)  # as given
    monkeypatch.setattr(datamodule, "_cores", lambda: 1)
    assert loader_settings(None, None, "cuda") == (32, 1) and loader_settings(None, None, "cpu") == (2, 1)


def test_the_datamodule_pins_memory_for_a_gpu():
    from patchcore_lightning.data.datamodule import AnomalyDataModule

    class _Trainer:
        world_size, global_rank, num_devices = 1, 0, 1
        strategy = type("S", (), {"root_device": torch.device("cuda", 0)})()

    dm = AnomalyDataModule(categories=["x"], num_workers=0)
    dm.trainer = _Trainer()
    loader = dm._loader(list(range(40)))
    assert loader.pin_memory and len(loader.batch_sampler) == 2  # 32 a batch: 32 + 8


@pytest.mark.kernels
def test_fit_selects_what_the_coreset_selects_from_the_training_features(mvtec_root, resnet18_weights, tmp_path):
    """The features stay where the model runs and are subsampled there, with a CPU generator seeded by
    seed_everything: the bank is exactly the direct computation's selection (today's, on the CPU)."""
    main([
        "fit", "--data.root", str(mvtec_root), "--data.categories", "[alpha]", "--data.resize", "72",
        "--data.imagesize", "64", "--data.num_workers", "0", "--data.batch_size", "2",
        "--model.backbone_weights", str(resnet18_weights), "--model.backbones", "[resnet18]",
        "--model.pretrain_embed_dimension", "96", "--model.target_embed_dimension", "64",
        "--model.percentage", "0.3", "--seed_everything", "7",
        "--trainer.accelerator", "cpu", "--trainer.logger", "false", "--results_dir", str(tmp_path),
    ])
    index = faiss.read_index(str(tmp_path / "models" / "mvtec_alpha" / "nnscorer_search_index.faiss"))
    bank = torch.as_tensor(index.reconstruct_n(0, index.ntotal))  # faiss.contrib.torch_utils may be loaded
    params = PatchCoreParams("resnet18", ("layer2", "layer3"), (3, 64, 64), 96, 64, 3, 1, 1)
    model = PatchCore([params], [Backbones(str(resnet18_weights)).get(params)])
    dataset = MVTecDataset(list_samples(mvtec_root, "alpha", "train"), 72, 64)
    images = torch.stack([dataset[i][0] for i in range(len(dataset))])
    with torch.no_grad():
        features = torch.cat([model.patch_features(batch, 0)[0] for batch in images.split(2)])
    keep = approx_greedy_coreset(features, 0.3, torch.Generator().manual_seed(7))
    assert torch.equal(bank, features[keep])
