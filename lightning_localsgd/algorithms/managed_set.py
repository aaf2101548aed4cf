"""The managed parameter set follows ``requires_grad``: layers frozen or unfrozen mid-fit are re-bucketed.

``BackboneFinetuning`` (or a hook calling ``requires_grad_``) changes the trainable set during ``fit``. The set
is re-read at every synchronisation point; the ranks first agree that they changed alike (the trainable set's
fingerprint travels in the flag collective), then the buckets are rebuilt and the declared per-rank state
follows the parameters that stay.
"""

from __future__ import annotations

import zlib
from typing import TYPE_CHECKING

import torch
from torch import nn

from lightning_localsgd.algorithms.averaging import mean_packed_
from lightning_localsgd.comm import FlatParameters

if TYPE_CHECKING:
    from lightning_localsgd.algorithms.periodic import PeriodicAlgorithm


class ManagedSet:
    """The managed-set half of :class:`~lightning_localsgd.algorithms.periodic.PeriodicAlgorithm` (a mixin)."""

    def _managed_set_changed(self: PeriodicAlgorithm) -> bool:
        return [id(p) for p in self._trainable()] != [id(p) for p in self.flat.params]

    def _fingerprint(self: PeriodicAlgorithm) -> tuple[float, ...]:
        """Values every rank must share at a synchronisation point: learning rates and the trainable set."""
        lrs = [float(g["lr"]) for opt in self._optimizers for g in opt.param_groups if "lr" in g]
        lr_print = sum((k + 1) * lr for k, lr in enumerate(lrs)) + self._lr_state_fingerprint()
        positions = {id(p): i for i, p in enumerate(self.module.parameters())}
        indices = [positions.get(id(p), -1) for p in self._trainable()]
        return lr_print, float(zlib.crc32(repr(indices).encode()))

    def _lr_state_fingerprint(self) -> float:
        """Learning-rate state an algorithm accumulates (VRL-SGD's sums over the period)."""
        return 0.0

    def _follow_managed_set(self: PeriodicAlgorithm) -> None:
        """Re-bucket if parameters were frozen or unfrozen since the last synchronisation point (after `_agree`,
        so every rank is known to change alike)."""
        if self._local_backup is None and self._managed_set_changed():
            self._rebucket(self._trainable(), average_leaving=not self.in_sync)

    def _rebucket(self: PeriodicAlgorithm, params: list[nn.Parameter], average_leaving: bool) -> None:
        """Manage ``params`` from now on; declared state follows, new parameters' slices start afresh.

        Parameters leaving the set are averaged first when the replicas differ: frozen from now on, they must
        be the same on every rank. Parameters joining were frozen, hence already identical on every rank.
        """
        if not params:
            raise ValueError(f"{self.label}: every parameter was frozen; there is nothing left to average.")
        self._settle_in_flight()
        self._close_gradient_averagers()  # built over the old set
        old = self.flat
        leaving = [p for p in old.params if id(p) not in {id(q) for q in params}]
        if average_leaving and leaving:
            mean_packed_([p.data for p in leaving], self.comm)
        with torch.no_grad():
            for p in leaving if not old.in_place else ():  # in place, the buckets are the parameters' own memory
                p.data = p.data.clone()  # its own storage, so the old buckets can be freed
        self._flat = self._build_flat(params)
        self._relayout_state(old)
        self._on_relayout(old)
        self._rollback_point = None  # laid out for the old set; the next good round keeps a new one

    def _on_relayout(self, old: FlatParameters) -> None:
        """Undeclared per-parameter state follows the new layout (see :meth:`_rebucket`)."""
