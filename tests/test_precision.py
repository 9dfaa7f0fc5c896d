"""TF32 (``--model.allow_tf32``) reaches the backbone only: the torch search's candidate products and
the maps' blur run in float32 whatever the flags say, and the caller's flags are back afterwards.

cuDNN and cuBLAS read torch's flags when a convolution or product runs, so the flags are recorded at
that moment (on a CPU too, where they act on nothing): what a GPU would see."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from patchcore_lightning.anomaly_map import gaussian_blur
from patchcore_lightning.memory_bank import MemoryBank


def _flags() -> tuple[bool, bool]:
    return torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32


def _seen_while(allowed: bool, monkeypatch, owner, name: str, run) -> tuple[list, tuple[bool, bool]]:
    """Runs ``run()`` with both TF32 flags set to ``allowed``, recording the flags at each call of
    ``owner.name``; → (the flags seen at each call, the flags after ``run``)."""
    seen = []
    original = getattr(owner, name)

    def recording(*args, **kwargs):
        seen.append(_flags())
        return original(*args, **kwargs)

    monkeypatch.setattr(owner, name, recording)
    before = _flags()  # properties of torch's, not monkeypatch's to set
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = allowed
    try:
        run()
        after = _flags()
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = before
    return seen, after


@pytest.mark.parametrize("allowed", [True, False])
def test_the_torch_search_multiplies_in_float32(monkeypatch, allowed):
    """TF32's 10-bit products would move |x|² + |y|² - 2 x·y by ~1e-3 of |x|², more than the gaps
    between a query's nearest rows: the exact re-ranking would rank the wrong candidates."""
    g = torch.Generator().manual_seed(0)
    bank = MemoryBank(torch.randn(50, 8, generator=g), knn_backend="torch")
    queries = torch.randn(6, 8, generator=g)
    seen, after = _seen_while(allowed, monkeypatch, torch.Tensor, "addmm_", lambda: bank.search(queries, 2))
    assert seen and not any(matmul for _, matmul in seen)
    assert after == (allowed, allowed)


@pytest.mark.parametrize("allowed", [True, False])
def test_the_blur_convolves_in_float32(monkeypatch, allowed):
    """TF32 would move every map value by ~1e-3 of itself, for no speed that matters."""
    maps = torch.rand(2, 20, 24, generator=torch.Generator().manual_seed(0))
    seen, after = _seen_while(allowed, monkeypatch, F, "conv1d", lambda: gaussian_blur(maps))
    assert len(seen) == 2 and not any(cudnn for cudnn, _ in seen)  # both passes of the separable blur
    assert after == (allowed, allowed)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_on_a_gpu_tf32_changes_neither_the_search_nor_the_blur():
    """Where the flags act: the same bits with TF32 allowed as without."""
    g = torch.Generator().manual_seed(0)
    centre = torch.full((1, 256), 1.25)  # |x|² ~ 400 at squared distances ~1, as PatchCore's features
    bank = MemoryBank((centre + 0.05 * torch.randn(2000, 256, generator=g)).cuda(), knn_backend="torch")
    queries = (centre + 0.05 * torch.randn(300, 256, generator=g)).cuda()
    maps = torch.rand(4, 96, 96, generator=g).cuda()
    results = {}
    for allowed in (False, True):
        before = _flags()
        torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = allowed
        try:
            results[allowed] = bank.search(queries, 3), gaussian_blur(maps)
        finally:
            torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = before
    assert all(torch.equal(a, b) for a, b in zip(results[False], results[True]))
