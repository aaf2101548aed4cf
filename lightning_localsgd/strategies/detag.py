"""``Trainer(strategy="detag")``: DeTAG, gradient tracking with accelerated gossip, no all-reduce."""

from __future__ import annotations

from typing import Any, Union

from lightning_localsgd.algorithms import DeTAG
from lightning_localsgd.algorithms.buffers import BufferSelection
from lightning_localsgd.comm.flat import DEFAULT_BUCKET_CAP_MB
from lightning_localsgd.strategies.base import LocalUpdateStrategy


class DeTAGStrategy(LocalUpdateStrategy):
    """DeTAG (Lu and De Sa, arXiv 2006.08085): decentralised training whose gradient tracker carries every rank's
    gradient around the topology, so that on non-identical data it reaches the optimum D-PSGD misses.

    The paper's discrete mini-batch of R batches per phase is Lightning's ``accumulate_grad_batches=R``: each
    optimizer step is one phase, with ``gossip_rounds`` neighbour rounds.

    Args:
        topology: ``"ring"`` (default), ``"torus"`` (the ring, with a warning, at a prime N or N = 4, where the
            grid would mix worse), ``"exponential"`` or ``"fully_connected"``.
        gossip_rounds: neighbour rounds per step (R of the accelerated gossip, 1 to 64). Each round sends the
            replica and the tracker (2 copies of the model) to every neighbour.
        acceleration: ``"auto"`` (eta from the topology's lambda2; plain gossip where the accelerated operator would
            not contract, with a warning) or eta in [0, 1) (0: plain gossip).
        check_every, warmup_steps, bucket_cap_mb, buffers: as :class:`DPSGDStrategy`.
        **kwargs: :class:`LocalUpdateStrategy` / :class:`~lightning.pytorch.strategies.DDPStrategy` arguments
            (``on_nonfinite`` accepts ``"raise"`` only).
    """

    strategy_names = ("detag",)

    def __init__(
        self,
        topology: str = "ring",
        gossip_rounds: int = 1,
        acceleration: Union[float, str] = "auto",
        check_every: int = 50,
        warmup_steps: int = 0,
        bucket_cap_mb: float = DEFAULT_BUCKET_CAP_MB,
        buffers: BufferSelection = None,
        **kwargs: Any,
    ) -> None:
        algorithm = DeTAG(topology, gossip_rounds, acceleration, check_every, warmup_steps, bucket_cap_mb, buffers)
        super().__init__(algorithm, **kwargs)
