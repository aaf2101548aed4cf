"""Which managed parameters each optimizer parameter group holds, and at which learning rate they stepped.

Algorithms that scale by the learning rate (VRL-SGD's sum of rates, Overlap Local-SGD's anchor momentum) need,
per parameter group, the indices of its parameters in :class:`~lightning_localsgd.comm.FlatParameters` and the
rate the group used at the step just taken. The map is rebuilt when the layout changes (re-bucketing after a
layer is unfrozen) or a group is added or resized (``BackboneFinetuning`` adds groups mid-fit).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from torch.optim import Optimizer

from lightning_localsgd.comm import FlatParameters

GroupKey = tuple[int, int]  # (optimizer index, parameter group index)


@dataclass
class GroupMembers:
    key: GroupKey
    group: dict[str, Any]
    indices: list[int]  # into FlatParameters.params

    @property
    def lr(self) -> float:
        return float(self.group["lr"])


class ParamGroupMap:
    """Per optimizer, its groups' managed parameter indices; cached until the layout or the groups change."""

    def __init__(self) -> None:
        self._key: Any = None
        self._by_optimizer: list[list[GroupMembers]] = []

    def build(self, optimizers: Sequence[Optimizer], flat: FlatParameters) -> list[list[GroupMembers]]:
        key = (
            id(flat),
            tuple((id(opt), tuple(len(g["params"]) for g in opt.param_groups)) for opt in optimizers),
        )
        if key != self._key:
            position = flat.index_of
            self._by_optimizer = [
                [
                    GroupMembers((o, g), group, [position[id(p)] for p in group["params"] if id(p) in position])
                    for g, group in enumerate(opt.param_groups)
                ]
                for o, opt in enumerate(optimizers)
            ]
            self._key = key
        return self._by_optimizer

    def groups_of(
        self, optimizer_index: int, optimizers: Sequence[Optimizer], flat: FlatParameters
    ) -> list[GroupMembers]:
        return self.build(optimizers, flat)[optimizer_index]

    def all_groups(self, optimizers: Sequence[Optimizer], flat: FlatParameters) -> list[GroupMembers]:
        return [members for per_optimizer in self.build(optimizers, flat) for members in per_optimizer]

    def unstepped_indices(self, optimizers: Sequence[Optimizer], flat: FlatParameters) -> list[int]:
        """Managed parameters no registered optimizer steps."""
        stepped = {i for members in self.all_groups(optimizers, flat) for i in members.indices}
        return [i for i in range(len(flat.params)) if i not in stepped]
