"""What every decentralised (gossip) algorithm shares: a neighbour exchange at every step, and no all-reduce.

Each rank keeps its own replica and, at every optimizer step, mixes it with its neighbours' over a topology
(:mod:`lightning_localsgd.comm.topology`): ``x_i <- sum_j W_ij x_j``. Messages go point to point to the neighbours only
(:meth:`~lightning_localsgd.comm.Communicator.neighbour_exchange_`, one neighbour per phase). A message reads the
parameters of the optimizer about to step (and, once per step, the averaged normalisation buffers), then what the
algorithm gossips beside them (DeTAG's tracker), as one long vector (:mod:`.gossip_message`), and streams it: chunks of
half ``bucket_cap_mb`` (:mod:`.chunks`) in float32 (float64 for a float64 model), each mixed and written back before the
next is read, through a few chunk-sized buffers kept between steps (two messages and the neighbours' messages: one chunk
travels while the next is filled, see :meth:`GossipAlgorithm._stream`; DeTAG's previous round). Extra memory is a few
chunks whatever the model size, and a half-precision model is never widened into a whole-model vector. Mixing is
elementwise, so the chunks give the same bits as one whole-model vector would; all ranks cut the same chunks and
exchange them in the same order (DeTAG: every round of a chunk, then the next). On CPU float32 the copy into the message
(with its inf/NaN check), DeTAG's tracker update and a round's mix go through one-pass C kernels
(:mod:`.gossip_native`), the last round writing straight into the replica; the torch expressions here are their
reference and fallback, with the same bits.

The guard, without a whole-world collective on the critical path of a step:

* Every message starts with a small header: "my vector is finite" and the sender's position (step and round
  within the step). A rank checks its neighbours' headers *before* mixing: a non-finite neighbour, or one at another
  point of training, stops this rank with a :class:`~lightning_localsgd.errors.NonFiniteError` /
  :class:`~lightning_localsgd.errors.OutOfStepError` naming it, and nothing it sent is mixed in. The rank that
  holds the inf/NaN stops with its own error before it sends; ranks further away see their neighbours stop and
  end with a :class:`~lightning_localsgd.errors.PeerFailureError`. inf/NaN never enters any replica or tracker.
  The first chunk's flag covers the whole message (the replica, buffers and tracker are checked before it is
  sent), so a replica holding inf/NaN is announced before anything of it is mixed; each later chunk's flag covers
  that chunk, so a value that only a mix or the tracker's update makes non-finite (an overflow of a diverged model)
  is announced at its chunk, after finite earlier chunks were mixed, and the run stops there all the same.
* Every ``check_every`` steps the usual round runs, but as a check only (nothing is averaged): the small flag
  collective of every synchronisation point (finiteness, position, the learning-rate fingerprint) and the requests
  every rank must act on at the same step (SIGTERM, SLURM requeue). That is the one world collective, a few dozen
  bytes, at a cadence the user sets; signals are acted on at the next such check.
* ``on_nonfinite="skip_round"`` needs a world-wide rollback point, which gossip never has: it is refused.
* A parameter without a gradient on this rank, with nothing about it arriving either (DeTAG: a tracked direction of
  exactly zero), keeps ``grad=None``, so the optimizer leaves it alone; mixing is computed as
  ``x_i + sum_j W_ij (x_j - x_i)``, exact where the neighbours agree, so a parameter no rank trains stays bit for bit.
* Under fp16 AMP a rank whose gradients overflowed still gossips its (finite) replica, keeps the overflowed
  gradients out of the algorithm's state, and lets its grad scaler skip its own step: replicas differ anyway, so
  no other rank needs to skip with it.

Evaluation, checkpoint weights and the model after ``fit`` are the world average (one all-reduce each time, off the
training path); each rank trains on from its own replica, and the consensus distance
``sqrt(mean_i ||x_i - mean_j x_j||^2)`` is measured whenever that average is formed.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Optional

import torch
from torch import Tensor, nn
from torch.optim import Optimizer

from lightning_localsgd._validation import check_choice, check_int
from lightning_localsgd.algorithms.buffers import BufferSelection
from lightning_localsgd.algorithms.chunks import Chunk, ChunkBuffers, ChunkPlan, ChunkWriter
from lightning_localsgd.algorithms.gossip_message import (
    HEADER,
    ROUNDS_PER_STEP,
    ChunkFn,
    FillFn,
    Message,
    Output,
    TargetsFn,
    describe_position,
    gather_chunk_checked,
    read_headers,
    values_finite,
    write_header,
)
from lightning_localsgd.algorithms.gossip_native import MAX_NEIGHBOURS, GossipKernels, kernels_for
from lightning_localsgd.algorithms.guard import EXCHANGE, all_finite, failures_named, nonfinite_error, position
from lightning_localsgd.algorithms.periodic import PeriodicAlgorithm
from lightning_localsgd.algorithms.profiling import phase
from lightning_localsgd.comm.communicator import PendingNeighbourExchange
from lightning_localsgd.comm.flat import DEFAULT_BUCKET_CAP_MB
from lightning_localsgd.comm.topology import Topology, check_topology_name, make_topology
from lightning_localsgd.errors import NonFiniteError, OutOfStepError
from lightning_localsgd.native.build import is_plain_cpu_float32


def _extrapolate(mixed: Tensor, previous: Tensor, eta: float, out: Tensor) -> None:
    """``out = mixed + eta (mixed - previous)``, i.e. ``(1 + eta) W z(r) - eta z(r-1)`` written so that it is exact
    where nothing changes; ``out`` may be ``previous``."""
    torch.sub(mixed, previous, out=out)
    torch.add(mixed, out, alpha=eta, out=out)


@dataclass(frozen=True)
class _InFlight:
    """A chunk's neighbour exchange on its way: the peers it pairs with (ascending), its position, and where."""

    exchange: PendingNeighbourExchange
    peers: list[int]
    at: int
    where: str


