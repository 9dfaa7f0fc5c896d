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
