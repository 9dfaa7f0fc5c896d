"""PatchCoreModule's own rules: model paths per category, faiss placement, argument validation."""

from __future__ import annotations

import pytest
import torch

from patchcore_lightning.memory_bank import gpu_faiss_available
from patchcore_lightning.module import PatchCoreModule


def test_model_paths_one_per_category_or_one_for_all():
    assert PatchCoreModule(model_paths=["a"]).model_path_for(2, 3) == "a"
    assert PatchCoreModule(model_paths=["a", "b", "c"]).model_path_for(2, 3) == "c"
    with pytest.raises(ValueError, match="model.model_paths has 2 entries for 3 categories"):
        PatchCoreModule(model_paths=["a", "b"]).model_path_for(0, 3)


@pytest.mark.skipif(gpu_faiss_available(), reason="needs a machine where faiss or torch sees no GPU")
def test_faiss_on_gpu_without_a_gpu_warns_and_stays_on_the_cpu():
    with pytest.warns(UserWarning, match="faiss_on_gpu=true but faiss or torch sees no GPU"):
        assert PatchCoreModule(faiss_on_gpu=True)._bank_device() == torch.device("cpu")
    assert PatchCoreModule(faiss_on_gpu=False)._bank_device() == torch.device("cpu")


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(percentage=0.0), "model.percentage must be in \\(0, 1\\], got 0.0"),
        (dict(patchsize=0), "model.patchsize must be >= 1, got 0"),
        (dict(backbones=[]), "model.backbones is empty"),
        (dict(backbones=["resnet18"], layers={"resnet50": ["layer2"]}), "model.layers has no entry for backbones \\['resnet18'\\]"),
    ],
)
def test_bad_fit_options_name_the_value(kwargs, message):
    with pytest.raises(ValueError, match=message):
        PatchCoreModule(**kwargs)


def test_patch_features_are_embedded_one_image_at_a_time_with_the_batchs_bits(monkeypatch):
    from patchcore_lightning import module as module_py
    from patchcore_lightning.model_io import PatchCoreParams

    module = PatchCoreModule(backbone_weights="random")
    params = PatchCoreParams("resnet18", ("layer2", "layer3"), (3, 64, 64), 96, 64, 3, 1, 1)
    key = module._extractor(params)
    images = torch.randn(3, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    batch_sizes = []
    embed = module_py.embed

    def spy(layer_feats, *args):
        batch_sizes.append(layer_feats[0].shape[0])
        return embed(layer_feats, *args)

    monkeypatch.setattr(module_py, "embed", spy)
    with torch.no_grad():
        feats, grid = module._patch_features(key, params, images)
        layer_maps = module.extractors[key](images)
    expected, expected_grid = embed([layer_maps[layer] for layer in params.layers], 3, 1, 96, 64)  # the whole batch
    assert batch_sizes == [1, 1, 1]
    assert grid == expected_grid and torch.equal(feats, expected)
