"""N virtual workers in one process, one thread each, sharing an in-memory "network".

The same algorithm code that runs over ``torch.distributed`` runs here unchanged, so update rules can be
checked exactly and fast. Reductions add contributions in rank order, so every worker receives the
bitwise-identical result, as a real all-reduce delivers.

Operations pair up as they do on a real process group: each rank's k-th operation on a group meets every
other rank's k-th operation on that group, whichever thread carries it out. A non-blocking all-reduce takes
its number when it is started (in the worker's own thread) and then runs in a background thread, so several
can be in flight at once; a rank's non-blocking all-reduces complete in the order they were started.
"""

from __future__ import annotations

import threading
import time
from typing import Any, Callable, Optional, TypeVar

import torch
from torch import Tensor

from lightning_localsgd.comm.communicator import Communicator

T = TypeVar("T")


class SimulatedCollectiveError(RuntimeError):
    """A simulated collective could not complete. A ``RuntimeError``, as gloo's and NCCL's failures are."""


class SimulatedAbortError(SimulatedCollectiveError):
    """The group was aborted (another worker failed) while this worker waited for, or started, an operation."""


class SimulatedTimeoutError(SimulatedCollectiveError):
    """Some worker did not reach an operation within the group's timeout."""


class _Meeting:
    """The k-th operation of a group: one slot per rank, filled as the ranks arrive."""

    __slots__ = ("arrived", "left", "values")

    def __init__(self, world_size: int) -> None:
        self.values: list[Any] = [None] * world_size
        self.arrived = [False] * world_size
        self.left = 0  # ranks that have read the values; the last one forgets the meeting


class SimulatedGroup:
    """The shared meeting point of ``world_size`` simulated workers.

    Args:
        world_size: number of workers.
        timeout: seconds a worker waits for the others at one operation before the group is aborted.
    """

    def __init__(self, world_size: int, timeout: float = 60.0) -> None:
        if world_size < 1:
            raise ValueError(f"`world_size` must be at least 1, got {world_size}.")
        if timeout <= 0:
            raise ValueError(f"`timeout` must be a positive number of seconds, got {timeout}.")
        self.world_size = world_size
        self.timeout = timeout
        self._cond = threading.Condition()
        self._issued = [0] * world_size  # per rank: sequence numbers handed out so far
        self._meetings: dict[int, _Meeting] = {}
        self._abort_reason: Optional[str] = None

    def reserve(self, rank: int) -> int:
        """Take ``rank``'s next sequence number: the operation it names meets the other ranks' operation of that number.

        Call it where the operation is issued (the worker's own thread), then :meth:`exchange` with it from any thread.
        """
        self._check_rank(rank)
        with self._cond:
            self._raise_if_aborted(rank, self._issued[rank])
            seq = self._issued[rank]
            self._issued[rank] += 1
            return seq

    def exchange(self, rank: int, value: Any, seq: Optional[int] = None) -> list[Any]:
        """Deposit ``value`` for operation ``seq`` (default: the next one); return every rank's value in rank order.

        Blocks until every rank has deposited its value for the same operation, the group is aborted
        (:class:`SimulatedAbortError`) or the timeout passes (:class:`SimulatedTimeoutError`, which aborts the group).
        """
        if seq is None:
            seq = self.reserve(rank)
        deadline = time.monotonic() + self.timeout
        with self._cond:
            self._raise_if_aborted(rank, seq)
            meeting = self._meetings.setdefault(seq, _Meeting(self.world_size))
            if meeting.arrived[rank]:
                raise SimulatedCollectiveError(f"Rank {rank} deposited twice for operation {seq}: a test harness bug.")
            meeting.values[rank] = value
            meeting.arrived[rank] = True
            self._cond.notify_all()
            while not all(meeting.arrived):
                self._raise_if_aborted(rank, seq)
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    missing = [r for r, here in enumerate(meeting.arrived) if not here]
                    reason = (
                        f"rank {rank} waited {self.timeout:g} s at operation {seq} for rank(s) {missing}, which never "
                        "reached it (a worker stopped early or issued fewer collectives; raise `timeout` if it is slow)"
                    )
                    self._abort_locked(reason)
                    raise SimulatedTimeoutError(f"Simulated collective timed out: {reason}.")
                self._cond.wait(remaining)
            values = list(meeting.values)
            meeting.left += 1
            if meeting.left == self.world_size:
                del self._meetings[seq]
            return values

    def abort(self, reason: str = "another worker failed") -> None:
        """Release every worker waiting here, and fail every later operation, with :class:`SimulatedAbortError`."""
        with self._cond:
            self._abort_locked(reason)

    @property
    def aborted(self) -> bool:
        return self._abort_reason is not None

    def communicator(self, rank: int, async_group: Optional[SimulatedGroup] = None) -> SimulatedCommunicator:
        return SimulatedCommunicator(self, rank, async_group)

    def _abort_locked(self, reason: str) -> None:
        if self._abort_reason is None:
            self._abort_reason = reason
        self._cond.notify_all()

    def _raise_if_aborted(self, rank: int, seq: int) -> None:
        if self._abort_reason is not None:
            raise SimulatedAbortError(
                f"Simulated collective aborted ({self._abort_reason}); rank {rank} was at operation {seq}. "
                "See the first worker's error for the cause."
            )

    def _check_rank(self, rank: int) -> None:
        if not 0 <= rank < self.world_size:
            raise ValueError(f"`rank` must be in [0, {self.world_size}), got {rank}.")