class GossipAlgorithm(PeriodicAlgorithm):
    """A :class:`PeriodicAlgorithm` whose ranks mix replicas with their neighbours at every step.

    Subclasses implement :meth:`_gossip_step`. Args beyond :class:`PeriodicAlgorithm`'s:

    Args:
        topology: ``"ring"`` (default), ``"torus"``, ``"exponential"`` or ``"fully_connected"``, built for the world
            size at set-up.
        check_every: steps between the guard's world checks (the ``period`` of this algorithm: nothing is averaged
            there, see the module docstring).
    """

    rounds_synchronise = False  # gossip brings replicas closer, never to one model
    sharding_refused_because = (
        "its replicas mix with their neighbours at every step and never meet in one model, so there is no "
        "round to split over the shards; with replica groups, only periodic averaging (local_sgd, vrl_sgd, diloco, "
        "overlap_local_sgd, cocod_sgd, stl_sgd) is supported"
    )

    def __init__(
        self,
        topology: str = "ring",
        check_every: int = 50,
        warmup_steps: int = 0,
        bucket_cap_mb: float = DEFAULT_BUCKET_CAP_MB,
        buffers: BufferSelection = None,
    ) -> None:
        check_int("check_every", check_every, 1)
        super().__init__(check_every, warmup_steps, False, bucket_cap_mb, buffers)
        self.topology_name = check_topology_name(topology)
        self.topology: Optional[Topology] = None
        self.consensus_distance: Optional[float] = None  # measured when the consensus is formed
        self._buffers_gossiped_at = -1  # the step whose gossip carried the averaged buffers
        self._work = ChunkBuffers()  # the streamed exchange's chunk buffers, kept between steps

    @property
    def check_every(self) -> int:
        return self.period

    def set_nonfinite_policy(self, policy: str) -> None:
        if check_choice("on_nonfinite", policy, ("raise", "skip_round")) == "skip_round":
            raise ValueError(
                f"{type(self).__name__}: `on_nonfinite` 'skip_round' rolls every rank back to the last round at which "
                "all replicas were good, and gossip has no such round (replicas never agree). Use 'raise' (the "
                "default): a non-finite replica stops the run before any neighbour mixes it in."
            )
        super().set_nonfinite_policy(policy)

    def _on_setup(self) -> None:
        self.topology = make_topology(self.topology_name, self.comm.world_size)
        self._work.clear()

    # ------------------------------------------------------------------ moments
    def before_optimizer_step(self, optimizer: Optimizer) -> None:
        if self.in_warmup():
            super().before_optimizer_step(optimizer)
            return
        where = f"the gossip of step {self.step}"
        with failures_named(self.label, where, self.timeout):
            self.flat.ensure_views()
            # The managed set follows `requires_grad` at the checks only, where the ranks agree on it first: a layer
            # unfrozen in between trains on its own rank and joins the gossip at the next check.
            params = self._managed_params_of(optimizer)
            if not params:
                return
            grads_finite = all_finite([p.grad for p in params if p.grad is not None])
            index_of = self.flat.index_of
            indices = [index_of[id(p)] for p in params]
            if not grads_finite and self.grad_scale is None:
                self._announce_nonfinite(indices, "gradients")
            # Under fp16 AMP an overflowed gradient is left to the scaler (None): it stays out of the algorithm.
            scale = (float(self.grad_scale()) if self.grad_scale is not None else 1.0) if grads_finite else None
            sent_before = self.comm.stats.bytes_sent
            with torch.no_grad(), phase("gossip"):
                self._gossip_step(optimizer, params, indices, scale)
            self.comm.stats.exchanges += 1  # one per optimizer step, wherever its gossip happens
            self.comm.stats.exchange_bytes_sent += self.comm.stats.bytes_sent - sent_before

    def _gossip_step(
        self, optimizer: Optimizer, params: list[nn.Parameter], indices: list[int], scale: Optional[float]
    ) -> None:
        """Mix this optimizer's parameters ``params`` (``flat.params[i]`` for ``i`` in ``indices``) with the
        neighbours' and leave in their ``.grad`` the direction the optimizer steps on. ``scale`` is what the
        gradients are multiplied by (fp16 AMP's grad scale, else 1), or ``None`` where they overflowed under AMP
        (the scaler then skips this rank's step)."""
        raise NotImplementedError

    def _round(self) -> None:
        """A check only (the flag collective ran before): gossip averages nothing over the world."""

    # ------------------------------------------------------------------ the message
    @property
    def gossip_dtype(self) -> torch.dtype:
        """What replicas are mixed in: float32, or the parameters' dtype where that is wider (float64)."""
        dtype = torch.float32
        for p in self.flat.params:
            dtype = torch.promote_types(dtype, p.dtype)
        return dtype

    def _message(self, indices: list[int], carried: Sequence[Tensor] = ()) -> Message:
        """This optimizer's message: its parameters, the averaged buffers (once per step), then ``carried``."""
        params = [self.flat.params[i].data for i in indices]
        buffers = self.averaged_buffers() if self._buffers_gossiped_at != self.step else []
        segments = [*params, *buffers, *carried]
        itemsize = torch.empty(0, dtype=self.gossip_dtype).element_size()
        chunk_numel = max(1, int(self.bucket_cap_mb * 2**20) // itemsize // 2)  # two chunks travel at once
        plan = ChunkPlan([t.numel() for t in segments], chunk_numel)
        return Message(segments, plan, len(params), len(params) + len(buffers))

    def _message_buffer(self, name: str, chunk: Chunk) -> Tensor:
        """A reused buffer for one chunk's message: the header's slots, then the chunk."""
        return self._work.get(name, HEADER + chunk.numel, self.gossip_dtype, self.flat.buckets[0].device)

    def _fill(self, message: Message) -> FillFn:
        """Reads the chunk of ``message``'s segments, in the gossip dtype."""

        def fill(chunk: Chunk, values: Tensor) -> Optional[bool]:
            return gather_chunk_checked(chunk, message.segments, values)

        return fill

    # ------------------------------------------------------------------ the streamed gossip
    def _stream(
        self,
        message: Message,
        fill: FillFn,
        consume: ChunkFn,
        rounds: int = 1,
        eta: float = 0.0,
        targets: Optional[TargetsFn] = None,
    ) -> None:
        """Gossip ``message`` chunk by chunk: ``fill`` each chunk's values, run the rounds on it, hand the result
        to ``consume`` (which writes it back). Where ``targets`` gives a chunk's destinations and the kernels run,
        the last round writes there itself and ``consume`` is skipped.

        With one round the chunks are pipelined: chunk k+1 is filled while chunk k travels, and travels while chunk
        k is mixed. Only one exchange is ever in flight, and the next starts only once every header of the last
        one has been checked, so a rank that stops (a bad header, or a chunk of its own to announce) leaves nothing
        in flight: it stops where the sequential order would, its neighbours waiting in the exchange it answers.
        Several rounds go chunk after chunk."""
        if not values_finite(message.segments):
            self._announce_nonfinite_message(message, "parameters")
        if rounds == 1:
            self._stream_pipelined(message, fill, consume, eta, targets)
        else:
            for chunk in message.chunks:
                current = self._message_buffer("message", chunk)
                finite = fill(chunk, current[HEADER:])
                spare = self._message_buffer("spare", chunk) if eta else current  # z(r-1) is kept to accelerate
                outputs = targets(chunk) if targets is not None else None
                result = self._rounds(current, spare, rounds, eta, message.plain(chunk), finite, outputs)
                if result is not None:
                    consume(chunk, result[HEADER:])
        self._buffers_gossiped_at = self.step  # the first message of the step carried them

    def _stream_pipelined(
        self, message: Message, fill: FillFn, consume: ChunkFn, eta: float, targets: Optional[TargetsFn]
    ) -> None:
        """One round of :meth:`_stream`, the next chunk filled and sent while this one travels and is mixed."""
        chunks = message.chunks

        def prepared(k: int) -> tuple[Tensor, bool]:
            buffer = self._message_buffer(f"message {k % 2}", chunks[k])
            finite = fill(chunks[k], buffer[HEADER:])
            return buffer, values_finite([buffer[HEADER:]]) if finite is None else finite

        current, finite = prepared(0)
        in_flight = self._start_exchange(current, 0, slot=0) if finite else None
        for k, chunk in enumerate(chunks):
            if in_flight is None:  # this chunk holds inf/NaN: tell the neighbours waiting in its exchange, and stop
                self._exchange_checked(current, 0, announce="parameters")
            upcoming = prepared(k + 1) if k + 1 < len(chunks) else None  # while chunk k travels
            assert in_flight is not None
            received = self._finish_exchange(in_flight)  # raises on a bad header, with nothing else in flight
            in_flight = None
            if upcoming is not None and upcoming[1]:
                in_flight = self._start_exchange(upcoming[0], 0, slot=(k + 1) % 2)  # travels while k is mixed
            spare = self._message_buffer("spare", chunk) if eta else current
            outputs = targets(chunk) if targets is not None else None
            mixed = self._round_mix(current, spare, current, received, eta, message.plain(chunk), outputs)
            if mixed is not None:
                consume(chunk, mixed[1][HEADER:])
            if upcoming is not None:
                current = upcoming[0]

    def _direct_targets(self, message: Message, chunk: Chunk) -> Optional[list[Output]]:
        """The chunk's pieces of ``message``'s segments as destinations, where each is a flat CPU float32 tensor."""
        outputs: list[Output] = []
        for piece in chunk.pieces:
            target = message.segments[piece.index]
            if not is_plain_cpu_float32(target):
                return None
            outputs.append((piece.at, piece.length, target.view(-1)[piece.start : piece.start + piece.length], None))
        return outputs

    def _rounds(
        self,
        current: Tensor,
        spare: Tensor,
        rounds: int,
        eta: float,
        plain: slice,
        finite: Optional[bool] = None,
        outputs: Optional[list[Output]] = None,
    ) -> Optional[Tensor]:
        """R rounds on one chunk's message ``current``: ``z(r+1) = W z(r) + eta (W z(r) - z(r-1))`` (plain gossip where
        ``eta`` is 0, and for the ``plain`` elements). Returns the message buffer holding ``z(R)``; ``z(r)`` and
        ``z(r-1)`` take turns in ``current`` and ``spare``. ``finite``: whether the filled chunk is all finite, where
        the fill found out (its first exchange then does not read it again). Where the kernels run and ``outputs``
        are given, the last round writes ``z(R)`` into them instead, and None is returned."""
        previous = current  # z(-1) = z(0)
        for round_index in range(rounds):
            received = self._exchange(current, round_index, finite if round_index == 0 else None)
            last = outputs if round_index == rounds - 1 else None
            mixed = self._round_mix(current, spare, previous, received, eta, plain, last)
            if mixed is None:
                return None
            previous, current = mixed
        return current

    def _round_mix(
        self,
        current: Tensor,
        spare: Tensor,
        previous: Tensor,
        received: list[Tensor],
        eta: float,
        plain: slice,
        outputs: Optional[list[Output]] = None,
    ) -> Optional[tuple[Tensor, Tensor]]:
        """One round's mix of ``received`` into ``current`` (``z(r)``, ``previous`` is ``z(r-1)``): returns the buffers
        that now hold ``z(r)`` and ``z(r+1)``, or None where the kernels wrote ``z(r+1)`` into ``outputs``."""
        kernels = kernels_for(current, spare, *received) if len(received) <= MAX_NEIGHBOURS else None
        if kernels is not None:  # the round in one pass (the same bits as the torch expressions below)
            before = previous if eta else None
            if outputs is not None:
                self._mix_round(kernels, current, received, before, eta, plain, outputs)
                return None
            following = current if not eta else spare if previous is current else previous
            whole: list[Output] = [(0, following.numel() - HEADER, following[HEADER:], None)]
            self._mix_round(kernels, current, received, before, eta, plain, whole)
            return (current, following) if eta else (previous, current)
        if not eta:
            self._mix_(current[HEADER:], received)
            return previous, current
        mixed = self._mix_into_first(current[HEADER:], received)
        following = spare if previous is current else previous  # z(r-1) is not needed once this is computed
        _extrapolate(mixed, previous[HEADER:], eta, following[HEADER:])
        following[HEADER:][plain] = mixed[plain]  # buffers: plain gossip (no extrapolation below zero)
        return current, following

    def _mix_round(
        self,
        kernels: GossipKernels,
        current: Tensor,
        received: list[Tensor],
        previous: Optional[Tensor],
        eta: float,
        plain: slice,
        outputs: list[Output],
    ) -> None:
        """One round's mix of ``current`` with ``received`` through the kernels, into ``outputs`` (which cover the
        chunk), extrapolated from ``previous`` (None: plain gossip) but for the ``plain`` elements."""
        assert self.topology is not None
        weights = list(self.topology.neighbours(self.comm.rank).values())
        own = current[HEADER:]
        before = None if previous is None else previous[HEADER:]
        start, stop = plain.start or 0, own.numel() if plain.stop is None else plain.stop
        for at, length, out, copy in outputs:
            cuts = sorted({at, at + length} | {cut for cut in (start, stop) if at < cut < at + length})
            for low, high in zip(cuts, cuts[1:]):
                extrapolated = before is not None and not start <= low < stop
                kernels.mix(
                    own[low:high],
                    [r[low:high] for r in received],
                    weights,
                    before[low:high] if before is not None and extrapolated else None,
                    eta,
                    out[low - at : high - at],
                    None if copy is None else copy[low - at : high - at],
                )

    def _exchange(self, message: Tensor, round_index: int, finite: Optional[bool] = None) -> list[Tensor]:
        """Send ``message`` (its chunk after the header's slots) to the neighbours, receive theirs into reused
        buffers and check their headers; returns their chunks in ascending peer order. A non-finite chunk is
        announced instead of sent, and this rank stops. ``finite``: the chunk's finiteness where already known."""
        if not (finite if finite is not None else values_finite([message[HEADER:]])):
            self._exchange_checked(message, round_index, announce="parameters")
        return self._exchange_checked(message, round_index)

    def _exchange_checked(self, message: Tensor, round_index: int, announce: Optional[str] = None) -> list[Tensor]:
        """One exchange of ``message``, checked before anything is mixed. ``announce``: this rank holds inf/NaN of
        that kind; the exchange only tells the neighbours (zeros, flagged non-finite), then raises."""
        if announce is not None:
            message[HEADER:].zero_()  # a non-finite replica is announced, not sent
        pending = self._start_exchange(message, round_index, finite=announce is None)
        if announce is not None:
            pending.exchange.wait()
            raise nonfinite_error(self.label, pending.where, announce, [self.comm.rank], self.step)
        return self._finish_exchange(pending)

    def _start_exchange(self, message: Tensor, round_index: int, finite: bool = True, slot: int = 0) -> _InFlight:
        """Write ``message``'s header and start sending it to the neighbours, receiving theirs into the receive
        buffers of ``slot`` (two slots: one exchange travels while the next chunk is filled)."""
        assert self.topology is not None
        rank = self.comm.rank
        at = position(self.step, EXCHANGE) * ROUNDS_PER_STEP + round_index
        write_header(message, finite, at)
        peers = list(self.topology.neighbours(rank))
        suffix = "" if slot == 0 else f" slot {slot}"
        out = {
            peer: self._work.get(f"from {k}{suffix}", message.numel(), message.dtype, message.device)
            for k, peer in enumerate(peers)
        }
        exchange = self.comm.start_neighbour_exchange_(message, self.topology.phases(rank), out)
        return _InFlight(exchange, peers, at, f"the gossip of step {self.step}")

    def _finish_exchange(self, pending: _InFlight) -> list[Tensor]:
        """Wait for an exchange and check the neighbours' headers; their chunks in ascending peer order."""
        received = pending.exchange.wait()
        for peer, header in zip(pending.peers, read_headers([received[peer] for peer in pending.peers])):
            self._check_header(peer, header, pending.at, pending.where)
        return [received[peer][HEADER:] for peer in pending.peers]  # ascending peer order: deterministic sums

    def _check_header(self, peer: int, header: tuple[bool, int], at: int, where: str) -> None:
        their_finite, their_at = header
        rank = self.comm.rank
        if not their_finite:
            raise NonFiniteError(
                f"{self.label}: neighbour rank {peer} sent inf/NaN at {where}; nothing it sent was mixed into "
                f"rank {rank}'s model.",
                [peer],
                self.step,
            )
        if their_at != at:
            raise OutOfStepError(
                f"{self.label}: rank {rank} is at {describe_position(at)} and its neighbour rank {peer} at "
                f"{describe_position(their_at)}. Their data or control flow differ: give every rank the same number of "
                "batches and take optimizer steps on all ranks alike. Nothing was mixed."
            )

    def _differences_(self, own: Tensor, received: list[Tensor]) -> list[float]:
        """Each received chunk becomes ``x_j - x_i`` in place; returns the weights ``W_ij`` in the same order."""
        assert self.topology is not None
        for theirs in received:
            theirs.sub_(own)
        return list(self.topology.neighbours(self.comm.rank).values())

    def _mix_(self, own: Tensor, received: list[Tensor]) -> None:
        """``own <- x_i + sum_j W_ij (x_j - x_i)``, in place (``received`` is overwritten)."""
        # W's rows sum to 1, so this is sum_j W_ij x_j, and it is exact where the neighbours hold what this rank
        # holds: a parameter no rank trains (identical everywhere) stays bit for bit. Every difference is taken
        # before ``own`` changes, and they are added in ascending peer order, as one whole-model vector had them.
        weights = self._differences_(own, received)
        for difference, weight in zip(received, weights):
            own.add_(difference, alpha=weight)

    def _mix_into_first(self, own: Tensor, received: list[Tensor]) -> Tensor:
        """``x_i + sum_j W_ij (x_j - x_i)`` into the first received buffer, ``own`` left as it is."""
        if not received:  # a world of one
            return own
        weights = self._differences_(own, received)
        mixed = torch.add(own, received[0], alpha=weights[0], out=received[0])
        for difference, weight in zip(received[1:], weights[1:]):
            mixed.add_(difference, alpha=weight)
        return mixed

    def _announce_nonfinite(self, indices: list[int], what: str) -> None:
        """Tell the neighbours, in the exchange they are waiting in, that this rank holds inf/NaN ``what``; raise."""
        self._announce_nonfinite_message(self._message(indices, self._carried(indices)), what)

    def _announce_nonfinite_message(self, message: Message, what: str) -> None:
        self._exchange_checked(self._message_buffer("message", message.chunks[0]), 0, announce=what)

    def _carried(self, indices: list[int]) -> list[Tensor]:
        """The per-parameter state a message carries beside the replica (DeTAG's tracker); none by default."""
        return []

    def _write_back(self, message: Message) -> ChunkWriter:
        """Writes a chunk's result into ``message``'s segments (the replica, the buffers, the carried state)."""
        return ChunkWriter(message.segments.__getitem__)

    # ------------------------------------------------------------------ consensus distance
    def enter_consensus(self) -> None:
        super().enter_consensus()
        if self._local_backup is not None:
            # Bucket by bucket: one bucket-sized temporary, never a vector of the whole model.
            own_buckets, mean_buckets = self._local_backup[0], self.flat.buckets
            device = mean_buckets[0].device
            squared = torch.zeros(1, dtype=torch.float64, device=device)
            for own, mean in zip(own_buckets, mean_buckets):
                squared += torch.linalg.vector_norm(own.float() - mean.float(), dtype=torch.float64).square()
            self.comm.all_reduce_mean_([squared])
            self.consensus_distance = math.sqrt(max(float(squared), 0.0))
        elif self.in_sync:
            self.consensus_distance = 0.0

    def metrics(self) -> dict[str, float]:
        if self.consensus_distance is None:
            return {}
        return {"comm/consensus_distance": self.consensus_distance}

    def _extra_state(self) -> dict[str, Any]:
        return {"topology": self.topology_name}

    def _load_extra_state(self, state: dict[str, Any]) -> None:
        saved = state.get("topology", self.topology_name)
        if saved != self.topology_name:
            raise ValueError(
                f"This state was saved with the {saved!r} topology, and this run gossips over {self.topology_name!r}: "
                "resume with the topology the checkpoint was written with."
            )
