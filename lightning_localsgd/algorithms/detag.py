"""DeTAG: decentralised training with gradient tracking and accelerated gossip.

Paper: "Optimal Complexity in Decentralized Training" (Lu and De Sa, ICML 2021, arXiv 2006.08085).

One phase per optimizer step, per rank i (``x`` the replica, ``y`` the gradient tracker, ``g`` this rank's gradient):
    discrete mini-batch   g_new = the gradient at fixed x_i over the step's batches (Lightning's
                          ``accumulate_grad_batches = R`` gives the paper's R; one batch otherwise)
    tracking              y_i <- y_i + g_new - g_old;  g_old <- g_new      (y and g_old start at 0: y_0 = g_0)
    accelerated gossip    AG_R on x and y together, R neighbour rounds:
                          z(0) = z(-1) = z,   z(r+1) = (1 + eta) W z(r) - eta z(r-1)
    step                  x_i <- AG_R(x)_i - lr * AG_R(y)_i;   y_i <- AG_R(y)_i
The optimizer does the step: the replica becomes ``AG_R(x)_i`` and the gradient ``AG_R(y)_i``, so plain SGD is the
rule above exactly (momentum or Adam act on the tracked direction). This is the order of gradient tracking in which
the newest gradient enters ``y`` before it is gossiped (no phase of delay); the invariant either way is
``mean_i y_i = mean_i g_i`` after every step, because W is doubly stochastic and the acceleration's coefficients sum
to 1, so AG_R keeps every mean.

``eta = (1 - sqrt(1 - lambda2^2)) / (1 + sqrt(1 - lambda2^2))`` (Chebyshev-style momentum on the gossip). With few
rounds it can *expand* disagreement: on a 16-rank ring with R = 1, the ring's eigenvalue -1/3 gives a factor above 1
and DeTAG diverges. :func:`gossip_contraction` measures the operator on W's spectrum; where the accelerated operator
is not contractive, ``acceleration="auto"`` falls back to plain gossip (eta = 0) with a warning, and an ``eta`` given
by hand is refused. The averaged normalisation buffers travel with ``x`` but are mixed by plain gossip (an
extrapolation could push a running variance below 0).
"""

from __future__ import annotations

import math
import warnings
from typing import Optional, Union

import torch
from torch import Tensor, nn
from torch.optim import Optimizer

from lightning_localsgd._validation import check_int
from lightning_localsgd.algorithms.buffers import BufferSelection
from lightning_localsgd.algorithms.chunks import Chunk, ChunkWriter, gather_chunk, gradient_of
from lightning_localsgd.algorithms.gossip import GossipAlgorithm
from lightning_localsgd.algorithms.gossip_message import (
    ROUNDS_PER_STEP,
    Output,
    gather_chunk_checked,
    offset_of,
    shifted,
)
from lightning_localsgd.algorithms.gossip_native import kernels_for
from lightning_localsgd.algorithms.rank_state import StateInit
from lightning_localsgd.comm.flat import DEFAULT_BUCKET_CAP_MB
from lightning_localsgd.comm.topology import Topology
from lightning_localsgd.native.build import is_plain_cpu_float32


def accelerated_gossip_coefficient(lambda2: float) -> float:
    """``eta = (1 - sqrt(1 - lambda2^2)) / (1 + sqrt(1 - lambda2^2))``; 0 for an exact mixer (lambda2 = 0)."""
    root = math.sqrt(max(0.0, 1.0 - lambda2 * lambda2))
    return (1.0 - root) / (1.0 + root)


def gossip_polynomial(eigenvalue: Tensor, rounds: int, eta: float) -> Tensor:
    """What R accelerated rounds do along an eigenvector of W: p(-1) = p(0) = 1,
    p(r+1) = (1 + eta) lambda p(r) - eta p(r-1)."""
    previous = torch.ones_like(eigenvalue)
    current = torch.ones_like(eigenvalue)
    for _ in range(rounds):
        previous, current = current, (1 + eta) * eigenvalue * current - eta * previous
    return current


def gossip_contraction(topology: Topology, rounds: int, eta: float) -> float:
    """The factor by which R accelerated rounds shrink the worst disagreement (largest |p_R| off the consensus
    direction): below 1 is contractive."""
    eigenvalues = topology.eigenvalues()
    if eigenvalues.numel() < 2:
        return 0.0
    off_consensus = eigenvalues[:-1]  # ascending: the last is the consensus direction's 1
    return float(gossip_polynomial(off_consensus, rounds, eta).abs().max())


