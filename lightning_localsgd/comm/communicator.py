"""The one door through which algorithms talk to other ranks.

Algorithms never import ``torch.distributed``: they call a :class:`Communicator`. The real one wraps a
process group; :class:`~lightning_localsgd.comm.simulated.SimulatedCommunicator` runs N workers as
threads of one process, which is how the update rules are tested exactly.
"""

from __future__ import annotations

import time
from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import Any, Optional

import torch
import torch.distributed as dist
from torch import Tensor

from lightning_localsgd.comm.stats import CommStats


def ring_all_reduce_bytes(payload_bytes: int, world_size: int) -> int:
    """Bytes one rank sends in a ring all-reduce of ``payload_bytes``: reduce-scatter then all-gather."""
    return 2 * (world_size - 1) * payload_bytes // world_size


class Communicator(ABC):
    """Collectives over a fixed set of ranks, with counters.

    Every method is a collective: all ranks must call it, in the same order, with tensors of the same
    shapes. Each tensor passed is one collective (callers pass a few flat buckets, not many small tensors).
    """

    def __init__(self, rank: int, world_size: int) -> None:
        self.rank = rank
        self.world_size = world_size
        self.stats = CommStats()

    def all_reduce_mean_(self, tensors: Sequence[Tensor]) -> None:
        """Replace each tensor, in place, by its mean over the ranks."""
        if self.world_size == 1:
            return
        start = time.perf_counter()
        for tensor in tensors:
            self._all_reduce_sum_(tensor)
            tensor.div_(self.world_size)
            self.stats.collectives += 1
            self.stats.bytes_sent += ring_all_reduce_bytes(tensor.numel() * tensor.element_size(), self.world_size)
        self._wait_for_device(tensors)
        self.stats.seconds += time.perf_counter() - start

    def broadcast_(self, tensors: Sequence[Tensor], src: int = 0) -> None:
        """Overwrite each tensor, in place, with rank ``src``'s copy."""
        if self.world_size == 1:
            return
        start = time.perf_counter()
        for tensor in tensors:
            self._broadcast_(tensor, src)
            self.stats.collectives += 1
            if self.rank == src:
                self.stats.bytes_sent += tensor.numel() * tensor.element_size()
        self._wait_for_device(tensors)
        self.stats.seconds += time.perf_counter() - start

    @abstractmethod
    def _all_reduce_sum_(self, tensor: Tensor) -> None: ...

    @abstractmethod
    def _broadcast_(self, tensor: Tensor, src: int) -> None: ...

    @abstractmethod
    def all_gather_object(self, obj: Any) -> list[Any]:
        """Every rank's ``obj``, in rank order, on every rank (for small metadata)."""

    @abstractmethod
    def gather_object(self, obj: Any, dst: int = 0) -> Optional[list[Any]]:
        """Every rank's ``obj`` in rank order on rank ``dst``; ``None`` elsewhere."""

    @staticmethod
    def _wait_for_device(tensors: Sequence[Tensor]) -> None:
        # CUDA collectives return once enqueued; wait so that `seconds` measures the transfer.
        if tensors and tensors[0].is_cuda:
            torch.cuda.current_stream(tensors[0].device).synchronize()


class ProcessGroupCommunicator(Communicator):
    """A :class:`Communicator` over a ``torch.distributed`` process group (gloo, NCCL, ...)."""

    def __init__(self, group: Optional[dist.ProcessGroup] = None) -> None:
        if not dist.is_available() or not dist.is_initialized():
            raise RuntimeError("ProcessGroupCommunicator needs an initialised torch.distributed process group.")
        self.group = group
        super().__init__(dist.get_rank(group), dist.get_world_size(group))

    def _all_reduce_sum_(self, tensor: Tensor) -> None:
        # SUM then divide: gloo has no AVG reduction.
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM, group=self.group)

    def _broadcast_(self, tensor: Tensor, src: int) -> None:
        dist.broadcast(tensor, src=dist.get_global_rank(self.group, src) if self.group else src, group=self.group)

    def all_gather_object(self, obj: Any) -> list[Any]:
        out: list[Any] = [None] * self.world_size
        dist.all_gather_object(out, obj, group=self.group)
        return out

    def gather_object(self, obj: Any, dst: int = 0) -> Optional[list[Any]]:
        out: Optional[list[Any]] = [None] * self.world_size if self.rank == dst else None
        dist.gather_object(obj, out, dst=dst, group=self.group)
        return out