class SimulatedCommunicator(Communicator):
    """A :class:`Communicator` for one simulated worker of a :class:`SimulatedGroup`."""

    def __init__(self, group: SimulatedGroup, rank: int, async_group: Optional[SimulatedGroup] = None) -> None:
        super().__init__(rank, group.world_size)
        self.group = group
        self.async_group = async_group
        self._last_transfer: Optional[threading.Thread] = None  # the newest non-blocking transfer of this rank

    def _all_reduce_sum_(self, tensor: Tensor) -> None:
        _sum_into(self.group, self.rank, tensor, self.group.reserve(self.rank))

    def _start_all_reduce_sum_(self, tensor: Tensor, on_complete: Callable[[], None]) -> Callable[[], None]:
        return self._start_transfer(lambda group, seq: _sum_into(group, self.rank, tensor, seq), on_complete)

    def _start_transfer(
        self, run: Callable[[SimulatedGroup, int], None], on_complete: Callable[[], None]
    ) -> Callable[[], None]:
        # A thread of its own on a group of its own: the transfer really runs while the worker computes.
        if self.async_group is None:
            raise RuntimeError("This simulated worker has no group for non-blocking collectives (see run_simulated).")
        group = self.async_group
        seq = group.reserve(self.rank)  # numbered here, at issue time, whatever thread runs the transfer
        previous = self._last_transfer
        errors: list[BaseException] = []

        def transfer() -> None:
            try:
                if previous is not None:
                    previous.join()  # complete in issue order, as a real process group's queue does
                run(group, seq)
                on_complete()
            except BaseException as error:  # re-raised by join
                errors.append(error)

        thread = threading.Thread(target=transfer, name=f"sim-transfer-r{self.rank}-{seq}", daemon=True)
        thread.start()
        self._last_transfer = thread

        def join() -> None:
            thread.join()
            if errors:
                raise errors[0]

        return join

    def _start_all_gather_(self, tensor: Tensor, on_complete: Callable[[], None]) -> Callable[[], list[Tensor]]:
        gathered: list[Tensor] = []

        def gather(group: SimulatedGroup, seq: int) -> None:
            values = group.exchange(self.rank, tensor.clone(), seq)
            _check_same_layout(values, self.rank, "all-gather")
            gathered.extend(values)

        join = self._start_transfer(gather, on_complete)

        def wait() -> list[Tensor]:
            join()
            return list(gathered)

        return wait

    def _start_all_reduce_sum_in_order_(self, tensor: Tensor) -> Callable[[], None]:
        # Numbered on the blocking group now, at issue time, so that it pairs with what the other workers issue
        # there at that point; summed on a thread meanwhile.
        seq = self.group.reserve(self.rank)
        errors: list[BaseException] = []

        def run() -> None:
            try:
                _sum_into(self.group, self.rank, tensor, seq)
            except BaseException as error:  # re-raised by join
                errors.append(error)

        thread = threading.Thread(target=run, name=f"sim-flags-r{self.rank}-{seq}", daemon=True)
        thread.start()

        def join() -> None:
            thread.join()
            if errors:
                raise errors[0]

        return join

    def _broadcast_(self, tensor: Tensor, src: int) -> None:
        values = self.group.exchange(self.rank, tensor.clone())
        _check_same_layout(values, self.rank, "broadcast")
        tensor.copy_(values[src])

    def _all_gather_(self, tensor: Tensor) -> list[Tensor]:
        values = self.group.exchange(self.rank, tensor.clone())
        _check_same_layout(values, self.rank, "all-gather")
        return [value.clone() for value in values]

    def _all_to_all_(self, tensor: Tensor, splits: list[int]) -> list[Tensor]:
        values = self.group.exchange(self.rank, (tensor.clone(), tuple(splits)))
        if any(their_splits != tuple(splits) for _, their_splits in values):
            raise SimulatedCollectiveError(f"Rank {self.rank}: the ranks cut their all-to-all differently.")
        offset, mine = sum(splits[: self.rank]), splits[self.rank]
        # Views of one receive buffer, as a real all-to-all leaves them: a piece need not start on a word boundary.
        received = torch.cat([sent[offset : offset + mine] for sent, _ in values])
        return list(received.split(mine)) if mine else [received[:0] for _ in values]

    def _neighbour_exchange_(self, tensor: Tensor, phases: list[tuple[int, int]]) -> dict[int, Tensor]:
        return {source: sent.clone() for source, sent in self._neighbours_sent(tensor, phases).items()}

    def _neighbour_exchange_into_(self, tensor: Tensor, phases: list[tuple[int, int]], out: dict[int, Tensor]) -> None:
        for source, sent in self._neighbours_sent(tensor, phases).items():
            out[source].copy_(sent)

    def _neighbours_sent(self, tensor: Tensor, phases: list[tuple[int, int]]) -> dict[int, Tensor]:
        # Every simulated worker deposits at one meeting (they gossip in lockstep) and reads its senders' only,
        # after checking that each sends to it in the same phase, as the real schedule needs. What is returned is
        # the senders' deposited copies: read them, never write them.
        values = self.group.exchange(self.rank, (tensor.clone(), tuple(phases)))
        received = {}
        for index, (_, source) in enumerate(phases):
            sent, their_phases = values[source]
            if index >= len(their_phases) or their_phases[index][0] != self.rank:
                raise SimulatedCollectiveError(
                    f"Rank {self.rank} expects rank {source} to send to it in gossip phase {index}, and it does not: "
                    "the topology's phases do not pair up or the ranks disagree on the topology."
                )
            _check_same_layout([tensor, sent], self.rank, "neighbour exchange")
            received[source] = sent
        return received

    def all_gather_object(self, obj: Any) -> list[Any]:
        return self.group.exchange(self.rank, obj)

    def gather_object(self, obj: Any, dst: int = 0) -> Optional[list[Any]]:
        values = self.group.exchange(self.rank, obj)
        return values if self.rank == dst else None


