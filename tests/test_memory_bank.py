"""The bank's two exact searches (faiss, chunked torch) against brute-force distances, which runs where, file round trip."""

from __future__ import annotations

import faiss
import pytest
import torch

from patchcore_lightning import memory_bank
from patchcore_lightning.memory_bank import MemoryBank, exact_distances, torch_knn

pytestmark = pytest.mark.kernels  # repeated by .ci/run under other CPU kernels


# The bank's distances are rounded once from float64 sums (memory_bank.exact_distances), so each is
# within half a float32 ulp of the exact value: |d - exact| <= 2^-24 |exact| (the float64 sum's own
# error, ~D * 2^-53 relative, is far below that). A mean of k such values adds k roundings of float32
# additions: (k + 1) * 2^-24 relative. These bounds hold whatever kernel or device computes them.
ROUNDING = 2.0**-24


def _brute_force(queries: torch.Tensor, bank: torch.Tensor, k: int) -> torch.Tensor:
    """The k smallest squared distances, (x - y)² summed in float64: exact to ~D * 2^-53. (N, k)"""
    d2 = ((queries.double()[:, None, :] - bank.double()[None, :, :]) ** 2).sum(-1)  # (N, M)
    return d2.topk(k, largest=False).values  # (N, k) ascending


def _assert_within(found: torch.Tensor, exact: torch.Tensor, rel: float) -> None:
    error = (found.double() - exact).abs()
    assert bool((error <= rel * exact.abs()).all()), f"max relative error {(error / exact.abs().clamp_min(1e-300)).max():.3g} > {rel:.3g}"


def test_patch_scores_are_mean_squared_distances_to_k_nearest(tmp_path):
    g = torch.Generator().manual_seed(0)
    bank_vectors = torch.randn(200, 32, generator=g)
    queries = torch.randn(50, 32, generator=g) * 3
    bank = MemoryBank(bank_vectors)
    assert bank.kind == "faiss"  # the CPU default
    for k in (1, 3):
        _assert_within(bank.patch_scores(queries, k), _brute_force(queries, bank_vectors, k).mean(dim=1), (k + 1) * ROUNDING)
    bank.save(tmp_path / "bank.faiss")
    again = MemoryBank.load(tmp_path / "bank.faiss")
    assert torch.equal(again.vectors, bank_vectors)
    assert torch.equal(again.patch_scores(queries, 3), bank.patch_scores(queries, 3))


@pytest.mark.parametrize("k", [1, 2, 5])
@pytest.mark.parametrize("block_bytes", [1 << 28, 4 * 7 * 13, 4 * 5])
def test_torch_search_is_exact_with_any_chunking(k, block_bytes):
    # 4*7*13 bytes: blocks of 7 queries x 13 bank rows (neither divides 45 or 101); 4*5: k rows at least.
    g = torch.Generator().manual_seed(k)
    bank_vectors = torch.randn(101, 24, generator=g)
    queries = torch.cat([torch.randn(44, 24, generator=g) * 2, bank_vectors[:1]])  # one query in the bank: 0
    bank = MemoryBank(bank_vectors, knn_backend="torch")
    bank.block_bytes = block_bytes
    found = bank.search(queries, k)  # (45, k)
    _assert_within(found, _brute_force(queries, bank_vectors, k), ROUNDING)
    assert found[-1, 0] == 0 and bool((found.diff(dim=1) >= 0).all())  # its own row: exactly 0
    # faiss finds the same candidates, and their distances are computed the same way: the same bits
    assert torch.equal(found, MemoryBank(bank_vectors).search(queries, k))


@pytest.mark.parametrize("backend", ["faiss", "torch"])
def test_distances_do_not_cancel_when_the_norms_dwarf_them(backend):
    """Vectors of squared norm ~1e4 at squared distances ~1 (PatchCore's features: ~400 and ~12). The
    formula |x|² + |y|² - 2 x·y loses ~1e4 x 2^-24 ~ 6e-4 absolute to rounding, whose last bits depend
    on the BLAS kernel; the bank's distances are still exactly rounded."""
    g = torch.Generator().manual_seed(5)
    centre = torch.full((1, 64), 12.5)  # |centre|² = 1e4
    bank_vectors = centre + 0.1 * torch.randn(300, 64, generator=g)
    queries = centre + 0.1 * torch.randn(40, 64, generator=g)
    found = MemoryBank(bank_vectors, knn_backend=backend).search(queries, 3)
    exact = _brute_force(queries, bank_vectors, 3)
    formula = torch_knn(queries, bank_vectors, 3)[0]  # the candidates' formula alone
    assert (formula.double() - exact).abs().max() > 100 * ROUNDING * exact.abs().max()  # it does cancel here
    _assert_within(found, exact, ROUNDING)


