"""Running a script under torchrun: rank discovery, sharding the rows, gathering the results.

Without torchrun (no WORLD_SIZE in the environment) everything here is a no-op: one process,
rank 0, all rows. Under torchrun the main backend is nccl on GPUs and gloo on CPUs; result rows
travel through a separate gloo group, which works with either.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta
from typing import Callable, Sequence, TypeVar

import torch
import torch.distributed as dist

from dlrm_sparsity.errors import StopRun, UserInputError

T = TypeVar("T")


@dataclass
class DistContext:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    _objects_group: object = None

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def shard(self, items: Sequence[T]) -> list[T]:
        """This rank's share: every world_size-th item, so ranks get similar mixes of levels."""
        return list(items[self.rank::self.world_size])

    def gather(self, rows: list) -> list:
        """All ranks' rows, in rank order, on every rank."""
        if not self.enabled:
            return rows
        parts: list = [None] * self.world_size
        dist.all_gather_object(parts, rows, group=self._objects_group)
        return [r for part in parts for r in part]

    def on_main(self, fn: Callable[[], T]) -> T:
        """fn() run on rank 0 alone; its value, or the user error or StopRun it raised, on
        every rank (so that all ranks go on, or stop, together). Elsewhere than rank 0 such
        an error is marked `from_main`: rank 0 says it, the others need not repeat it."""
        if not self.enabled:
            return fn()
        box: list = [None, None]
        if self.is_main:
            try:
                box[0] = fn()
            except (UserInputError, StopRun) as exc:
                box[1] = exc
        dist.broadcast_object_list(box, src=0, group=self._objects_group)
        if box[1] is not None:
            box[1].from_main = not self.is_main
            raise box[1]
        return box[0]

    def agreed(self, fn: Callable[[], T]) -> T:
        """fn() on every rank; where it raises a user error on any rank, the lowest such rank's
        error on all (marked `from_main` but on rank 0), so that no rank goes on alone into
        the next collective step."""
        try:
            value, error = fn(), None
        except UserInputError as exc:
            value, error = None, exc
        if self.enabled:
            errors: list = [None] * self.world_size
            dist.all_gather_object(errors, error, group=self._objects_group)
            error = next((e for e in errors if e is not None), None)
        if error is not None:
            error.from_main = not self.is_main
            raise error
        return value

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier(group=self._objects_group)

    def close(self) -> None:
        if self.enabled and dist.is_initialized():
            dist.destroy_process_group()


def init_distributed(device_name: str | None) -> DistContext:
    """This process's place under torchrun (a no-op without it)."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return DistContext()
    use_cuda = device_name != "cpu" and torch.cuda.is_available()
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if use_cuda:
        torch.cuda.set_device(local_rank)
    dist.init_process_group(backend="nccl" if use_cuda else "gloo", timeout=timedelta(hours=2))
    objects = dist.new_group(backend="gloo") if use_cuda else dist.group.WORLD
    return DistContext(dist.get_rank(), world_size, local_rank, objects)

