"""N virtual workers in one process, one thread each, sharing an in-memory "network".

The same algorithm code that runs over ``torch.distributed`` runs here unchanged, so update rules can be
checked exactly and fast. Reductions add contributions in rank order, so every worker receives the
bitwise-identical result, as a real all-reduce delivers.
"""

from __future__ import annotations

import threading
from typing import Any, Callable, Optional, TypeVar

from torch import Tensor

from lightning_localsgd.comm.communicator import Communicator

T = TypeVar("T")


class SimulatedGroup:
    """The shared meeting point of ``world_size`` simulated workers."""

    def __init__(self, world_size: int, timeout: float = 60.0) -> None:
        if world_size < 1:
            raise ValueError(f"`world_size` must be at least 1, got {world_size}.")
        self.world_size = world_size
        self._slots: list[Any] = [None] * world_size
        self._barrier = threading.Barrier(world_size, timeout=timeout)

    def exchange(self, rank: int, value: Any) -> list[Any]:
        """Deposit ``value``; return every worker's value in rank order once all have arrived."""
        self._slots[rank] = value
        self._barrier.wait()
        values = list(self._slots)
        self._barrier.wait()  # nobody overwrites a slot before everyone has read it
        return values

    def abort(self) -> None:
        """Release every worker waiting here (with ``BrokenBarrierError``): one of them failed."""
        self._barrier.abort()

    def communicator(self, rank: int, async_group: Optional[SimulatedGroup] = None) -> SimulatedCommunicator:
        return SimulatedCommunicator(self, rank, async_group)


class SimulatedCommunicator(Communicator):
    """A :class:`Communicator` for one simulated worker of a :class:`SimulatedGroup`."""

    def __init__(self, group: SimulatedGroup, rank: int, async_group: Optional[SimulatedGroup] = None) -> None:
        super().__init__(rank, group.world_size)
        self.group = group
        self.async_group = async_group

    def _all_reduce_sum_(self, tensor: Tensor) -> None:
        _sum_into(self.group, self.rank, tensor)

    def _start_all_reduce_sum_(self, tensor: Tensor, on_complete: Callable[[], None]) -> Callable[[], None]:
        # A thread of its own on a group of its own: the transfer really runs while the worker computes.
        if self.async_group is None:
            raise RuntimeError("This simulated worker has no group for non-blocking collectives (see run_simulated).")
        group = self.async_group
        errors: list[BaseException] = []

        def transfer() -> None:
            try:
                _sum_into(group, self.rank, tensor)
                on_complete()
            except BaseException as error:  # re-raised by join
                errors.append(error)

        thread = threading.Thread(target=transfer, daemon=True)
        thread.start()

        def join() -> None:
            thread.join()
            if errors:
                raise errors[0]

        return join

    def _broadcast_(self, tensor: Tensor, src: int) -> None:
        values = self.group.exchange(self.rank, tensor.clone())
        tensor.copy_(values[src])

    def all_gather_object(self, obj: Any) -> list[Any]:
        return self.group.exchange(self.rank, obj)

    def gather_object(self, obj: Any, dst: int = 0) -> Optional[list[Any]]:
        values = self.group.exchange(self.rank, obj)
        return values if self.rank == dst else None


def _sum_into(group: SimulatedGroup, rank: int, tensor: Tensor) -> None:
    values = group.exchange(rank, tensor.clone())
    total = values[0].clone()
    for value in values[1:]:
        total.add_(value)
    tensor.copy_(total)


def run_simulated(world_size: int, worker: Callable[[int, Communicator], T], timeout: float = 60.0) -> list[T]:
    """Run ``worker(rank, communicator)`` for every rank in its own thread; return the results in rank order.

    An exception in any worker is re-raised here (the others are released by the broken barrier).
    """
    group = SimulatedGroup(world_size, timeout=timeout)
    async_group = SimulatedGroup(world_size, timeout=timeout)
    results: list[Any] = [None] * world_size
    errors: list[BaseException] = []

    def run(rank: int) -> None:
        try:
            results[rank] = worker(rank, group.communicator(rank, async_group))
        except BaseException as error:  # re-raised in the caller's thread
            errors.append(error)
            group.abort()
            async_group.abort()

    threads = [threading.Thread(target=run, args=(rank,), daemon=True) for rank in range(world_size)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    real_errors = [e for e in errors if not isinstance(e, threading.BrokenBarrierError)]
    if real_errors or errors:
        raise (real_errors or errors)[0]
    return results
