"""The faiss bank against brute-force distances; file round trip."""

from __future__ import annotations

import faiss
import pytest
import torch

from patchcore_lightning.memory_bank import MemoryBank


def test_patch_scores_are_mean_squared_distances_to_k_nearest(tmp_path):
    g = torch.Generator().manual_seed(0)
    bank_vectors = torch.randn(200, 32, generator=g)
    queries = torch.randn(50, 32, generator=g) * 3
    bank = MemoryBank.from_features(bank_vectors)
    d2 = torch.cdist(queries.double(), bank_vectors.double()) ** 2  # (50, 200)
    for k in (1, 3):
        expected = d2.topk(k, largest=False).values.mean(dim=1)
        torch.testing.assert_close(bank.patch_scores(queries, k).double(), expected, rtol=1e-4, atol=1e-4)
    bank.save(tmp_path / "bank.faiss")
    again = MemoryBank.load(tmp_path / "bank.faiss")
    assert torch.equal(again.vectors(), bank_vectors)
    assert torch.equal(again.patch_scores(queries, 3), bank.patch_scores(queries, 3))


def test_rejects_wrong_index_and_bad_queries(tmp_path):
    faiss.write_index(faiss.IndexFlatIP(8), str(tmp_path / "ip.faiss"))
    with pytest.raises(ValueError, match="IndexFlatL2"):
        MemoryBank.load(tmp_path / "ip.faiss")
    (tmp_path / "junk.faiss").write_bytes(b"not an index")
    with pytest.raises(ValueError, match="cannot read faiss index"):
        MemoryBank.load(tmp_path / "junk.faiss")
    bank = MemoryBank.from_features(torch.randn(5, 8))
    with pytest.raises(ValueError, match="dimension 7"):
        bank.search(torch.randn(2, 7), 1)
    with pytest.raises(ValueError, match="anomaly_scorer_num_nn=6"):
        bank.search(torch.randn(2, 8), 6)