class DeTAG(GossipAlgorithm):
    """DeTAG: gradient tracking with accelerated gossip (see the module docstring).

    Args:
        topology: ``"ring"`` (default), ``"torus"``, ``"exponential"`` or ``"fully_connected"``.
        gossip_rounds: R, neighbour rounds per step (at most 64). More rounds bring the replicas closer at R times
            the bytes; at 2 to 8 ranks one round is usually best.
        acceleration: ``"auto"`` (eta from lambda2, plain gossip where that would not contract), or eta itself
            (a float in [0, 1); 0 turns acceleration off).
        check_every, warmup_steps, bucket_cap_mb, buffers: as
            :class:`~lightning_localsgd.algorithms.gossip.GossipAlgorithm`.
    """

    def __init__(
        self,
        topology: str = "ring",
        gossip_rounds: int = 1,
        acceleration: Union[float, str] = "auto",
        check_every: int = 50,
        warmup_steps: int = 0,
        bucket_cap_mb: float = DEFAULT_BUCKET_CAP_MB,
        buffers: BufferSelection = None,
    ) -> None:
        self.gossip_rounds = check_int("gossip_rounds", gossip_rounds, 1)
        if gossip_rounds > ROUNDS_PER_STEP:
            raise ValueError(f"`gossip_rounds` must be at most {ROUNDS_PER_STEP}, got {gossip_rounds}.")
        if acceleration != "auto" and not (
            isinstance(acceleration, (int, float)) and not isinstance(acceleration, bool) and 0 <= acceleration < 1
        ):
            raise ValueError(f"`acceleration` must be 'auto' or a number in [0, 1), got {acceleration!r}.")
        self.acceleration = acceleration
        self.eta = 0.0  # set for the topology at set-up
        super().__init__(topology, check_every, warmup_steps, bucket_cap_mb, buffers)

    def _on_setup(self) -> None:
        super()._on_setup()
        assert self.topology is not None
        self.eta = choose_eta(self.topology, self.gossip_rounds, self.acceleration)

    def _declare_state_buffers(self) -> dict[str, StateInit]:
        return {"tracker": "zeros", "last_gradient": "zeros"}

    @property
    def tracker(self) -> list[Tensor]:
        """y, in the flat bucket layout of the parameters (float32)."""
        return self.state_buckets("tracker")

    def _carried(self, indices: list[int]) -> list[Tensor]:
        tracker = self.state_views("tracker")
        return [tracker[i] for i in indices]  # y travels with x

    def _gossip_step(
        self, optimizer: Optimizer, params: list[nn.Parameter], indices: list[int], scale: Optional[float]
    ) -> None:
        message = self._message(indices, self._carried(indices))
        last = self.state_views("last_gradient")
        replica = self._write_back(message)  # x, the buffers and y <- AG_R(y)
        direction = DirectionWriter(params, scale) if scale is not None else None  # the optimizer steps on AG_R(y)
        grads = [p.grad for p in params]  # read before a chunk's direction creates a missing one
        lasts = [last[i] for i in indices]
        trackers = message.segments[message.first_carried :]
        last_writer = ChunkWriter(lasts.__getitem__)  # g_old <- g_new (a strided view is written at the end)

        def fill(chunk: Chunk, values: Tensor) -> Optional[bool]:
            at = offset_of(chunk, message.first_carried)
            part = shifted(chunk, at, message.first_carried)
            tracked = self._track_in_one_pass(part, values[at:], trackers, grads, lasts) if scale == 1.0 else None
            if tracked is not None:  # y came straight from the tracker: the rest is x and the buffers
                gathered = gather_chunk_checked(chunk.part(0, at), message.segments, values)
                return None if gathered is None else gathered and tracked
            gather_chunk(chunk, message.segments, values)  # x, the buffers, and y as it was
            if scale is not None:  # an overflowed AMP gradient stays out of the tracker
                self._track(part, values[at:], grads, lasts, last_writer, scale)
            return None

        def consume(chunk: Chunk, values: Tensor) -> None:
            replica.write(chunk, values)
            if direction is not None:
                at = offset_of(chunk, message.first_carried)
                direction.write(shifted(chunk, at, message.first_carried), values[at:])

        def targets(chunk: Chunk) -> Optional[list[Output]]:
            """The replica and y <- AG_R(y) written by the mix itself, and the direction beside y: where every piece
            is CPU float32 in one flat view and the direction needs no scaling (or missing-gradient accounting)."""
            outputs = self._direct_targets(message, chunk) if scale == 1.0 else None
            if outputs is None:
                return None
            directions = []
            for piece, (at, length, out, _) in zip(chunk.pieces, outputs):
                if piece.index < message.first_carried:
                    directions.append((at, length, out, None))
                    continue
                grad = grads[piece.index - message.first_carried]
                if grad is None or not is_plain_cpu_float32(grad):
                    return None
                directions.append((at, length, out, grad.view(-1)[piece.start : piece.start + length]))
            return directions

        self._stream(message, fill, consume, self.gossip_rounds, self.eta, targets)
        last_writer.finish()
        replica.finish()
        if direction is not None:
            direction.finish()

    @staticmethod
    def _track_in_one_pass(
        part: Chunk, out: Tensor, trackers: list[Tensor], grads: list[Optional[Tensor]], last: list[Tensor]
    ) -> Optional[bool]:
        """``out = (y + g_new) - g_old`` from the tracker's own memory and ``g_old <- g_new``, a pass per piece through
        the kernels (the bits of :meth:`_track`'s torch path); whether ``out`` is all finite. None, with nothing
        written, where a piece is not CPU float32 in one flat view (or a gradient is missing)."""
        kernels = kernels_for(out)
        operands = []
        for piece in part.pieces:
            y, grad, old = trackers[piece.index], grads[piece.index], last[piece.index]
            if kernels is None or grad is None or not all(is_plain_cpu_float32(t) for t in (y, grad, old)):
                return None
            window = slice(piece.start, piece.start + piece.length)
            destination = out[piece.at : piece.at + piece.length]
            operands.append((y.view(-1)[window], grad.view(-1)[window], old.view(-1)[window], destination))
        finite = True
        for y, g, old, destination in operands:
            finite = kernels.track(y, g, old, destination, old) and finite
        return finite

    def _track(
        self,
        part: Chunk,
        y: Tensor,
        grads: list[Optional[Tensor]],
        last: list[Tensor],
        last_writer: ChunkWriter,
        scale: float,
    ) -> None:
        """``y <- y + g_new - g_old`` on one chunk's tracker elements, and ``g_old <- g_new`` there."""
        g = gather_chunk(part, grads, self._message_buffer("spare", part)[: part.numel])  # the spare is free now
        if scale != 1.0:
            g.div_(scale)
        # Its own buffer: the receive buffers may be in flight (the previous chunk's exchange).
        old = gather_chunk(part, last, self._work.get("tracking", part.numel, y.dtype, y.device))
        y.add_(g).sub_(old)
        last_writer.write(part, g)


