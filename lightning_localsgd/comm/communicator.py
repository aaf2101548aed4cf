"""The one door through which algorithms talk to other ranks.

Algorithms never import ``torch.distributed``: they call a :class:`Communicator`. The real one wraps a
process group; :class:`~lightning_localsgd.comm.simulated.SimulatedCommunicator` runs N workers as
threads of one process, which is how the update rules are tested exactly.
"""

from __future__ import annotations

import contextlib
import time
from abc import ABC, abstractmethod
from collections.abc import Sequence
from datetime import timedelta
from typing import Any, Callable, Optional

import torch
import torch.distributed as dist
from torch import Tensor

from lightning_localsgd.comm.exit_drain import install_exit_drain
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
        self.all_reduce_sum_(tensors)  # SUM then divide: gloo has no AVG reduction
        if self.world_size > 1:
            for tensor in tensors:
                tensor.div_(self.world_size)

    def all_reduce_sum_(self, tensors: Sequence[Tensor]) -> None:
        """Replace each tensor, in place, by its sum over the ranks."""
        if self.world_size == 1:
            return
        start = time.perf_counter()
        for tensor in tensors:
            self._all_reduce_sum_(tensor)
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

    def all_gather_(self, tensor: Tensor) -> list[Tensor]:
        """Every rank's ``tensor`` (same shape and dtype on every rank), in rank order; this rank's is ``tensor``.

        For payloads that cannot be summed (packed sign bits, top-k indices): each rank decodes them all. Counted as
        a ring all-gather: this rank sends ``world_size - 1`` times its payload.
        """
        if self.world_size == 1:
            return [tensor]
        start = time.perf_counter()
        gathered = self._all_gather_(tensor)
        gathered[self.rank] = tensor
        self.stats.collectives += 1
        self.stats.bytes_sent += (self.world_size - 1) * tensor.numel() * tensor.element_size()
        self._wait_for_device([tensor])
        self.stats.seconds += time.perf_counter() - start
        return gathered

    def all_to_all_(self, tensor: Tensor, splits: Sequence[int]) -> list[Tensor]:
        """Rank ``k`` gets piece ``k`` of every rank's ``tensor`` (1-D, cut into pieces of ``splits`` elements, the
        same splits on every rank): returns the pieces addressed to this rank, in rank order (its own included).

        For a payload sharded over the ranks (LIEC-SGD's sharded server): counted as sending every piece but its own.
        """
        splits = [int(n) for n in splits]
        if len(splits) != self.world_size or sum(splits) != tensor.numel() or tensor.dim() != 1:
            raise ValueError(
                f"all_to_all_ needs a 1-D tensor cut into {self.world_size} pieces; got {tensor.numel()} elements "
                f"and splits {splits}."
            )
        if self.world_size == 1:
            return [tensor]
        start = time.perf_counter()
        received = self._all_to_all_(tensor.contiguous(), splits)
        self.stats.collectives += 1
        self.stats.bytes_sent += (tensor.numel() - splits[self.rank]) * tensor.element_size()
        self._wait_for_device([tensor])
        self.stats.seconds += time.perf_counter() - start
        return received

    def neighbour_exchange_(
        self, tensor: Tensor, phases: Sequence[tuple[int, int]], out: Optional[dict[int, Tensor]] = None
    ) -> dict[int, Tensor]:
        """Gossip: in each phase ``(send_to, receive_from)``, send ``tensor`` to one rank and receive another's
        (same shape and dtype), point to point, no whole-world collective. Every rank runs the same number of phases
        at once, and in each phase the rank this one receives from sends to it (a topology's ``phases(rank)``).

        Returns the received tensors by sender. Counted as one collective; this rank sends ``len(phases)`` times the
        payload. ``out``: a contiguous buffer per sender (``tensor``'s shape and dtype) to receive into, reused from
        call to call instead of fresh tensors (a streamed gossip's chunk buffers); the result is then ``out``.
        """
        phases = self._checked_phases(phases)
        if not phases:
            return {}
        if out is not None:
            _check_receive_buffers(tensor, [source for _, source in phases], out)
        start = time.perf_counter()
        if out is None:
            received = self._neighbour_exchange_(tensor.contiguous(), phases)
        else:
            self._neighbour_exchange_into_(tensor.contiguous(), phases, out)
            received = out
        self.stats.collectives += 1
        self.stats.bytes_sent += len(phases) * tensor.numel() * tensor.element_size()
        self._wait_for_device([tensor])
        self.stats.seconds += time.perf_counter() - start
        return received

    def start_neighbour_exchange_(
        self, tensor: Tensor, phases: Sequence[tuple[int, int]], out: dict[int, Tensor]
    ) -> PendingNeighbourExchange:
        """:meth:`neighbour_exchange_` into ``out`` without blocking where the transport allows it; ``.wait()``
        returns ``out``. For a streamed gossip that prepares its next chunk while this one travels: one exchange in
        flight at a time, nothing else issued on this communicator until it is waited for, and neither ``tensor``
        nor ``out`` touched until then. Counted as :meth:`neighbour_exchange_`."""
        phases = self._checked_phases(phases)
        _check_receive_buffers(tensor, [source for _, source in phases], out)
        pending = PendingNeighbourExchange(self, tensor, out)
        if phases:
            self.stats.collectives += 1
            self.stats.bytes_sent += len(phases) * tensor.numel() * tensor.element_size()
            pending._started = time.perf_counter()
            pending._join = self._start_neighbour_exchange_into_(tensor.contiguous(), phases, out)
            self.stats.seconds += time.perf_counter() - pending._started  # posting (or the whole blocking form)
        pending.done = not phases
        return pending

    def start_all_reduce_mean_(self, tensor: Tensor) -> PendingAllReduce:
        """Start averaging ``tensor`` in place without blocking; call ``.wait()`` on the result before reading it.

        Non-blocking collectives run on a group of their own, so they never interleave with blocking ones.
        Several may be in flight at once (one per bucket); every rank must start them in the same order, which
        is what pairs them up across ranks. Do not touch ``tensor`` until ``.wait()`` returns.
        """
        pending = PendingAllReduce(self, tensor)
        if self.world_size > 1:
            self.stats.collectives += 1
            self.stats.bytes_sent += ring_all_reduce_bytes(tensor.numel() * tensor.element_size(), self.world_size)
            pending._started = time.perf_counter()
            pending._join = self._start_all_reduce_sum_(tensor, pending._on_complete)
        return pending

    def start_all_gather_(self, tensor: Tensor) -> PendingAllGather:
        """Start gathering every rank's ``tensor`` without blocking; ``.wait()`` returns them in rank order.

        On the non-blocking transfers' group, queued behind the transfers started before it (a compressed payload
        that cannot be summed travels while training goes on). Counted as :meth:`all_gather_`. Do not touch
        ``tensor`` until ``.wait()`` returns.
        """
        pending = PendingAllGather(self, tensor)
        if self.world_size > 1:
            self.stats.collectives += 1
            self.stats.bytes_sent += (self.world_size - 1) * tensor.numel() * tensor.element_size()
            pending._started = time.perf_counter()
            pending._gather = self._start_all_gather_(tensor.contiguous(), pending._on_complete)
        return pending

    def start_all_reduce_sum_in_order_(self, tensor: Tensor) -> Callable[[], None]:
        """Start summing ``tensor`` in place without blocking, ordered with this communicator's *blocking*
        collectives (not on the non-blocking transfers' group): a rank that issues a blocking collective at that
        point instead pairs with it. For small flag vectors; returns a function that waits for the sum."""
        if self.world_size == 1:
            return lambda: None
        self.stats.collectives += 1
        self.stats.bytes_sent += ring_all_reduce_bytes(tensor.numel() * tensor.element_size(), self.world_size)
        join = self._start_all_reduce_sum_in_order_(tensor)

        def wait() -> None:
            start = time.perf_counter()
            join()
            self._wait_for_device([tensor])
            waited = time.perf_counter() - start
            self.stats.seconds += waited
            self.stats.wait_seconds += waited

        return wait

    def prepare_non_blocking(self) -> None:
        """Create now whatever non-blocking collectives need (a process group of their own), instead of at first use.

        Call it at a point every rank reaches together (set-up): the first non-blocking collective may then be
        started anywhere, e.g. from an autograd hook during backward, without a group-creation barrier that the
        ranks would reach at different moments. Does nothing where nothing needs creating.
        """
        return None

    @abstractmethod
    def _all_reduce_sum_(self, tensor: Tensor) -> None: ...

    @abstractmethod
    def _start_all_reduce_sum_(self, tensor: Tensor, on_complete: Callable[[], None]) -> Callable[[], None]:
        """Start a sum all-reduce; call ``on_complete`` when it finishes; return a function that waits for it."""

    @abstractmethod
    def _start_all_gather_(self, tensor: Tensor, on_complete: Callable[[], None]) -> Callable[[], list[Tensor]]:
        """Start an all-gather on the non-blocking group; call ``on_complete`` when it finishes; return a function
        that waits for it and returns every rank's tensor in rank order."""

    @abstractmethod
    def _start_all_reduce_sum_in_order_(self, tensor: Tensor) -> Callable[[], None]:
        """Start a sum all-reduce on the blocking collectives' group; return a function that waits for it."""

    @abstractmethod
    def _broadcast_(self, tensor: Tensor, src: int) -> None: ...

    @abstractmethod
    def _all_gather_(self, tensor: Tensor) -> list[Tensor]: ...

    @abstractmethod
    def _all_to_all_(self, tensor: Tensor, splits: list[int]) -> list[Tensor]: ...

    @abstractmethod
    def _neighbour_exchange_(self, tensor: Tensor, phases: list[tuple[int, int]]) -> dict[int, Tensor]: ...

    def _neighbour_exchange_into_(self, tensor: Tensor, phases: list[tuple[int, int]], out: dict[int, Tensor]) -> None:
        """:meth:`_neighbour_exchange_` receiving into ``out[source]``; by default, a copy of what it returns."""
        for source, received in self._neighbour_exchange_(tensor, phases).items():
            out[source].copy_(received)

    def _start_neighbour_exchange_into_(
        self, tensor: Tensor, phases: list[tuple[int, int]], out: dict[int, Tensor]
    ) -> Callable[[], None]:
        """Start :meth:`_neighbour_exchange_into_`; return a function that waits for it. By default it runs now,
        blocking, and the wait has nothing left to do."""
        self._neighbour_exchange_into_(tensor, phases, out)
        return lambda: None

    def _checked_phases(self, phases: Sequence[tuple[int, int]]) -> list[tuple[int, int]]:
        checked = [(int(to), int(source)) for to, source in phases]
        if any(self.rank in pair for pair in checked) or len({source for _, source in checked}) != len(checked):
            raise ValueError(f"Rank {self.rank}'s gossip phases must pair it with other ranks, once each: {checked}.")
        return checked

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


