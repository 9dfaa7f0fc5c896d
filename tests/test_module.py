"""PatchCoreModule's own rules: argument validation, model paths per category, the DDP strategy, fit's gather."""

from __future__ import annotations

import pytest
import torch
from lightning.pytorch.strategies import DDPStrategy

from patchcore_lightning.cli import _model_path
from patchcore_lightning.model import PatchCore
from patchcore_lightning.model_io import PatchCoreParams
from patchcore_lightning.module import FrozenModelDDPStrategy, PatchCoreModule, _gather_rows, frozen_model_strategy


def test_model_paths_one_per_category_or_one_for_all():
    assert _model_path(["a"], 2, 3) == "a"
    assert _model_path(["a", "b", "c"], 2, 3) == "c"
    with pytest.raises(ValueError, match="model.model_paths has 2 entries for 3 categories"):
        _model_path(["a", "b"], 0, 3)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(percentage=0.0), "model.percentage must be in \\(0, 1\\], got 0.0"),
        (dict(patchsize=0), "model.patchsize must be >= 1, got 0"),
        (dict(target_embed_dimension=-2), "model.target_embed_dimension must be >= 1, got -2"),
        (dict(backbones=[]), "model.backbones is empty"),
        (dict(backbones=["resnet18"], layers={"resnet50": ["layer2"]}), "model.layers has no entry for backbones \\['resnet18'\\]"),
        (dict(heatmap_max=0.0), "model.heatmap_max must be > 0, got 0.0"),
        (dict(faiss_on_gpu=True), "model.faiss_on_gpu is replaced by model.knn_backend"),
        (dict(faiss_on_gpu=False), "model.faiss_on_gpu is replaced by model.knn_backend"),
    ],
)
def test_bad_options_name_the_value(kwargs, message):
    with pytest.raises(ValueError, match=message):
        PatchCoreModule(**kwargs)


def test_member_params_are_the_originals_terms():
    module = PatchCoreModule(backbones=["resnet18", "densenet201"], target_embed_dimension=64, anomaly_scorer_num_nn=3,
                             layers={"resnet18": ["layer2"], "densenet201": ["features.denseblock2"]})
    first, second = module.member_params(96)
    assert first == PatchCoreParams("resnet18", ("layer2",), (3, 96, 96), 1024, 64, 3, 1, 3)
    assert second.backbone == "densenet201" and second.layers == ("features.denseblock2",)


def test_ddp_by_name_leaves_the_frozen_model_unwrapped():
    strategy = frozen_model_strategy("ddp")
    assert isinstance(strategy, FrozenModelDDPStrategy) and isinstance(strategy, DDPStrategy)
    assert frozen_model_strategy("ddp_spawn")._start_method == "spawn"
    assert frozen_model_strategy("auto") is None and frozen_model_strategy(None) is None
    assert frozen_model_strategy("single_device") is None
    model = torch.nn.Linear(2, 2)
    strategy.model = model
    strategy.configure_ddp()
    assert strategy.model is model  # DDPStrategy would wrap it in DistributedDataParallel


def test_rows_are_kept_as_they_are_without_a_process_group():
    x = torch.arange(6.0).view(3, 2)
    assert _gather_rows(x) is x


def test_the_backbones_stay_in_eval_mode_when_the_model_is_trained(resnet18_weights):
    from patchcore_lightning.model import Backbones

    params = PatchCoreParams("resnet18", ("layer2",), (3, 64, 64), 32, 16, 3, 1, 1)
    model = PatchCore([params], [Backbones(str(resnet18_weights)).get(params)])
    model.train()
    assert model.training and not model.extractors[0].training
    assert not any(m.training for m in model.extractors[0].modules())
