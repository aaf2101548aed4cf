"""D-PSGD: decentralised parallel SGD over a gossip topology.

Paper: "Can Decentralized Algorithms Outperform Centralized Algorithms? A Case Study for Decentralized Parallel
Stochastic Gradient Descent" (Lian et al., arXiv 1705.09056); as stated in "Optimal Complexity in Decentralized
Training" (Lu and De Sa, arXiv 2006.08085).

Two orders of the same step, per rank i, ``g_i`` the gradient at this rank's replica ``x_i``, ``W`` the gossip matrix:

* ``"combine_then_adapt"`` (the papers' statement):  x_i <- sum_j W_ij x_j - lr * g_i
  the replica is mixed before the optimizer steps (gradients already taken at the unmixed ``x_i``);
* ``"adapt_then_combine"`` (default):                x_i <- sum_j W_ij (x_j - lr * g_j)
  the optimizer steps first and the stepped replicas are mixed. With a fully connected ``W`` (a gossip round is the
  exact mean) every replica is then the synchronous-SGD model at every step, for any optimizer whose update is
  linear in the gradient (SGD with momentum and weight decay): the check that the gossip is right. The other order
  keeps ``g_i`` unmixed, so even a fully connected ``W`` leaves the replicas ``lr * (g_i - mean g)`` apart.

Either way the mix is one neighbour exchange of the replica per step (see :mod:`~lightning_localsgd.algorithms.gossip`)
and the optimizer (momentum, weight decay, Adam) works on this rank's own gradient. On non-identical data each
rank's fixed point is pulled towards its own optimum: D-PSGD stalls at a bias that grows with the data's
heterogeneity and ``lambda2`` (DeTAG's gradient tracking removes it).
"""

from __future__ import annotations

from functools import partial
from typing import Optional

import torch
from torch import nn
from torch.optim import Optimizer

from lightning_localsgd._validation import check_choice
from lightning_localsgd.algorithms.buffers import BufferSelection
from lightning_localsgd.algorithms.gossip import GossipAlgorithm
from lightning_localsgd.algorithms.guard import failures_named
from lightning_localsgd.comm.flat import DEFAULT_BUCKET_CAP_MB

GOSSIP_ORDERS = ("adapt_then_combine", "combine_then_adapt")


class DPSGD(GossipAlgorithm):
    """D-PSGD: every step, mix the replica with the neighbours' and step on the local gradient (see the module
    docstring for the two orders).

    Args:
        topology, check_every, warmup_steps, bucket_cap_mb, buffers: as
            :class:`~lightning_localsgd.algorithms.gossip.GossipAlgorithm`.
        gossip_order: ``"adapt_then_combine"`` (default) or ``"combine_then_adapt"``.
    """

    def __init__(
        self,
        topology: str = "ring",
        check_every: int = 50,
        warmup_steps: int = 0,
        bucket_cap_mb: float = DEFAULT_BUCKET_CAP_MB,
        buffers: BufferSelection = None,
        gossip_order: str = "adapt_then_combine",
    ) -> None:
        self.gossip_order = check_choice("gossip_order", gossip_order, GOSSIP_ORDERS)
        super().__init__(topology, check_every, warmup_steps, bucket_cap_mb, buffers)

    def _gossip_step(
        self, optimizer: Optimizer, params: list[nn.Parameter], indices: list[int], scale: Optional[float]
    ) -> None:
        if self.gossip_order == "combine_then_adapt":
            self._mix(indices)
        # the optimizer steps on this rank's own gradient

    def after_optimizer_step(self, optimizer: Optimizer) -> None:
        if self.gossip_order != "adapt_then_combine" or self.in_warmup():
            return
        with failures_named(self.label, f"the gossip of step {self.step}", self.timeout):
            index_of = self.flat.index_of
            indices = [index_of[id(p)] for p in self._managed_params_of(optimizer)]
            if indices:
                sent_before = self.comm.stats.bytes_sent
                self._mix(indices)
                self.comm.stats.exchange_bytes_sent += self.comm.stats.bytes_sent - sent_before

    def _mix(self, indices: list[int]) -> None:
        """x_i <- sum_j W_ij x_j for this optimizer's parameters (and, once per step, the averaged buffers), chunk by
        chunk, each chunk written back into them before the next is read."""
        message = self._message(indices)
        writer = self._write_back(message)
        with torch.no_grad():
            targets = partial(self._direct_targets, message)  # the mix writes the replica itself where it can
            self._stream(message, self._fill(message), writer.write, targets=targets)
        writer.finish()