class DirectionWriter:
    """Writes the tracked direction, chunk by chunk, into the parameters' ``.grad`` (times ``scale``, in each
    gradient's dtype). A parameter without a gradient whose direction is exactly zero (no rank within reach ever had
    a gradient for it) keeps ``grad=None``: the optimizer skips it, as it would without gossip."""

    def __init__(self, params: list[nn.Parameter], scale: float) -> None:
        self.params = params
        self.scale = scale
        self.missing = {i for i, p in enumerate(params) if p.grad is None}
        self._nonzero: dict[int, list[Tensor]] = {i: [] for i in self.missing}
        self._writer = ChunkWriter(gradient_of(params))

    def write(self, part: Chunk, direction: Tensor) -> None:
        """``direction`` (overwritten) holds ``part``'s elements, pieces numbered like ``params``."""
        for piece in part.pieces:
            if piece.index in self.missing:
                self._nonzero[piece.index].append(torch.count_nonzero(direction[piece.at : piece.at + piece.length]))
        if self.scale != 1.0:
            direction.mul_(self.scale)
        self._writer.write(part, direction)

    def finish(self) -> None:
        self._writer.finish()
        counted = [i for i, counts in self._nonzero.items() if counts]
        totals = torch.stack([torch.stack(self._nonzero[i]).sum() for i in counted]).tolist() if counted else []
        reached = {i for i, total in zip(counted, totals) if total > 0}  # one host sync
        for i in self.missing - reached:
            self.params[i].grad = None


def choose_eta(topology: Topology, rounds: int, acceleration: Union[str, float]) -> float:
    """The acceleration coefficient for ``topology`` and R rounds (see the module docstring)."""
    if acceleration != "auto":
        eta = float(acceleration)
        factor = gossip_contraction(topology, rounds, eta)
        if factor >= 1:
            raise ValueError(
                f"DeTAG: acceleration {eta:g} with {rounds} gossip round(s) on the {topology.name} topology of "
                f"{topology.size} ranks multiplies disagreement by {factor:.3f} per step (not contractive): training "
                "would diverge. Use acceleration='auto', a smaller value, or more `gossip_rounds`."
            )
        return eta
    eta = accelerated_gossip_coefficient(topology.lambda2)
    factor = gossip_contraction(topology, rounds, eta)
    if factor >= 1:
        warnings.warn(
            f"DeTAG: accelerated gossip (eta {eta:.3f} from lambda2 {topology.lambda2:.3f}) with {rounds} round(s) on "
            f"the {topology.name} topology of {topology.size} ranks would multiply disagreement by {factor:.3f} per "
            f"step; using plain gossip instead (factor {gossip_contraction(topology, rounds, 0.0):.3f}). More "
            "`gossip_rounds` make the acceleration pay.",
            stacklevel=2,
        )
        return 0.0
    return eta