def _check_receive_buffers(tensor: Tensor, sources: list[int], out: dict[int, Tensor]) -> None:
    for source in sources:
        buffer = out.get(source)
        if buffer is None or buffer.shape != tensor.shape or buffer.dtype != tensor.dtype or not buffer.is_contiguous():
            raise ValueError(
                f"neighbour_exchange_ needs a contiguous receive buffer of shape {tuple(tensor.shape)} and dtype "
                f"{tensor.dtype} for rank {source} in `out`."
            )


class _PendingTransfer:
    """A non-blocking collective in flight: times the wait (what training lost) and the time in flight."""

    def __init__(self, comm: Communicator, tensor: Tensor) -> None:
        self.comm = comm
        self.tensor = tensor
        self._started = 0.0
        self._completed: Optional[float] = None
        self.done = comm.world_size == 1

    def _on_complete(self) -> None:
        # Runs on the communication thread when the transfer ends: that is the in-flight time.
        self._completed = time.perf_counter()

    def _count_wait(self, start: float) -> None:
        self.comm._wait_for_device([self.tensor])
        waited = time.perf_counter() - start
        stats = self.comm.stats
        stats.seconds += waited
        stats.wait_seconds += waited
        stats.background_seconds += (self._completed or time.perf_counter()) - self._started
        self.done = True


