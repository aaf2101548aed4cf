"""VRL-SGD's control variate Delta_i, for any algorithm whose replicas drift between averages.

Paper: "Variance Reduced Local SGD with Lower Communication Complexity" (Liang et al., arXiv 1912.12844).

Right after every local optimizer step, ``x_i += lr * Delta_i`` per parameter group, at the rate the group stepped
with, so the correction lands on the final direction (after momentum and weight decay). At each average, from how
far the rank had drifted: ``Delta_i += (x_hat - x_i) / (sum of lr since the previous average)``, with ``x_i``
taken before averaging. Then ``sum_i Delta_i = 0`` (the mean model never feels the correction) and ``Delta_i``
approaches ``grad f_i - grad f``: the systematic gradient difference that non-identical data gives each rank.
It costs no communication. Used by VRL-SGD and by LIEC-SGD's ``variance_reduction`` option.

``Delta_i`` lives in a per-rank state buffer of the algorithm (float32 for half-precision parameters); this class
keeps the learning-rate sums of the current period, which belong in the checkpoint too.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Optional, Union

import torch
from torch import Tensor, nn

from lightning_localsgd.algorithms.param_groups import GroupKey, GroupMembers

Drifts = Union[Sequence[Tensor], Mapping[int, Tensor]]  # x_hat - x_i, indexed like FlatParameters.params


class ControlVariate:
    """The learning-rate bookkeeping and the two updates of a control variate ``Delta_i`` (see the module)."""

    def __init__(self) -> None:
        self.lr_sums: dict[GroupKey, float] = {}

    def reset(self) -> None:
        self.lr_sums = {}

    @torch.no_grad()
    def correct_(
        self, params: Sequence[nn.Parameter], deltas: Sequence[Tensor], groups: Iterable[GroupMembers]
    ) -> None:
        """``x_i += lr * Delta_i`` for every parameter of ``groups`` (right after their optimizer step)."""
        for members in groups:
            if not members.indices:
                continue
            lr = members.lr
            # In place: a half-precision x rounds once, Delta stays float32.
            torch._foreach_add_(
                [params[i].data for i in members.indices], [deltas[i] for i in members.indices], alpha=lr
            )
            self.lr_sums[members.key] = self.lr_sums.get(members.key, 0.0) + lr

    def take_sums(self, groups: Iterable[GroupMembers]) -> dict[GroupKey, float]:
        """The learning-rate sums of ``groups``, which start over (for :meth:`update_` applied piece by piece)."""
        return {members.key: self.lr_sums.pop(members.key, 0.0) for members in groups}

    @torch.no_grad()
    def update_(
        self,
        deltas: Sequence[Tensor],
        drifts: Drifts,
        groups: Iterable[GroupMembers],
        lr_sums: Optional[Mapping[GroupKey, float]] = None,
    ) -> None:
        """``Delta_i += (x_hat - x_i) / sum(lr)`` for ``groups``, whose sums then start over.

        A group whose rates summed to 0 did not move: its Delta stays. With ``drifts`` a mapping, parameters it
        leaves out (averaged without a gradient anywhere, LIEC-SGD; outside the bucket at hand) keep their Delta.
        ``lr_sums``: the sums taken by :meth:`take_sums`, for a round that updates Delta bucket by bucket.
        """
        for members in groups:
            lr_sum = self.lr_sums.pop(members.key, 0.0) if lr_sums is None else lr_sums.get(members.key, 0.0)
            indices = [i for i in members.indices if i in drifts] if isinstance(drifts, Mapping) else members.indices
            if lr_sum == 0.0 or not indices:
                continue
            torch._foreach_add_([deltas[i] for i in indices], [drifts[i] for i in indices], alpha=1.0 / lr_sum)

    def fingerprint(self) -> float:
        """One number that differs when two ranks' sums differ (for the round's flag collective)."""
        return sum((1 + a + 7 * b) * value for (a, b), value in sorted(self.lr_sums.items()))

    def state_dict(self) -> list[list[float]]:
        return [[key[0], key[1], value] for key, value in self.lr_sums.items()]

    def load_state_dict(self, state: Sequence[Sequence[float]]) -> None:
        self.lr_sums = {(int(a), int(b)): float(v) for a, b, v in state}
