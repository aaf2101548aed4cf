"""Per-rank state in Lightning checkpoints.

Lightning writes checkpoints from rank 0 only, but local-update algorithms keep state that differs per rank
(the local replica, momentum buffers, VRL-SGD's Delta, ...). At save time every rank's state is gathered to
rank 0 and stored under one key; at load time each rank picks its own entry.
"""

from __future__ import annotations

from typing import Any, Optional

import torch
from lightning.pytorch.utilities import rank_zero_warn
from lightning_utilities.core.apply_func import apply_to_collection
from torch import Tensor

CHECKPOINT_KEY = "lightning_localsgd"


def to_cpu(payload: Any) -> Any:
    return apply_to_collection(payload, Tensor, lambda t: t.detach().cpu())


def rank_section(rank_states: list[Any], strategy_name: str) -> dict[str, Any]:
    return {"strategy": strategy_name, "world_size": len(rank_states), "ranks": rank_states}


def pick_rank_state(section: Optional[dict[str, Any]], rank: int, world_size: int, strategy_name: str) -> Optional[Any]:
    """This rank's entry of a checkpoint's per-rank section, or None (with a warning) if it cannot be used."""
    if section is None:
        rank_zero_warn(
            f"The checkpoint has no per-rank `{CHECKPOINT_KEY}` state (it was not written by this strategy, or with "
            "`weights_only=True`): every rank resumes from the averaged weights with fresh algorithm state."
        )
        return None
    if section["strategy"] != strategy_name or section["world_size"] != world_size:
        rank_zero_warn(
            f"The checkpoint's per-rank state was written by {section['strategy']!r} with {section['world_size']} "
            f"ranks; this run is {strategy_name!r} with {world_size}. Every rank resumes from the averaged weights "
            "with fresh algorithm state, so the run will not match an uninterrupted one."
        )
        return None
    return section["ranks"][rank]


def to_device(payload: Any, device: torch.device) -> Any:
    return apply_to_collection(payload, Tensor, lambda t: t.to(device))