class PendingAllReduce(_PendingTransfer):
    """A non-blocking mean all-reduce in flight; :meth:`wait` finishes it (division included) and times the wait."""

    def __init__(self, comm: Communicator, tensor: Tensor) -> None:
        super().__init__(comm, tensor)
        self._join: Optional[Callable[[], None]] = None

    def wait(self) -> Tensor:
        if self.done:
            return self.tensor
        start = time.perf_counter()
        assert self._join is not None
        self._join()
        self._count_wait(start)
        self.tensor.div_(self.comm.world_size)
        return self.tensor


class PendingAllGather(_PendingTransfer):
    """A non-blocking all-gather in flight; :meth:`wait` returns every rank's tensor in rank order (this rank's is
    the tensor it sent) and times the wait."""

    def __init__(self, comm: Communicator, tensor: Tensor) -> None:
        super().__init__(comm, tensor)
        self._gather: Optional[Callable[[], list[Tensor]]] = None
        self._result: list[Tensor] = [tensor]

    def wait(self) -> list[Tensor]:
        if self.done:
            return self._result
        start = time.perf_counter()
        assert self._gather is not None
        gathered = self._gather()
        gathered[self.comm.rank] = self.tensor
        self._result = gathered
        self._count_wait(start)
        return gathered


class PendingNeighbourExchange(_PendingTransfer):
    """A neighbour exchange in flight; :meth:`wait` returns the receive buffers by sender and times the wait."""

    def __init__(self, comm: Communicator, tensor: Tensor, out: dict[int, Tensor]) -> None:
        super().__init__(comm, tensor)
        self.out = out
        self._join: Optional[Callable[[], None]] = None

    def wait(self) -> dict[int, Tensor]:
        if self.done:
            return self.out
        start = time.perf_counter()
        assert self._join is not None
        self._join()
        self._completed = time.perf_counter()
        self._count_wait(start)
        return self.out


