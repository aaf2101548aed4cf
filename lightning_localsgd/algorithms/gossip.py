"""What every decentralised (gossip) algorithm shares: a neighbour exchange at every step, and no all-reduce.

Each rank keeps its own replica and, at every optimizer step, mixes it with its neighbours' over a topology
(:mod:`lightning_localsgd.comm.topology`): ``x_i <- sum_j W_ij x_j``. Messages go point to point to the neighbours
only (:meth:`~lightning_localsgd.comm.Communicator.neighbour_exchange_`, one neighbour per phase), packed into one
flat float32 vector (float64 for a float64 model) per round: the parameters of the optimizer about to step (and,
once per step, the averaged normalisation buffers), plus what the algorithm gossips beside them (DeTAG's tracker).

The guard, without a whole-world collective on the critical path of a step:

* Every message starts with a small header: "my vector is finite" and the sender's position (step and round
  within the step). A rank checks its neighbours' headers *before* mixing: a non-finite neighbour, or one at another
  point of training, stops this rank with a :class:`~lightning_localsgd.errors.NonFiniteError` /
  :class:`~lightning_localsgd.errors.OutOfStepError` naming it, and nothing it sent is mixed in. The rank that
  holds the inf/NaN stops with its own error before it sends; ranks further away see their neighbours stop and
  end with a :class:`~lightning_localsgd.errors.PeerFailureError`. inf/NaN never enters any replica or tracker.
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
from typing import Any, Optional

import torch
from torch import Tensor
from torch.optim import Optimizer

from lightning_localsgd._validation import check_choice, check_int
from lightning_localsgd.algorithms.buffers import BufferSelection
from lightning_localsgd.algorithms.gradient_exchange import (
    flat_gradients,
    flat_slices,
    reached_nothing,
    write_gradients,
    write_slices,
)
from lightning_localsgd.algorithms.guard import (
    EXCHANGE,
    SYNC_POINT_KINDS,
    all_finite,
    failures_named,
    nonfinite_error,
    position,
)
from lightning_localsgd.algorithms.periodic import PeriodicAlgorithm
from lightning_localsgd.algorithms.profiling import phase
from lightning_localsgd.comm.flat import DEFAULT_BUCKET_CAP_MB
from lightning_localsgd.comm.topology import Topology, check_topology_name, make_topology
from lightning_localsgd.errors import NonFiniteError, OutOfStepError

_HEADER = 3  # slots: finite flag, position split in two exact halves (float32 holds integers below 2**24)
_HALF = 2**22
ROUNDS_PER_STEP = 64  # at most this many gossip rounds in one step (positions count them)


def _header(finite: bool, at: int) -> Tensor:
    return torch.tensor([1.0 if finite else 0.0, float(at // _HALF), float(at % _HALF)], dtype=torch.float32)


def _describe(at: int) -> str:
    step = at // ROUNDS_PER_STEP // len(SYNC_POINT_KINDS)
    return f"step {step}, gossip round {at % ROUNDS_PER_STEP}"


def _read_header(message: Tensor) -> tuple[bool, int]:
    flag, high, low = message[:_HEADER].tolist()
    return flag == 1.0, int(high) * _HALF + int(low)


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
    gossips_gradients = False  # whether `_gossip_step` needs this rank's gradient as one vector (DeTAG's tracker)

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
            grads = [p.grad for p in params if p.grad is not None]
            grads_finite = all_finite(grads)
            index_of = self.flat.index_of
            indices = [index_of[id(p)] for p in params]
            if not grads_finite and self.grad_scale is None:
                self._announce_nonfinite(indices, "gradients")
            scale = float(self.grad_scale()) if self.grad_scale is not None else 1.0
            needed = grads_finite and self.gossips_gradients  # D-PSGD steps on the gradients as they are: no copy
            gradient = flat_gradients(params, scale, self.gossip_dtype) if needed else None
            sent_before = self.comm.stats.bytes_sent
            with torch.no_grad(), phase("gossip"):
                direction = self._gossip_step(optimizer, indices, gradient)
                if direction is not None and grads_finite:
                    # A parameter without a gradient here whose direction is exactly zero (no rank within reach ever
                    # had a gradient for it) keeps `grad=None`: the optimizer skips it, as it would without gossip.
                    write_gradients(params, direction, scale, skip=reached_nothing(params, direction))
            self.comm.stats.exchanges += 1  # one per optimizer step, wherever its gossip happens
            self.comm.stats.exchange_bytes_sent += self.comm.stats.bytes_sent - sent_before

    def _gossip_step(self, optimizer: Optimizer, indices: list[int], gradient: Optional[Tensor]) -> Optional[Tensor]:
        """Mix this optimizer's parameters ``flat.params[i]`` (``i`` in ``indices``) with the neighbours'; return the
        direction the optimizer steps on (``None``: the gradients as they are). ``gradient`` is this rank's unscaled
        gradient as one vector where :attr:`gossips_gradients` asks for it, or ``None`` (also when it overflowed under
        AMP: the scaler then skips this rank's step)."""
        raise NotImplementedError

    def _round(self) -> None:
        """A check only (the flag collective ran before): gossip averages nothing over the world."""

    # ------------------------------------------------------------------ the neighbour exchange
    def _replica_vector(self, indices: list[int]) -> Tensor:
        """This optimizer's parameters as one float32 vector, then (once per step) the averaged buffers."""
        dtype = self.gossip_dtype
        parts = [flat_slices([p.data for p in self.flat.params], indices).to(dtype)]
        if self._buffers_gossiped_at != self.step:
            parts += [b.detach().reshape(-1).to(dtype) for b in self.averaged_buffers()]
        return torch.cat(parts)

    @property
    def gossip_dtype(self) -> torch.dtype:
        """What replicas are mixed in: float32, or the parameters' dtype where that is wider (float64)."""
        dtype = torch.float32
        for p in self.flat.params:
            dtype = torch.promote_types(dtype, p.dtype)
        return dtype

    def _write_replica(self, indices: list[int], vector: Tensor) -> None:
        numel = sum(self.flat.params[i].numel() for i in indices)
        write_slices([p.data for p in self.flat.params], indices, vector[:numel])
        if self._buffers_gossiped_at != self.step:
            offset = numel
            for buffer in self.averaged_buffers():
                buffer.copy_(vector[offset : offset + buffer.numel()].view_as(buffer))
                offset += buffer.numel()
            self._buffers_gossiped_at = self.step

    def _message_numel(self, indices: list[int]) -> int:
        """Elements of one gossip message for this optimizer (header aside): the replica and its buffers."""
        numel = sum(self.flat.params[i].numel() for i in indices)
        if self._buffers_gossiped_at != self.step:
            numel += sum(b.numel() for b in self.averaged_buffers())
        return numel

    def _announce_nonfinite(self, indices: list[int], what: str) -> None:
        """Tell the neighbours, in the round they are waiting in, that this rank holds inf/NaN ``what``; then raise."""
        vector = torch.zeros(self._message_numel(indices), dtype=self.gossip_dtype, device=self.flat.buckets[0].device)
        self._gossip_round(vector, announce=what)

    def _gossip_round(self, vector: Tensor, round_index: int = 0, announce: Optional[str] = None) -> Tensor:
        """One gossip round: ``sum_j W_ij v_j`` over this rank and its neighbours, checked before anything is mixed.
        ``announce``: this rank holds inf/NaN of that kind; the round only tells the neighbours, then raises."""
        assert self.topology is not None
        rank = self.comm.rank
        where = f"the gossip of step {self.step}"
        at = position(self.step, EXCHANGE) * ROUNDS_PER_STEP + round_index
        finite = announce is None and bool(torch.isfinite(vector).all())
        peers = self.topology.neighbours(rank)
        # A non-finite replica is announced, not sent: the neighbours stop naming this rank, with nothing mixed in.
        header = _header(finite, at).to(device=vector.device, dtype=vector.dtype)
        message = torch.cat([header, vector if finite else torch.zeros_like(vector)])
        received = self.comm.neighbour_exchange_(message, self.topology.phases(rank))
        if not finite:
            raise nonfinite_error(self.label, where, announce or "parameters", [rank], self.step)
        for peer in peers:
            theirs = received[peer]
            their_finite, their_at = _read_header(theirs)
            if not their_finite:
                raise NonFiniteError(
                    f"{self.label}: neighbour rank {peer} sent inf/NaN at {where}; nothing it sent was mixed into "
                    f"rank {rank}'s model.",
                    [peer],
                    self.step,
                )
            if their_at != at:
                raise OutOfStepError(
                    f"{self.label}: rank {rank} is at {_describe(at)} and its neighbour rank {peer} at "
                    f"{_describe(their_at)}. Their data or control flow differ: give every rank the same number of "
                    "batches and take optimizer steps on all ranks alike. Nothing was mixed."
                )
        # x_i + sum_j W_ij (x_j - x_i): W's rows sum to 1, so this is sum_j W_ij x_j, and it is exact where the
        # neighbours hold what this rank holds: a parameter no rank trains (identical everywhere) stays bit for bit.
        mixed = vector.clone()
        for peer, weight in peers.items():  # ascending peer order: deterministic sums
            mixed.add_(received[peer][_HEADER:] - vector, alpha=weight)
        return mixed

    # ------------------------------------------------------------------ consensus distance
    def enter_consensus(self) -> None:
        super().enter_consensus()
        if self._local_backup is not None:
            own = torch.cat([b.reshape(-1).float() for b in self._local_backup[0]])
            mean = torch.cat([b.reshape(-1).float() for b in self.flat.buckets])
            squared = torch.tensor([float((own - mean).pow(2).sum())], dtype=torch.float64, device=mean.device)
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
