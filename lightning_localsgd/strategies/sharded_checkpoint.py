"""The consensus weights of a sharded run (``shard_size > 1``) in a checkpoint, written by every rank.

With replica groups no rank holds the whole model, so the main file cannot carry the weights. They go, as the
``DTensor`` s of the module's state dict, through ``torch.distributed.checkpoint`` (DCP) into a folder beside the
per-rank shards: each rank writes its part, and the parts every group holds alike (the consensus) are written once.

    <dir>/<name>                                        the main file: Lightning's checkpoint without the weights
    <dir>/<name>.shards/model.<token>.dcp/              the consensus weights (DCP)
    <dir>/<name>.shards/rank<r>-of-<N>.<token>.pt       each rank's own state, as for unsharded runs

:func:`consolidate_checkpoint` turns such a checkpoint into a plain one in one process (no process group), for
inference or ``MyModule.load_from_checkpoint``.
"""

from __future__ import annotations

import os
from typing import Any

import torch
from lightning.fabric.utilities.types import _PATH
from torch import nn

from lightning_localsgd.strategies.checkpointing import CHECKPOINT_KEY, final_path, shard_folder

MODEL_KEY = "model"  # the section's entry naming the DCP folder, relative to the main file's folder
PER_RANK_KEY = "per_rank_keys"  # the section's entry naming the main file's keys whose state is in the rank shards


def model_relpath(main_path: _PATH, token: str) -> str:
    return f"{os.path.basename(shard_folder(main_path))}/model.{token}.dcp"


def model_path(main_path: _PATH, section: dict[str, Any]) -> str:
    return os.path.join(os.path.dirname(str(main_path)), *section[MODEL_KEY].split("/"))


def save_consensus(state_dicts: dict[str, dict[str, Any]], main_path: _PATH, token: str) -> str:
    """Write modules' (consensus) state dicts, by the checkpoint key each goes under (the Trainer's
    ``"state_dict"``, Fabric's user keys), with DCP; collective over the world. Returns the section entry."""
    import torch.distributed.checkpoint as dcp

    relative = model_relpath(final_path(main_path), token)
    folder = os.path.join(os.path.dirname(final_path(main_path)), *relative.split("/"))
    dcp.save(state_dicts, checkpoint_id=folder)
    return relative


def load_consensus_into(modules: dict[str, nn.Module], main_path: _PATH, section: dict[str, Any]) -> None:
    """Read the consensus weights into ``modules`` (by checkpoint key) in place, sharded (``DTensor`` parameters) or
    whole."""
    import torch.distributed.checkpoint as dcp

    folder = model_path(main_path, section)
    if not os.path.isdir(folder):
        raise FileNotFoundError(
            f"The checkpoint {str(main_path)!r} is incomplete: its weights folder {folder!r} is missing. Copy the "
            f"folder {shard_folder(main_path)!r} along with the main file."
        )
    targets = {key: module.state_dict() for key, module in modules.items()}
    distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
    dcp.load(targets, checkpoint_id=folder, no_dist=not distributed)
    for key, module in modules.items():
        module.load_state_dict(targets[key])  # a no-op for tensors DCP filled in place; needed for any it replaced


def consolidate_checkpoint(main_path: _PATH, output_path: _PATH) -> None:
    """Write ``output_path``: the checkpoint at ``main_path`` (written with ``shard_size > 1``) as a plain one, the
    consensus weights in full (under ``state_dict`` for the Trainer's, under the model's own key for ``fabric.save``)
    and without per-rank state. One process, no process group; needs the memory of one whole model.

    Then ``MyModule.load_from_checkpoint(output_path)`` (or ``torch.load(output_path)["state_dict"]``) as usual.
    """
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    checkpoint = torch.load(str(main_path), map_location="cpu", weights_only=False)
    section = checkpoint.pop(CHECKPOINT_KEY, None)
    if not isinstance(section, dict) or MODEL_KEY not in section:
        raise ValueError(f"{str(main_path)!r} was not written by a run with `shard_size` > 1: nothing to consolidate.")
    staged = str(output_path) + ".weights.tmp"
    dcp_to_torch_save(model_path(main_path, section), staged)
    try:
        weights = torch.load(staged, map_location="cpu", weights_only=False)
    finally:
        os.remove(staged)
    checkpoint.update(weights)
    checkpoint.pop("optimizer_states", None)  # per rank and per shard: meaningless for one whole model
    for key in section.get(PER_RANK_KEY, ()):
        checkpoint.pop(key, None)  # Fabric's optimizers: their states are in the rank shards
    torch.save(checkpoint, str(output_path))
