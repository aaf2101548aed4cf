"""D-PSGD: decentralised parallel SGD over a gossip topology.

Paper: "Can Decentralized Algorithms Outperform Centralized Algorithms? A Case Study for Decentralized Parallel
Stochastic Gradient Descent" (Lian et al., arXiv 1705.09056); as stated in "Optimal Complexity in Decentralized
Training" (Lu and De Sa, arXiv 2006.08085).

Update rule, per rank i and step (combine, then adapt), with ``g_i`` the gradient at this rank's replica ``x_i``:
    x_i <- sum_j W_ij x_j - lr * g_i
The mix ``sum_j W_ij x_j`` is one neighbour exchange of the replica (see :mod:`~lightning_localsgd.algorithms.gossip`);
the optimizer then steps from the mixed replica with ``g_i``, so momentum, weight decay or Adam act on the local
gradient as they would alone. With plain SGD this is the rule above exactly; with a fully connected ``W`` (one
gossip round is the exact mean) it is synchronous SGD.

On non-identical data each rank's fixed point is pulled towards its own optimum: D-PSGD stalls at a bias that grows
with the data's heterogeneity and ``lambda2`` (DeTAG's gradient tracking removes it).
"""

from __future__ import annotations

from typing import Optional

from torch import Tensor
from torch.optim import Optimizer

from lightning_localsgd.algorithms.gossip import GossipAlgorithm


class DPSGD(GossipAlgorithm):
    """D-PSGD: every step, mix the replica with the neighbours', then step on the local gradient.

    Args: as :class:`~lightning_localsgd.algorithms.gossip.GossipAlgorithm` (``topology``, ``check_every``,
    ``warmup_steps``, ``bucket_cap_mb``, ``buffers``).
    """

    def _gossip_step(self, optimizer: Optimizer, indices: list[int], gradient: Optional[Tensor]) -> Optional[Tensor]:
        mixed = self._gossip_round(self._replica_vector(indices))  # sum_j W_ij x_j
        self._write_replica(indices, mixed)
        return None  # the optimizer steps on this rank's own gradient
