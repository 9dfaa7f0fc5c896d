"""The samplers against a plain transcription of the original's loops, plus their contracts."""

from __future__ import annotations

import math

import pytest
import torch

from patchcore_lightning import coreset
from patchcore_lightning.coreset import (
    SAMPLERS,
    approx_greedy_coreset,
    greedy_coreset,
    identity,
    random,
    subsample,
)

# ----------------------------------------------------------------- the oracle: the original


def _oracle_projection(features: torch.Tensor, generator: torch.Generator, dimension: int = 128) -> torch.Tensor:
    """torch.nn.Linear(D, dimension, bias=False)'s default init is U(-1/sqrt(D), 1/sqrt(D))."""
    D = features.shape[1]
    if D == dimension:
        return features
    weight = torch.empty(dimension, D).uniform_(-1 / math.sqrt(D), 1 / math.sqrt(D), generator=generator)
    return features @ weight.T


def _oracle_differences(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """The original's _compute_batchwise_differences."""
    a_times_a = a.unsqueeze(1).bmm(a.unsqueeze(2)).reshape(-1, 1)
    b_times_b = b.unsqueeze(1).bmm(b.unsqueeze(2)).reshape(1, -1)
    return (-2 * a.mm(b.T) + a_times_a + b_times_b).clamp(0, None).sqrt()


def _oracle_approx_greedy(features, percentage, seed, dimension=128, starts=10) -> list[int]:
    generator = torch.Generator().manual_seed(seed)
    x = _oracle_projection(features, generator, dimension)
    start_points = torch.randperm(len(x), generator=generator)[: min(starts, len(x))]
    values = _oracle_differences(x, x[start_points]).mean(-1).reshape(-1, 1)
    selected = []
    for _ in range(int(len(x) * percentage)):
        i = torch.argmax(values).item()
        selected.append(i)
        values = torch.min(torch.cat([values, _oracle_differences(x, x[i : i + 1])], dim=-1), dim=1).values
        values = values.reshape(-1, 1)
    return selected


def _oracle_greedy(features, percentage, seed, dimension=128) -> list[int]:
    generator = torch.Generator().manual_seed(seed)
    x = _oracle_projection(features, generator, dimension)
    distances = _oracle_differences(x, x)  # (N, N), fine for a test
    values = torch.norm(distances, dim=1)
    selected = []
    for _ in range(int(len(x) * percentage)):
        i = torch.argmax(values).item()
        selected.append(i)
        values = torch.min(torch.stack([values, distances[:, i]], dim=1), dim=1).values
    return selected


def _coverage_radius(features: torch.Tensor, selected: torch.Tensor) -> float:
    return torch.cdist(features.double(), features[selected].double()).min(dim=1).values.max().item()


def _clustered(n_per_cluster: list[int], dim: int, seed: int) -> torch.Tensor:
    """Tight blobs of very different sizes, far apart: random sampling misses the small ones."""
    generator = torch.Generator().manual_seed(seed)
    centres = 10 * torch.randn(len(n_per_cluster), dim, generator=generator)
    return torch.cat([c + 0.1 * torch.randn(n, dim, generator=generator) for c, n in zip(centres, n_per_cluster)])


# ------------------------------------------------------------------------------ the tests


@pytest.mark.parametrize("dim", [64, 128, 300])  # 128: no projection, no random draw for it
@pytest.mark.parametrize("seed", [0, 1])
def test_approx_greedy_selects_as_the_original(dim, seed):
    features = torch.randn(500, dim, generator=torch.Generator().manual_seed(100 + seed))
    expected = _oracle_approx_greedy(features, 0.1, seed)
    got = approx_greedy_coreset(features, 0.1, torch.Generator().manual_seed(seed))
    assert got.dtype == torch.int64
    assert got.tolist() == expected


@pytest.mark.parametrize("dim", [64, 128, 300])
@pytest.mark.parametrize("seed", [0, 1])
def test_greedy_selects_as_the_original(dim, seed):
    features = torch.randn(500, dim, generator=torch.Generator().manual_seed(200 + seed))
    expected = _oracle_greedy(features, 0.1, seed)
    got = greedy_coreset(features, 0.1, torch.Generator().manual_seed(seed))
    assert got.tolist() == expected


def test_coreset_options_reach_the_selection():
    features = torch.randn(400, 96, generator=torch.Generator().manual_seed(3))
    got = approx_greedy_coreset(
        features, 0.1, torch.Generator().manual_seed(4), dimension_to_project_features_to=16, number_of_starting_points=3
    )
    assert got.tolist() == _oracle_approx_greedy(features, 0.1, 4, dimension=16, starts=3)
    got = greedy_coreset(features, 0.1, torch.Generator().manual_seed(4), dimension_to_project_features_to=16)
    assert got.tolist() == _oracle_greedy(features, 0.1, 4, dimension=16)


def test_projection_is_a_default_initialised_linear_layer():
    # The selection does not see the projection's scale, so check the map itself: the
    # original's torch.nn.Linear(D, 128, bias=False), drawn from a generator with the same seed.
    features = torch.randn(50, 300, generator=torch.Generator().manual_seed(15))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(16)
        layer = torch.nn.Linear(300, 128, bias=False)
    with torch.no_grad():
        expected = layer(features)
    assert torch.equal(coreset._project(features, 128, torch.Generator().manual_seed(16)), expected)  # the same x @ W.T


def _plain_loop(points: torch.Tensor, initial: torch.Tensor, n: int) -> list[int]:
    """Farthest-first from given initial squared values, one point at a time."""
    values, selected = initial.clone(), []
    for _ in range(n):
        i = int(values.argmax())  # first index among ties
        selected.append(i)
        values = torch.minimum(values, ((points - points[i]) ** 2).sum(dim=1))
        values[i] = -math.inf
    return selected


@pytest.mark.parametrize("candidates", [1, 3, 64])
def test_selection_loops_match_a_plain_loop_on_exact_ties(monkeypatch, candidates):
    # Small integers: every distance is exact in float32, so ties are real ties and both of our
    # loops (the CPU candidate batches and the accelerator step-by-step one) must break them
    # by the first index, including the end game where every remaining point is a duplicate.
    monkeypatch.setattr(coreset, "_CANDIDATES", candidates)
    generator = torch.Generator().manual_seed(5)
    points = torch.randint(0, 3, (90, 4), generator=generator).float()  # at most 81 distinct
    points = torch.cat([points, points[:30]])  # and certain duplicates
    squared_norms = coreset._squared_norms(points)
    augmented = coreset._augmented(points, squared_norms)
    initial = torch.randint(0, 5, (len(points),), generator=generator).float()  # ties from the start
    n = len(points) - 1
    expected = _plain_loop(points, initial, n)
    assert coreset._farthest_first_batched(augmented, initial.clone(), n).tolist() == expected
    assert coreset._farthest_first_stepwise(augmented, initial.clone(), n).tolist() == expected
    assert len(set(expected)) == n  # never a point twice


def test_batched_loop_matches_stepwise_loop_over_many_batches(monkeypatch):
    # Integer features and no projection: exact distances, so the two loops must agree exactly.
    monkeypatch.setattr(coreset, "_CANDIDATES", 8)
    features = torch.randint(0, 50, (600, 16), generator=torch.Generator().manual_seed(6)).float()
    for sampler in (approx_greedy_coreset, greedy_coreset):
        batched = sampler(features, 0.4, torch.Generator().manual_seed(0), dimension_to_project_features_to=16)
        with monkeypatch.context() as patch:
            patch.setattr(coreset, "_farthest_first_batched", coreset._farthest_first_stepwise)
            stepwise = sampler(features, 0.4, torch.Generator().manual_seed(0), dimension_to_project_features_to=16)
        assert torch.equal(batched, stepwise)


@pytest.mark.parametrize("sampler", ["approx_greedy_coreset", "greedy_coreset", "random"])
def test_count_is_int_of_n_times_percentage(sampler):
    features = torch.randn(509, 16)
    for percentage, count in [(0.1, 50), (0.5, 254), (0.0019, 0.0)]:  # 50.9 -> 50, 254.5 -> 254
        if count == 0:
            with pytest.raises(ValueError, match="selects no row"):
                subsample(features, sampler, percentage, torch.Generator().manual_seed(0))
            continue
        selected = subsample(features, sampler, percentage, torch.Generator().manual_seed(0))
        assert len(selected) == count
        assert len(set(selected.tolist())) == count
        assert 0 <= int(selected.min()) and int(selected.max()) < 509
    assert torch.equal(subsample(features, sampler, 1.0, torch.Generator().manual_seed(0)), torch.arange(509))


def test_random_is_a_uniform_draw_without_repeats_from_the_generator():
    features = torch.randn(1000, 4)
    selected = random(features, 0.3, torch.Generator().manual_seed(7))
    assert len(selected) == 300 and len(selected.unique()) == 300
    assert torch.equal(selected, torch.randperm(1000, generator=torch.Generator().manual_seed(7))[:300])
    assert not torch.equal(selected, random(features, 0.3, torch.Generator().manual_seed(8)))
    # uniform: over many draws every row is picked about 30 % of the time
    generator = torch.Generator().manual_seed(9)
    counts = torch.zeros(1000)
    for _ in range(200):
        counts[random(features, 0.3, generator)] += 1
    assert counts.min() > 30 and counts.max() < 90  # mean 60, sd 6.5


def test_identity_keeps_every_row_in_order():
    features = torch.randn(37, 5)
    assert torch.equal(identity(features), torch.arange(37))
    assert torch.equal(subsample(features, "identity", 0.1), torch.arange(37))


def test_dispatcher_runs_the_named_sampler():
    features = torch.randn(300, 40, generator=torch.Generator().manual_seed(10))
    direct = {
        "approx_greedy_coreset": approx_greedy_coreset(features, 0.1, torch.Generator().manual_seed(1)),
        "greedy_coreset": greedy_coreset(features, 0.1, torch.Generator().manual_seed(1)),
        "random": random(features, 0.1, torch.Generator().manual_seed(1)),
    }
    assert not torch.equal(direct["approx_greedy_coreset"], direct["greedy_coreset"])
    for name, expected in direct.items():
        assert torch.equal(subsample(features, name, 0.1, torch.Generator().manual_seed(1)), expected)
    assert set(SAMPLERS) == {"approx_greedy_coreset", "greedy_coreset", "random", "identity"}


def test_randomness_only_from_the_generator():
    features = torch.randn(300, 40, generator=torch.Generator().manual_seed(11))
    state = torch.get_rng_state()
    torch.manual_seed(123)
    a = approx_greedy_coreset(features, 0.1, torch.Generator().manual_seed(2))
    torch.manual_seed(456)
    b = approx_greedy_coreset(features, 0.1, torch.Generator().manual_seed(2))
    assert torch.equal(a, b)
    after = torch.get_rng_state()
    approx_greedy_coreset(features, 0.1, torch.Generator().manual_seed(2))
    greedy_coreset(features, 0.1, torch.Generator().manual_seed(2))
    random(features, 0.1, torch.Generator().manual_seed(2))
    assert torch.equal(torch.get_rng_state(), after)  # the global generator was not touched
    torch.set_rng_state(state)
    assert not torch.equal(a, approx_greedy_coreset(features, 0.1, torch.Generator().manual_seed(3)))
    # None draws from the global generator, which seed_everything seeds
    torch.manual_seed(2)
    from_global = approx_greedy_coreset(features, 0.1)
    assert torch.equal(from_global, a)
    torch.set_rng_state(state)


def test_any_float_dtype_is_computed_in_float32():
    features = torch.randn(300, 40, generator=torch.Generator().manual_seed(12))
    expected = approx_greedy_coreset(features, 0.1, torch.Generator().manual_seed(0))
    got = approx_greedy_coreset(features.double(), 0.1, torch.Generator().manual_seed(0))
    assert torch.equal(got, expected)


def test_greedy_covers_clustered_data_better_than_random():
    features = _clustered([900, 300, 60, 20, 10, 5, 5], 64, seed=13)  # 1300 rows, 7 blobs
    radius = {
        name: _coverage_radius(features, subsample(features, name, 0.02, torch.Generator().manual_seed(0)))
        for name in ("greedy_coreset", "approx_greedy_coreset", "random")
    }
    assert radius["greedy_coreset"] < 2 and radius["approx_greedy_coreset"] < 2  # every blob has a row
    assert radius["random"] > 5  # 26 random rows miss a small blob
    assert radius["greedy_coreset"] <= radius["random"] and radius["approx_greedy_coreset"] <= radius["random"]


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda x: subsample(x, "kmeans", 0.1), "'kmeans'"),
        (lambda x: subsample(x, "random", 0.0), "0.0"),
        (lambda x: subsample(x, "approx_greedy_coreset", 1.5), "1.5"),
        (lambda x: subsample(x, "greedy_coreset", -0.1), "-0.1"),
        (lambda x: subsample(x, "identity", 2), "got 2"),
        (lambda x: subsample(x, "random", float("nan")), "nan"),
        (lambda x: subsample(x, "random", "0.1"), "'0.1'"),
        (lambda x: approx_greedy_coreset(x, 0.1, number_of_starting_points=0), "number_of_starting_points.*0"),
        (lambda x: greedy_coreset(x, 0.1, dimension_to_project_features_to=0), "dimension_to_project_features_to.*0"),
        (lambda x: random(x[0], 0.1), r"\(8,\)"),
        (lambda x: identity(x.long()), "torch.int64"),
        (lambda x: approx_greedy_coreset(x.index_fill(0, torch.tensor([3]), float("nan")), 0.5), "NaN"),
    ],
)
def test_invalid_arguments_raise_naming_the_value(call, message):
    features = torch.randn(20, 8)
    with pytest.raises(ValueError, match=message):
        call(features)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_features_select_as_cpu_features():
    features = torch.randn(2000, 256, generator=torch.Generator().manual_seed(14))
    for sampler in ("approx_greedy_coreset", "greedy_coreset", "random"):
        cpu = subsample(features, sampler, 0.05, torch.Generator().manual_seed(0))
        cuda = subsample(features.cuda(), sampler, 0.05, torch.Generator().manual_seed(0))
        assert cuda.device.type == "cuda"
        assert cuda.cpu().tolist() == cpu.tolist()
