"""``Trainer(strategy="dpsgd")``: D-PSGD, each rank mixing its replica with its neighbours', no all-reduce."""

from __future__ import annotations

from typing import Any

from lightning_localsgd.algorithms import DPSGD
from lightning_localsgd.algorithms.buffers import BufferSelection
from lightning_localsgd.comm.flat import DEFAULT_BUCKET_CAP_MB
from lightning_localsgd.strategies.base import LocalUpdateStrategy


class DPSGDStrategy(LocalUpdateStrategy):
    """D-PSGD (Lian et al., arXiv 1705.09056): at every step each rank averages its replica with its neighbours' on a
    gossip topology, then steps on its own gradient. Bytes per step per rank depend on the number of neighbours, not
    on the number of ranks; no rank ever waits for the whole world during a step.

    Use it for many ranks on a slow or irregular network with data that is the same in distribution on every rank;
    on non-identical data prefer ``detag`` (gradient tracking removes D-PSGD's bias).

    Args:
        topology: ``"ring"`` (default: 2 neighbours), ``"torus"`` (4; the ring, with a warning, at a prime N or
            N = 4, where the grid would mix worse), ``"exponential"`` (about 2 log2 N) or ``"fully_connected"``
            (N - 1: synchronous SGD, for checking).
        check_every: steps between the guard's world checks (a few dozen bytes: finiteness, position, learning
            rates, SIGTERM / requeue agreement). Signals are acted on at the next check.
        warmup_steps: initial steps of synchronous SGD (all-reduced gradients).
        bucket_cap_mb: flat bucket size of the parameters (consensus averages are one collective per bucket); the
            gossip sends chunks of half this, two at a time.
        buffers: which module buffers are gossiped with the replicas (see :class:`LocalSGDStrategy`).
        gossip_order: ``"adapt_then_combine"`` (default: step, then mix the stepped replicas; with a fully connected
            topology this is synchronous SGD) or ``"combine_then_adapt"`` (mix, then step: the paper's statement).
        **kwargs: :class:`LocalUpdateStrategy` / :class:`~lightning.pytorch.strategies.DDPStrategy` arguments
            (``on_nonfinite`` accepts ``"raise"`` only: gossip has no round every replica agrees at).
    """

    strategy_names = ("dpsgd",)

    def __init__(
        self,
        topology: str = "ring",
        check_every: int = 50,
        warmup_steps: int = 0,
        bucket_cap_mb: float = DEFAULT_BUCKET_CAP_MB,
        buffers: BufferSelection = None,
        gossip_order: str = "adapt_then_combine",
        **kwargs: Any,
    ) -> None:
        algorithm = DPSGD(topology, check_every, warmup_steps, bucket_cap_mb, buffers, gossip_order)
        super().__init__(algorithm, **kwargs)