class ProcessGroupCommunicator(Communicator):
    """A :class:`Communicator` over a ``torch.distributed`` process group (gloo, NCCL, ...).

    Args:
        group: the process group for blocking collectives (default: the world).
        timeout: timeout of the extra group created for non-blocking collectives.
        non_blocking_group: that extra group, same ranks as ``group``, created by the caller. Needed where ``group``
            is one of several disjoint groups (replica groups' shard groups): ``new_group`` is collective over the
            whole world, so the ranks of every such group must create all of them together, not each its own on
            first use. Default: created on first use.
    """

    def __init__(
        self,
        group: Optional[dist.ProcessGroup] = None,
        timeout: Optional[timedelta] = None,
        non_blocking_group: Optional[dist.ProcessGroup] = None,
    ) -> None:
        if not dist.is_available() or not dist.is_initialized():
            raise RuntimeError("ProcessGroupCommunicator needs an initialised torch.distributed process group.")
        install_exit_drain()  # else a finished run can abort at exit (see comm/exit_drain.py)
        self.group = group
        self.timeout = timeout
        self._async_group: Optional[dist.ProcessGroup] = non_blocking_group
        self._gloo = dist.get_backend(group) == "gloo"  # exactly gloo: "cpu:gloo,cuda:nccl" sends CUDA to NCCL
        super().__init__(dist.get_rank(group), dist.get_world_size(group))

    def _stages_through_host(self, tensor: Tensor) -> bool:
        """gloo reduces and broadcasts CUDA tensors itself, but its send/recv, all_gather and all_to_all are
        documented CPU-only (torch's backend table): for those a device tensor goes through a host copy."""
        return self._gloo and tensor.device.type != "cpu"

    def prepare_non_blocking(self) -> None:
        self._non_blocking_group()

    def _non_blocking_group(self) -> dist.ProcessGroup:
        if self._async_group is None:
            # Created on first use (or by `prepare_non_blocking`), which every rank reaches at the same point of
            # training. A group of its own keeps non-blocking transfers from racing blocking ones (and Lightning's
            # own collectives).
            ranks = dist.get_process_group_ranks(self.group) if self.group is not None else None
            self._async_group = dist.new_group(ranks=ranks, timeout=self.timeout, backend=dist.get_backend(self.group))
        return self._async_group

    def _start_all_reduce_sum_(self, tensor: Tensor, on_complete: Callable[[], None]) -> Callable[[], None]:
        group = self._non_blocking_group()
        work = dist.all_reduce(tensor, op=dist.ReduceOp.SUM, group=group, async_op=True)
        assert work is not None
        with contextlib.suppress(RuntimeError):  # a backend without futures: only the wait time is measured
            work.get_future().then(lambda _: on_complete())
        return work.wait

    def _start_all_gather_(self, tensor: Tensor, on_complete: Callable[[], None]) -> Callable[[], list[Tensor]]:
        staged = self._stages_through_host(tensor)  # gloo's all_gather is CPU-only
        sent = tensor.cpu() if staged else tensor
        out = [torch.empty_like(sent) for _ in range(self.world_size)]
        work = dist.all_gather(out, sent, group=self._non_blocking_group(), async_op=True)
        assert work is not None
        with contextlib.suppress(RuntimeError):  # a backend without futures: only the wait time is measured
            work.get_future().then(lambda _: on_complete())

        def gather() -> list[Tensor]:
            work.wait()
            return [t.to(tensor.device) for t in out] if staged else out

        return gather

    def _all_reduce_sum_(self, tensor: Tensor) -> None:
        # SUM then divide: gloo has no AVG reduction.
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM, group=self.group)

    def _start_all_reduce_sum_in_order_(self, tensor: Tensor) -> Callable[[], None]:
        work = dist.all_reduce(tensor, op=dist.ReduceOp.SUM, group=self.group, async_op=True)
        assert work is not None
        return work.wait

    def _broadcast_(self, tensor: Tensor, src: int) -> None:
        dist.broadcast(tensor, src=dist.get_global_rank(self.group, src) if self.group else src, group=self.group)

    def _all_gather_(self, tensor: Tensor) -> list[Tensor]:
        if self._stages_through_host(tensor):
            return [t.to(tensor.device) for t in self._all_gather_here(tensor.cpu())]
        return self._all_gather_here(tensor)

    def _all_gather_here(self, tensor: Tensor) -> list[Tensor]:
        out = [torch.empty_like(tensor) for _ in range(self.world_size)]
        dist.all_gather(out, tensor.contiguous(), group=self.group)
        return out

    def _all_to_all_(self, tensor: Tensor, splits: list[int]) -> list[Tensor]:
        if self._stages_through_host(tensor):
            return [t.to(tensor.device) for t in self._all_to_all_here(tensor.cpu(), splits)]
        return self._all_to_all_here(tensor, splits)

    def _all_to_all_here(self, tensor: Tensor, splits: list[int]) -> list[Tensor]:
        mine = splits[self.rank]
        out = torch.empty(mine * self.world_size, dtype=tensor.dtype, device=tensor.device)
        dist.all_to_all_single(out, tensor, [mine] * self.world_size, splits, group=self.group)
        return list(out.split(mine)) if mine else [out[:0] for _ in range(self.world_size)]

    def _neighbour_exchange_(self, tensor: Tensor, phases: list[tuple[int, int]]) -> dict[int, Tensor]:
        received = {source: torch.empty_like(tensor) for _, source in phases}
        self._neighbour_exchange_into_(tensor, phases, received)
        return received

    def _neighbour_exchange_into_(self, tensor: Tensor, phases: list[tuple[int, int]], out: dict[int, Tensor]) -> None:
        if self._stages_through_host(tensor):
            host = {source: torch.empty_like(buffer, device="cpu") for source, buffer in out.items()}
            self._neighbour_exchange_here(tensor.cpu(), phases, host)
            for source, buffer in host.items():
                out[source].copy_(buffer)
            return
        self._neighbour_exchange_here(tensor, phases, out)

    def _start_neighbour_exchange_into_(
        self, tensor: Tensor, phases: list[tuple[int, int]], out: dict[int, Tensor]
    ) -> Callable[[], None]:
        if self._stages_through_host(tensor):  # through host copies: blocking, as the blocking form
            return super()._start_neighbour_exchange_into_(tensor, phases, out)
        # The first phase travels now; later ones (rings of more than 2 ranks) start when it is waited for, so that
        # each link still carries one message at a time.
        works = self._post_phase(tensor, phases[0], out)

        def wait() -> None:
            for work in works:
                work.wait()
            if len(phases) > 1:
                self._neighbour_exchange_here(tensor, phases[1:], out)

        return wait

    def _post_phase(self, tensor: Tensor, phase: tuple[int, int], out: dict[int, Tensor]) -> list[Any]:
        send_to, receive_from = phase
        ops = [
            dist.P2POp(dist.isend, tensor, self._global(send_to), self.group),
            dist.P2POp(dist.irecv, out[receive_from], self._global(receive_from), self.group),
        ]
        return list(dist.batch_isend_irecv(ops))

    def _neighbour_exchange_here(self, tensor: Tensor, phases: list[tuple[int, int]], out: dict[int, Tensor]) -> None:
        # One phase at a time: each link carries one message at once (see Topology.phases for what that bought).
        for phase in phases:
            for work in self._post_phase(tensor, phase, out):
                work.wait()

    def _global(self, rank: int) -> int:
        return dist.get_global_rank(self.group, rank) if self.group is not None else rank

    def all_gather_object(self, obj: Any) -> list[Any]:
        out: list[Any] = [None] * self.world_size
        dist.all_gather_object(out, obj, group=self.group)
        return out

    def gather_object(self, obj: Any, dst: int = 0) -> Optional[list[Any]]:
        out: Optional[list[Any]] = [None] * self.world_size if self.rank == dst else None
        dist.gather_object(obj, out, dst=dst, group=self.group)
        return out