def test_torch_search_never_builds_a_block_over_the_limit(monkeypatch):
    sizes = []
    addmm_ = torch.Tensor.addmm_

    def recording_addmm_(self, *args, **kwargs):
        sizes.append(self.numel() * self.element_size())
        return addmm_(self, *args, **kwargs)

    monkeypatch.setattr(torch.Tensor, "addmm_", recording_addmm_)
    g = torch.Generator().manual_seed(1)
    bank, queries = torch.randn(20000, 16, generator=g), torch.randn(50, 16, generator=g)
    found, rows = torch_knn(queries, bank, 3, block_bytes=64 * 1024)  # 16,384 distances: the bank in 2 chunks
    assert max(sizes) <= 64 * 1024 and sum(sizes) == 50 * 20000 * 4  # every distance once, in blocks
    exact = _brute_force(queries, bank, 3)
    # the formula's own rounding: |x|², |y|² and x·y are float32 sums of 16 products, each off by at most
    # 16 * 2^-24 of the sum of the magnitudes (any order), so the distance by 16 * 2^-24 (|x| + |y|)²
    # (Higham, Accuracy and Stability of Numerical Algorithms, (3.5)) plus 3 roundings of the additions
    # (checked here with |y| <= the bank's largest norm)
    bound = (16 + 3) * ROUNDING * (queries.norm(dim=1, keepdim=True) + bank.norm(dim=1).max()) ** 2  # (N, 1)
    assert bool(((found.double() - exact).abs() <= bound.double()).all())
    _assert_within(exact_distances(queries, bank, rows), exact, ROUNDING)  # the rows are the 3 nearest


def test_backend_choice_follows_the_banks_device(monkeypatch):
    vectors = torch.randn(10, 8)
    assert MemoryBank(vectors).kind == "faiss"
    assert MemoryBank(vectors, "torch").kind == "torch"
    with pytest.raises(ValueError, match="knn_backend must be auto, faiss or torch, got 'annoy'"):
        MemoryBank(vectors, "annoy")
    cpu, cuda = torch.device("cpu"), torch.device("cuda", 1)
    assert [memory_bank.search_kind(b, cpu) for b in ("auto", "faiss", "torch")] == ["faiss", "faiss", "torch"]
    monkeypatch.setattr(memory_bank, "gpu_faiss_available", lambda: False)  # the faiss-cpu wheel
    assert [memory_bank.search_kind(b, cuda) for b in ("auto", "faiss", "torch")] == ["torch", "faiss", "torch"]
    monkeypatch.setattr(memory_bank, "gpu_faiss_available", lambda: True)  # a faiss GPU build
    assert [memory_bank.search_kind(b, cuda) for b in ("auto", "faiss", "torch")] == ["faiss-gpu", "faiss-gpu", "torch"]
    assert memory_bank.search_kind("auto", torch.device("mps")) == "torch"


def test_the_bank_is_a_buffer_that_moves_with_its_module_and_is_not_saved():
    bank = MemoryBank(torch.randn(10, 8))
    model = torch.nn.ModuleList([bank]).to(torch.float64)  # float64: a move other than a device change
    assert dict(model.named_buffers())["0.vectors"] is bank.vectors and bank.vectors.dtype == torch.float64
    assert "0.vectors" not in model.state_dict()  # the original's .faiss files hold the banks


def test_search_caches_follow_the_vectors():
    g = torch.Generator().manual_seed(3)
    bank = MemoryBank(torch.randn(30, 4, generator=g))
    queries = torch.randn(5, 4, generator=g)
    first = bank.search(queries, 2)
    bank.vectors = bank.vectors * 2  # new vectors (as after a move): the index is made again
    assert torch.equal(bank.search(queries * 2, 2), first * 4)  # scaling by 2 is exact, and so are the distances


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_gpu_torch_search_matches_cpu_faiss():
    g = torch.Generator().manual_seed(2)
    bank_vectors, queries = torch.randn(4000, 64, generator=g), torch.randn(700, 64, generator=g)
    gpu = MemoryBank(bank_vectors.cuda(), knn_backend="torch")
    found = gpu.search(queries.cuda(), 3)
    assert found.is_cuda
    expected = MemoryBank(bank_vectors).search(queries, 3)  # faiss on the CPU
    # both exactly rounded from float64 sums taken in other orders (~1e-16 apart): at most one rounding apart
    _assert_within(found.cpu(), expected.double(), 2 * ROUNDING)


def test_rejects_wrong_index_and_bad_queries(tmp_path):
    faiss.write_index(faiss.IndexFlatIP(8), str(tmp_path / "ip.faiss"))
    with pytest.raises(ValueError, match="IndexFlatL2"):
        MemoryBank.load(tmp_path / "ip.faiss")
    (tmp_path / "junk.faiss").write_bytes(b"not an index")
    with pytest.raises(ValueError, match="cannot read faiss index"):
        MemoryBank.load(tmp_path / "junk.faiss")
    for backend in ("faiss", "torch"):
        bank = MemoryBank(torch.randn(5, 8), knn_backend=backend)
        with pytest.raises(ValueError, match="dimension 7"):
            bank.search(torch.randn(2, 7), 1)
        with pytest.raises(ValueError, match="anomaly_scorer_num_nn=6"):
            bank.search(torch.randn(2, 8), 6)