def _check_same_layout(values: list[Any], rank: int, what: str) -> None:
    # A real backend would hang or fail obscurely; say that the ranks' collectives did not pair up.
    layouts = [(tuple(v.shape), v.dtype) if isinstance(v, Tensor) else type(v).__name__ for v in values]
    if any(layout != layouts[0] for layout in layouts):
        raise SimulatedCollectiveError(
            f"Simulated {what} on rank {rank} met tensors of different shapes/dtypes on the ranks ({layouts}): the "
            "ranks issued their collectives in different orders or with different tensors."
        )


def _sum_into(group: SimulatedGroup, rank: int, tensor: Tensor, seq: int) -> None:
    values = group.exchange(rank, tensor.clone(), seq)
    _check_same_layout(values, rank, "all-reduce")
    total = values[0].clone()
    for value in values[1:]:  # rank order: every rank computes the bitwise-identical sum
        total.add_(value)
    tensor.copy_(total)


def _caused_by_abort(error: BaseException) -> bool:
    seen: set[int] = set()
    current: Optional[BaseException] = error
    while current is not None and id(current) not in seen:
        if isinstance(current, SimulatedAbortError):
            return True
        seen.add(id(current))
        current = current.__cause__ or current.__context__
    return False


def run_simulated(world_size: int, worker: Callable[[int, Communicator], T], timeout: float = 60.0) -> list[T]:
    """Run ``worker(rank, communicator)`` for every rank in its own thread; return the results in rank order.

    An exception in any worker aborts the groups, which releases the others, and is re-raised here (an error
    that only reports the abort is re-raised only if there is no other). ``timeout`` bounds each operation's wait.
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
            reason = f"rank {rank} failed with {type(error).__name__}"
            group.abort(reason)
            async_group.abort(reason)

    threads = [
        threading.Thread(target=run, args=(rank,), name=f"sim-rank-{rank}", daemon=True) for rank in range(world_size)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if errors:
        primary = [e for e in errors if not _caused_by_abort(e)]
        raise (primary or errors)[0]
    return results


def run_simulated_nodes(
    nodes: int,
    local: int,
    worker: Callable[[int, Communicator, Communicator, Communicator], T],
    timeout: float = 60.0,
) -> list[T]:
    """As :func:`run_simulated`, for ``nodes`` nodes of ``local`` ranks (node-major): ``worker(rank, world, node,
    cross)`` gets the world's communicator, its node's, and the one of its local rank across the nodes."""
    world = nodes * local
    node_groups = [SimulatedGroup(local, timeout=timeout) for _ in range(nodes)]
    cross_groups = [SimulatedGroup(nodes, timeout=timeout) for _ in range(local)]

    def with_groups(rank: int, comm: Communicator) -> T:
        node, local_rank = divmod(rank, local)
        try:
            return worker(
                rank, comm, node_groups[node].communicator(local_rank), cross_groups[local_rank].communicator(node)
            )
        except BaseException:
            for group in [*node_groups, *cross_groups]:
                group.abort(f"rank {rank} failed")
            raise

    return run_simulated(world, with_groups, timeout=timeout)
