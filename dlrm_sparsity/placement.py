"""Where TorchRec's planner puts each shard: on the ranks so that the fullest holds the least.

TorchRec's planner enumerates the ways to shard each table, estimates their storage and lookup
cost, and hands each proposal to a partitioner, which gives every shard a rank. Its
partitioners balance lookup cost (GreedyPerfPartitioner) or GPU memory within a cost tolerance
(MemoryBalancedPartitioner, which reads only HBM, so on CPUs does nothing). Scoring a pruned
model is a batch job bound by memory, not by lookups: the rank that holds the most bytes of
tables decides whether the model fits, and sets the job's peak. On the Kaggle-size model's 26
tables, balancing lookups leaves 1.25 GB on one of two ranks and 0.91 GB on the other; the
best split holds 1.10 GB at most. No partitioner in TorchRec minimises the largest rank's
bytes, so LeastLargestPartitioner does, and the planner's other parts (its enumerator,
storage estimates, reservation and choice among proposals) stay TorchRec's own.

Only imported with TorchRec (sharded._torchrec).
"""

from __future__ import annotations

import math
from typing import Sequence

from torchrec.distributed.planner.types import (
    PartitionByType,
    Partitioner,
    PlannerError,
    PlannerErrorType,
    ShardingOption,
    Topology,
)

SEARCH_STEPS = 20_000  # placements tried per proposal, beyond the first (greedy) one
SEARCH_DEPTH = 400  # shards the search places one per call level; more: the greedy placement


def greedy(sizes: Sequence[int], capacities: Sequence[int]) -> list[int] | None:
    """Each item, largest first, on the least loaded rank it fits; None where one fits none."""
    load = [0] * len(capacities)
    where = [0] * len(sizes)
    for item in sorted(range(len(sizes)), key=lambda i: -sizes[i]):
        fits = [r for r in range(len(load)) if load[r] + sizes[item] <= capacities[r]]
        if not fits:
            return None
        r = min(fits, key=lambda r: (load[r], r))
        load[r] += sizes[item]
        where[item] = r
    return where


def least_largest(sizes: Sequence[int], capacities: Sequence[int],
                  steps: int = SEARCH_STEPS) -> list[int] | None:
    """A rank for each item such that no rank holds more than its capacity and the largest
    load is as small as a depth-first search of `steps` placements finds; None where nothing
    fits. The items go largest first, each to the ranks in order of their load, so the
    search's first placement is the greedy one (largest item on the least loaded rank), and
    it only gets better; branches that cannot beat the best so far are cut, and the search
    stops at a placement that meets the lower bound (the mean load, or the largest item).
    Where no placement is found in twice `steps` beyond the first descent, nothing fits as
    far as it knows. More than SEARCH_DEPTH items are placed greedily (greedy), the search
    going one call deeper per item."""
    if sum(sizes) > sum(capacities) or max(sizes, default=0) > max(capacities, default=0):
        return None
    if len(sizes) > SEARCH_DEPTH:  # a search this deep would pass Python's recursion limit
        return greedy(sizes, capacities)
    order = sorted(range(len(sizes)), key=lambda i: -sizes[i])
    ranks = len(capacities)
    floor = max(math.ceil(sum(sizes) / max(ranks, 1)), max(sizes, default=0))
    load = [0] * ranks
    where = [0] * len(sizes)
    best: list = [math.inf, None]
    tries = [0]  # placements made; the first descent makes len(sizes)

    def place(j: int) -> bool:  # True: stop searching
        if j == len(order):
            if max(load) < best[0]:
                best[0], best[1] = max(load), list(where)
            return best[0] <= floor
        tries[0] += 1
        beyond_first = tries[0] - len(order)
        if beyond_first > (steps if best[1] is not None else 2 * steps):
            return True
        item = order[j]
        tried = set()  # ranks with equal load and capacity lead to the same placements
        for r in sorted(range(ranks), key=lambda r: (load[r], r)):
            after = load[r] + sizes[item]
            if (after > capacities[r] or after >= best[0]
                    or (load[r], capacities[r]) in tried):
                continue
            tried.add((load[r], capacities[r]))
            load[r], where[item] = after, r
            stop = place(j + 1)
            load[r] -= sizes[item]
            if stop:
                return True
        return False

    place(0)
    return best[1]


class LeastLargestPartitioner(Partitioner):
    """A TorchRec partitioner that places every shard so that the rank holding the most bytes
    (in `memory`: "ddr" for CPU ranks, "hbm" for GPU ones) holds as few as it can
    (least_largest). A proposal whose shards do not fit is a PlannerError, as TorchRec's
    own partitioners raise, for the planner to try its next proposal."""

    def __init__(self, memory: str):
        self.memory = memory
        self._placed: dict[tuple, list[int] | None] = {}  # proposals repeat their sizes

    def partition(self, proposal: list[ShardingOption], storage_constraint: Topology
                  ) -> list[ShardingOption]:
        capacities = [getattr(d.storage, self.memory) for d in storage_constraint.devices]
        shards = []
        for option in proposal:
            if option.partition_by != PartitionByType.DEVICE.value:
                raise PlannerError(f"{option.name}: only shards placed on one device each "
                                   f"(table-wise, column-wise) are placed here",
                                   PlannerErrorType.PARTITION)
            shards.extend(option.shards)
        sizes = [getattr(s.storage, self.memory) for s in shards]
        key = (tuple(sizes), tuple(capacities))
        if key not in self._placed:
            self._placed[key] = least_largest(sizes, capacities)
        ranks = self._placed[key]
        if ranks is None:
            raise PlannerError(f"the shards ({sum(sizes)} bytes) do not fit the ranks' "
                               f"{self.memory} ({capacities} bytes)",
                               PlannerErrorType.PARTITION)
        for shard, rank in zip(shards, ranks, strict=True):
            shard.rank = rank
        return proposal
