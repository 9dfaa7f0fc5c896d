"""Freed heap memory handed back to the operating system, and where the module does it."""

from __future__ import annotations

import sys

import pytest

from patchcore_lightning import heap


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096


@pytest.mark.skipif(not sys.platform.startswith("linux") or heap._malloc_trim() is None, reason="glibc only")
def test_release_free_heap_returns_freed_pages():
    # 200 MB in 64 KiB blocks (below glibc's mmap threshold: they live in the heap), every 50th
    # kept so that the heap cannot simply shrink from its top; the rest freed
    blocks = [bytearray(b"x" * (64 << 10)) for _ in range(3200)]
    kept = blocks[::50]
    del blocks
    before = _rss_bytes()
    assert heap.release_free_heap() is True
    after = _rss_bytes()
    assert before - after > 100 << 20, (before, after)  # most of the freed 196 MB left the process
    assert all(block[:1] == b"x" for block in kept)  # nothing in use was touched


def test_release_free_heap_is_a_no_op_without_malloc_trim(monkeypatch):
    monkeypatch.setattr(heap, "_malloc_trim", lambda: None)
    assert heap.release_free_heap() is False


def test_the_module_releases_the_batches_memory_before_the_category_metrics(monkeypatch):
    from types import SimpleNamespace

    import torch

    from patchcore_lightning import module as module_lib

    calls = []
    monkeypatch.setattr(module_lib, "release_free_heap", lambda: calls.append("release") or True)
    model = module_lib.PatchCoreModule(model_paths=["unused"])
    model._trainer = SimpleNamespace(strategy=SimpleNamespace(root_device=torch.device("cpu")))
    g = torch.Generator().manual_seed(0)
    masks = torch.zeros(4, 8, 8, dtype=torch.uint8)
    masks[2:, 2:5, 2:5] = 255
    model.evaluation.update(torch.rand(4, 1, generator=g), torch.rand(4, 1, 8, 8, generator=g), masks,
                            torch.tensor([0, 0, 1, 1]), torch.arange(4))
    compute = model.evaluation.compute_uncached
    monkeypatch.setattr(model.evaluation, "compute_uncached", lambda: calls.append("compute") or compute())
    result = model.finish_category()
    assert calls == ["release", "compute"] and result["maps"].shape == (4, 8, 8)
