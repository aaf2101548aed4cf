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
from torch import Tensor
from torch.optim import Optimizer

from lightning_localsgd._validation import check_int
from lightning_localsgd.algorithms.buffers import BufferSelection
from lightning_localsgd.algorithms.gossip import ROUNDS_PER_STEP, GossipAlgorithm
from lightning_localsgd.algorithms.gradient_exchange import flat_slices, write_slices
from lightning_localsgd.algorithms.rank_state import StateInit
from lightning_localsgd.comm.flat import DEFAULT_BUCKET_CAP_MB
from lightning_localsgd.comm.topology import Topology


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

    gossips_gradients = True

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

    def _message_numel(self, indices: list[int]) -> int:
        return super()._message_numel(indices) + sum(self.flat.params[i].numel() for i in indices)  # and y

    def _gossip_step(self, optimizer: Optimizer, indices: list[int], gradient: Optional[Tensor]) -> Optional[Tensor]:
        tracker, last = self.state_views("tracker"), self.state_views("last_gradient")
        y = flat_slices(tracker, indices).to(self.gossip_dtype)
        if gradient is not None:  # an overflowed AMP gradient stays out of the tracker
            y.add_(gradient).sub_(flat_slices(last, indices))  # y_i + g_new - g_old
            write_slices(last, indices, gradient)
        replica = self._replica_vector(indices)
        params_numel = y.numel()
        z = torch.cat([replica, y])
        previous, current = z, z
        for round_index in range(self.gossip_rounds):
            mixed = self._gossip_round(current, round_index)
            if self.eta:
                # (1 + eta) W z(r) - eta z(r-1), as W z(r) + eta (W z(r) - z(r-1)): exact where nothing changes
                following = mixed.add(mixed - previous, alpha=self.eta)
                following[params_numel : replica.numel()] = mixed[params_numel : replica.numel()]  # buffers: plain
            else:
                following = mixed
            previous, current = current, following
        self._write_replica(indices, current[: replica.numel()])
        tracked = current[replica.numel() :]
        write_slices(tracker, indices, tracked)
        return tracked  # the optimizer steps on AG_R(y)_i


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
