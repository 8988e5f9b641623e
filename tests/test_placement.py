"""Shards placed so that the fullest rank holds the least (placement.py), alone and as the
partitioner of TorchRec's planner on the Kaggle model's tables."""

import itertools
import random
from types import SimpleNamespace

import pytest
import torch

from dlrm_sparsity.criteo.synthetic import KAGGLE_CARDINALITIES
from dlrm_sparsity.model import DLRMConfig, DLRMNet

pytest.importorskip("torchrec")

from dlrm_sparsity import placement  # noqa: E402 (needs TorchRec)
from dlrm_sparsity.placement import least_largest  # noqa: E402
from dlrm_sparsity.sharded import Sharding, TablesAround, rank_bytes  # noqa: E402

KAGGLE_BYTES = [n * 16 * 4 for n in KAGGLE_CARDINALITIES]
# the best split of those tables over two ranks (found by meet-in-the-middle over all 2^26
# subsets): the two largest but one, 10.1 M and 7.0 M rows, on one rank
BEST_OF_TWO = 64 * (10131227 + 7046547)


def largest_load(sizes, ranks, count) -> int:
    return max(sum(s for s, r in zip(sizes, ranks, strict=True) if r == q) for q in range(count))


def test_the_placement_is_the_best_on_small_sets():
    rng = random.Random(0)
    for _ in range(60):
        count, n = rng.randint(2, 3), rng.randint(1, 8)
        sizes = [rng.randint(1, 100) for _ in range(n)]
        best = min(largest_load(sizes, ranks, count)
                   for ranks in itertools.product(range(count), repeat=n))
        got = least_largest(sizes, [10**6] * count)
        assert len(got) == n and largest_load(sizes, got, count) == best, sizes


def test_capacities_are_kept_and_sets_that_cannot_fit_are_none():
    got = least_largest([6, 5, 4], [6, 9])  # best unbounded: {6}, {5, 4}; 6 must go first
    assert got == [0, 1, 1]
    got = least_largest([5, 5, 2], [12, 2])  # the small rank takes only the 2
    assert got == [0, 0, 1]
    assert least_largest([5, 5], [12, 4]) == [0, 0]
    assert least_largest([5, 5, 5], [9, 9]) is None  # two fives share no rank
    assert least_largest([3, 3, 3], [4, 4, 2]) is None
    assert least_largest([1] * 10, [4, 4]) is None  # more than the ranks hold together


def test_more_shards_than_the_search_goes_deep_are_placed_greedily():
    rng = random.Random(1)
    sizes = [rng.randint(1, 1000) for _ in range(placement.SEARCH_DEPTH + 1100)]
    got = least_largest(sizes, [10**9] * 8)  # no RecursionError
    assert got == placement.greedy(sizes, [10**9] * 8)
    assert largest_load(sizes, got, 8) <= sum(sizes) / 8 + 1000  # within one item of even
    assert placement.greedy([5, 5, 5], [9, 9]) is None


def test_the_kaggle_tables_split_by_bytes_not_lookups_on_two_ranks():
    assert largest_load(KAGGLE_BYTES, least_largest(KAGGLE_BYTES, [10**12] * 2), 2) \
        == BEST_OF_TWO


def planned_bytes(monkeypatch, partitioner=None) -> list[int]:
    """Bytes of tables per rank in the plan of TorchRec's planner, as Sharding makes it, for
    the Kaggle model's tables on two CPU ranks (built on the meta device: nothing allocated)."""
    if partitioner is not None:
        monkeypatch.setattr(placement, "LeastLargestPartitioner", partitioner)
    with torch.device("meta"):
        net = DLRMNet(DLRMConfig(KAGGLE_CARDINALITIES, 16, (13, 512, 256, 64, 16),
                                 (367, 512, 256, 1)))
    model = TablesAround(net)
    sharding = Sharding(SimpleNamespace(world_size=2), torch.device("cpu"), 4 * 10**9, 2048)
    held = rank_bytes(sharding._plan(model), net.config)
    return [held.get(rank, 0) for rank in range(2)]


def test_the_planner_places_the_kaggle_tables_with_the_least_on_the_fullest_rank(monkeypatch):
    ours = planned_bytes(monkeypatch)
    assert sum(ours) == sum(KAGGLE_BYTES) and max(ours) == BEST_OF_TWO
    from torchrec.distributed.planner.partitioners import GreedyPerfPartitioner

    theirs = planned_bytes(monkeypatch, lambda memory: GreedyPerfPartitioner())
    assert sum(theirs) == sum(KAGGLE_BYTES) and max(theirs) > 1.1 * BEST_OF_TWO
