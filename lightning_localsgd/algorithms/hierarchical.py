"""Hierarchical Local SGD: average often within a node, rarely across nodes.

Paper: "Don't Use Large Mini-Batches, Use Local SGD" (Lin, Stich, Patel, Jaggi, ICLR 2020, arXiv 1808.07217), its
hierarchical Local SGD; torch's ``HierarchicalModelAverager`` has the same two-level shape.

Update rule, per rank i on node n (L ranks per node, ranks node-major as the launchers number them):
    x_i <- inner optimizer step                               every step
    x_i <- mean_{j on node n} x_j                             every ``intra_period`` steps (the fast local link)
    x_i <- mean_j x_j                                         every ``inter_period`` steps (a multiple of intra)
The global average crosses the slow link once per node: after the node average every rank of the node holds the
same model, so local rank l all-reduces only the l-th 1/L of each bucket with the rank l of every other node, and
the node all-gathers the pieces. Inter-node bytes per node are one model's worth per global round
(``comm/inter_node_mb_sent``), against L for a flat all-reduce from every rank. Normalisation statistics follow the
same two levels.
"""

from __future__ import annotations

from datetime import timedelta
from typing import Any, Optional

import torch
from torch import Tensor

from lightning_localsgd._validation import check_int
from lightning_localsgd.algorithms.averaging import mean_, mean_packed_
from lightning_localsgd.algorithms.buffers import BufferSelection
from lightning_localsgd.algorithms.periodic import PeriodicAlgorithm
from lightning_localsgd.comm import Communicator
from lightning_localsgd.comm.flat import DEFAULT_BUCKET_CAP_MB
from lightning_localsgd.comm.layout import WorldLayout, node_communicators


class HierarchicalLocalSGD(PeriodicAlgorithm):
    """Two-level Local SGD (see the module docstring). Call :meth:`create_groups` (process groups) or
    :meth:`set_node_groups` (any communicators) before :meth:`setup`.

    Args:
        intra_period: steps between averages within a node.
        inter_period: steps between averages over every rank (a multiple of ``intra_period``).
        warmup_steps, bucket_cap_mb, buffers: as :class:`PeriodicAlgorithm`.
    """

    sharding_refused_because = (
        "replica groups are its node level already: FSDP2 inside a node is the synchronous inner level, so use "
        "local_sgd (or diloco) with `shard_size` = the ranks per node instead"
    )

    def __init__(
        self,
        intra_period: int = 4,
        inter_period: int = 32,
        warmup_steps: int = 0,
        bucket_cap_mb: float = DEFAULT_BUCKET_CAP_MB,
        buffers: BufferSelection = None,
    ) -> None:
        check_int("intra_period", intra_period, 1)
        check_int("inter_period", inter_period, 1)
        if inter_period % intra_period:
            raise ValueError(
                f"`inter_period` must be a multiple of `intra_period` (every global average is also a node average), "
                f"got inter_period={inter_period} and intra_period={intra_period}."
            )
        super().__init__(intra_period, warmup_steps, False, bucket_cap_mb, buffers)
        self.inter_period = inter_period
        self.intra_comm: Optional[Communicator] = None  # this rank's node
        self.cross_comm: Optional[Communicator] = None  # this local rank on every node

    @property
    def intra_period(self) -> int:
        return self.period

    def create_groups(self, layout: WorldLayout, timeout: timedelta) -> None:
        self.set_node_groups(*node_communicators(layout, timeout, self.label))

    def set_node_groups(self, intra: Communicator, cross: Communicator) -> None:
        """The communicators of this rank's node and of its local rank across nodes."""
        self.intra_comm, self.cross_comm = intra, cross

    def _on_setup(self) -> None:
        if self.intra_comm is None or self.cross_comm is None:
            raise RuntimeError(f"{self.label}: call `set_node_groups(intra, cross)` before `setup`.")
        if self.intra_comm.world_size * self.cross_comm.world_size != self.comm.world_size:
            raise ValueError(
                f"{self.label}: {self.cross_comm.world_size} nodes of {self.intra_comm.world_size} ranks do not make "
                f"the world of {self.comm.world_size}: every node must run the same number of ranks."
            )

    def _round(self) -> None:
        assert self.intra_comm is not None and self.cross_comm is not None
        buckets, buffers = self.flat.buckets, self.averaged_buffers()
        global_round = (self.step - self.warmup_steps) % self.inter_period == 0  # step already counts this one
        mean_(buckets, self.intra_comm)
        mean_packed_(buffers, self.intra_comm)
        if global_round and self.cross_comm.world_size > 1:  # one node: the node average is the global one
            with torch.no_grad():
                for bucket in buckets:
                    self._cross_node_mean_(bucket)
                mean_packed_(buffers, self.cross_comm)  # small: every local rank sends them
        self.rounds_synchronise = global_round  # a node average leaves the nodes apart

    def _cross_node_mean_(self, bucket: Tensor) -> None:
        """The node-identical ``bucket`` becomes the mean over nodes: local rank l carries the l-th piece."""
        assert self.intra_comm is not None and self.cross_comm is not None
        local, ranks = self.intra_comm.rank, self.intra_comm.world_size
        if ranks == 1:  # one rank per node carries the whole bucket: no pieces to cut and gather
            mean_([bucket], self.cross_comm)
            return
        flat = bucket.view(-1)
        size = -(-flat.numel() // ranks)  # pieces of equal size (the last padded), so that they can be all-gathered
        padded = torch.zeros(size * ranks, dtype=torch.promote_types(flat.dtype, torch.float32), device=flat.device)
        padded[: flat.numel()] = flat
        piece = padded[local * size : (local + 1) * size].clone()
        mean_([piece], self.cross_comm)
        pieces = self.intra_comm.all_gather_(piece)
        flat.copy_(torch.cat(pieces)[: flat.numel()].to(flat.dtype))

    def _extra_state(self) -> dict[str, Any]:
        assert self.intra_comm is not None and self.cross_comm is not None
        return {"intra_stats": self.intra_comm.stats.state_dict(), "cross_stats": self.cross_comm.stats.state_dict()}

    def _load_extra_state(self, state: dict[str, Any]) -> None:
        assert self.intra_comm is not None and self.cross_comm is not None
        self.intra_comm.stats.load_state_dict(state.get("intra_stats", {}))
        self.cross_comm.stats.load_state_dict(state.get("cross_stats", {}))

    def metrics(self) -> dict[str, float]:
        if self.intra_comm is None or self.cross_comm is None:
            return {}
        return {
            "comm/intra_node_mb_sent": self.intra_comm.stats.bytes_sent / 1e6,
            "comm/inter_node_mb_sent": self.cross_comm.stats.bytes_sent / 1e6,
        }
