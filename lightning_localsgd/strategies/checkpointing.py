"""Per-rank state in Lightning checkpoints: one shard per rank, written by that rank beside the main file.

Lightning writes its checkpoint from rank 0 only, but local-update algorithms keep state that differs per rank
(the local replica, optimizer momentum, VRL-SGD's Delta, RNG streams, ...). Gathering it to rank 0 would stage
world x state bytes there (tens of GB for a large model on many ranks), so each rank writes its own shard:

    <dir>/<name>                                        the main file: a normal Lightning checkpoint
    <dir>/<name>.shards/rank<r>-of-<N>.<token>.pt       one shard per rank

The main file's weights are the consensus, so ``MyModule.load_from_checkpoint(<dir>/<name>)`` works in a plain
process; its ``lightning_localsgd`` section holds only metadata: strategy, world size, a random token of this
save and the shards' paths relative to the main file's folder (so a main file renamed or linked within its
folder still finds them). The token is in every shard's name and content, so shards of an older save to the
same path are never taken for this save's.

A save: every rank writes its shard under a temporary name and renames it into place, the ranks agree that
every shard is in place, then rank 0 writes the main file and deletes the shards of older saves at that path;
a main file never exists without its shards. A main file written as ``<name>.partial`` and renamed to
``<name>`` once complete (as ``RoundCheckpoint`` does) names its shards after ``<name>``.
"""

from __future__ import annotations

import os
import random
import secrets
from typing import TYPE_CHECKING, Any, Callable, Optional

import torch
from fsspec.implementations.local import LocalFileSystem
from lightning.fabric.utilities.cloud_io import get_filesystem
from lightning.fabric.utilities.types import _PATH
from lightning.pytorch.utilities import rank_zero_warn
from lightning_utilities.core.apply_func import apply_to_collection
from torch import Tensor

if TYPE_CHECKING:
    from lightning_localsgd.comm import Communicator

CHECKPOINT_KEY = "lightning_localsgd"
PARTIAL_SUFFIX = ".partial"  # a main file being written; renamed to its final name once complete
SHARDS_SUFFIX = ".shards"
REPLICA_KEYS = ("param_buckets", "float_buffers")  # the replica, equal to the main file's weights when in sync
_TMP_SUFFIX = ".tmp"


def to_device(payload: Any, device: torch.device) -> Any:
    return apply_to_collection(payload, Tensor, lambda t: t.to(device))


# ---------------------------------------------------------------------- names
def final_path(main_path: _PATH) -> str:
    """The name a main file will carry once complete (``<name>.partial`` becomes ``<name>``)."""
    path = str(main_path)
    return path[: -len(PARTIAL_SUFFIX)] if path.endswith(PARTIAL_SUFFIX) else path


def shard_folder(main_path: _PATH) -> str:
    """The folder of a main file's shards: ``<name>.shards`` beside it.

    One folder per checkpoint, not files beside it: Lightning reads every name in ``default_root_dir`` that
    contains ``ckpt_`` as a SLURM checkpoint number, and the folder adds no digit to the main file's name.
    """
    return final_path(main_path) + SHARDS_SUFFIX


def shard_relpath(main_path: _PATH, rank: int, world_size: int, token: str) -> str:
    """A shard's path relative to the main file's folder, as stored in the main file."""
    return f"{os.path.basename(shard_folder(main_path))}/rank{rank}-of-{world_size}.{token}.pt"


def shard_paths(main_path: _PATH, section: dict[str, Any]) -> list[str]:
    """The shards a main file's section names, as paths."""
    folder = os.path.dirname(str(main_path))
    return [os.path.join(folder, *name.split("/")) for name in section["shards"]]


# ---------------------------------------------------------------------- writing
def without_replica_if_in_sync(algorithm_state: dict[str, Any]) -> dict[str, Any]:
    """Drop the replica when every rank holds the consensus: the main file's weights are then that replica."""
    if not algorithm_state.get("in_sync"):
        return algorithm_state
    return {key: value for key, value in algorithm_state.items() if key not in REPLICA_KEYS}


SHARED_FROM_RANK_0 = "shared_from_rank0"  # the keys a shard left to rank 0's (identical on every rank)


def without_shared_state(algorithm_state: dict[str, Any], keys: tuple[str, ...]) -> dict[str, Any]:
    """Leave out the state every rank holds alike (``keys``): rank 0's shard stores it for all."""
    left = [key for key in keys if key in algorithm_state]
    if not left:
        return algorithm_state
    kept = {key: value for key, value in algorithm_state.items() if key not in left}
    kept[SHARED_FROM_RANK_0] = left
    return kept


def rng_states() -> dict[str, Any]:
    """This process's random number generators: torch (CPU, CUDA if initialised), numpy if importable, python."""
    states: dict[str, Any] = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        states["cuda"] = torch.cuda.get_rng_state_all()
    try:
        import numpy as np
    except ImportError:
        pass
    else:
        states["numpy"] = np.random.get_state()
    return states


def restore_rng_states(states: dict[str, Any]) -> None:
    """Undo :func:`rng_states` (generators missing on either side are left alone)."""
    torch.set_rng_state(states["torch"])
    random.setstate(states["python"])
    if "cuda" in states and torch.cuda.is_available() and len(states["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(states["cuda"])
    if "numpy" in states:
        try:
            import numpy as np
        except ImportError:
            return
        np.random.set_state(states["numpy"])


def write_shards(comm: Communicator, payload: dict[str, Any], main_path: _PATH, strategy_name: str) -> dict[str, Any]:
    """Every rank writes its own shard of the checkpoint at ``main_path``; returns the main file's section.

    Collective: two small object all-gathers (the token and rank 0's path; then every rank's outcome, so a
    failed write stops every rank with the same error instead of leaving the others waiting).
    """
    token, main = comm.all_gather_object((secrets.token_hex(8), str(main_path)))[0]  # os entropy: no RNG draw
    names = [shard_relpath(main, rank, comm.world_size, token) for rank in range(comm.world_size)]
    shard = {
        "token": token,
        "rank": comm.rank,
        "world_size": comm.world_size,
        "strategy": strategy_name,
        **payload,
        "rng": rng_states(),
    }
    error: Optional[str] = None
    try:
        _write_atomically(shard, shard_paths(main, {"shards": names})[comm.rank])
    except Exception as exc:  # reported on every rank below
        error = f"{type(exc).__name__}: {exc}"
    failures = [(rank, e) for rank, e in enumerate(comm.all_gather_object(error)) if e is not None]
    if failures:
        raise RuntimeError(
            f"{strategy_name}: writing the per-rank checkpoint shards of {main!r} failed on "
            + "; ".join(f"rank {rank} ({e})" for rank, e in failures)
            + ". Check that every rank can write to the checkpoint folder (a filesystem shared by all ranks) "
            "and has space left; no main file was written for this save."
        )
    return {"strategy": strategy_name, "world_size": comm.world_size, "token": token, "shards": names}


def _write_atomically(payload: Any, path: str) -> None:
    fs = get_filesystem(path)
    fs.makedirs(os.path.dirname(path), exist_ok=True)
    temporary = path + _TMP_SUFFIX
    with fs.open(temporary, "wb") as handle:
        torch.save(payload, handle)
        if isinstance(fs, LocalFileSystem):
            handle.flush()
            os.fsync(handle.fileno())
    if isinstance(fs, LocalFileSystem):
        os.replace(temporary, path)
        descriptor = os.open(os.path.dirname(path), os.O_RDONLY)
        try:
            os.fsync(descriptor)  # the rename survives a power cut before rank 0 writes the main file
        finally:
            os.close(descriptor)
    else:
        fs.mv(temporary, path)


def remove_stale_shards(main_path: _PATH, token: str) -> None:
    """Delete the shards (and temporary files) of older saves at this path: those without ``token``."""
    folder = shard_folder(main_path)
    fs = get_filesystem(folder)
    if not fs.isdir(folder):
        return
    for entry in fs.ls(folder, detail=False):
        if f".{token}." not in os.path.basename(str(entry)):
            fs.rm(entry, recursive=True)


def remove_shards(main_path: _PATH) -> None:
    """Delete a main file's shard folder, if any (the main file itself is the caller's)."""
    folder = shard_folder(main_path)
    fs = get_filesystem(folder)
    if fs.isdir(folder):
        fs.rm(folder, recursive=True)


# ---------------------------------------------------------------------- reading
def load_main_section(main_path: _PATH) -> Optional[dict[str, Any]]:
    """The ``lightning_localsgd`` section of a main file (memory-mapped: tensors are not read), or None."""
    checkpoint = _load(str(main_path))
    return checkpoint.get(CHECKPOINT_KEY) if isinstance(checkpoint, dict) else None


def missing_shards(main_path: _PATH) -> list[str]:
    """The shards a main file names that are absent (none for a checkpoint without shards)."""
    section = load_main_section(main_path)
    if section is None or "shards" not in section:
        return []  # not written by a local-update strategy, weights only, or the old all-in-one format
    fs = get_filesystem(str(main_path))
    return [path for path in shard_paths(main_path, section) if not fs.isfile(path)]


def read_shards(main_path: _PATH) -> list[dict[str, Any]]:
    """Every rank's shard of a checkpoint, in rank order (for inspection; a resuming rank reads its own only), each
    with the state every rank holds alike filled in from rank 0's."""
    section = load_main_section(main_path)
    if section is None or "shards" not in section:
        raise ValueError(f"{str(main_path)!r} has no per-rank shards (section: {section!r}).")
    shards = [_load(path) for path in shard_paths(main_path, section)]
    return [_with_shared_state(shard, lambda: shards[0]) for shard in shards]


def read_rank_state(
    section: Optional[dict[str, Any]], main_path: _PATH, rank: int, world_size: int, strategy_name: str
) -> Optional[dict[str, Any]]:
    """This rank's state from the checkpoint at ``main_path`` (its shard), or None (with a warning) if the
    checkpoint was not written by this strategy at this world size."""
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
    if "ranks" in section:  # the format before shards: every rank's state inside the main file
        return section["ranks"][rank]
    paths = shard_paths(main_path, section)
    fs = get_filesystem(str(main_path))
    # Every rank checks every shard (a shared filesystem shows them all the same), so all ranks stop alike.
    absent = [path for path in paths if not fs.isfile(path)]
    if absent:
        raise FileNotFoundError(
            f"The checkpoint {str(main_path)!r} is incomplete: its per-rank shard(s) {absent} are missing. Copy "
            f"the folder {shard_folder(main_path)!r} along with the main file, or resume from another checkpoint "
            "(`RoundCheckpoint` and `ckpt_path='last'` skip incomplete ones)."
        )
    # What every rank holds alike comes from rank 0's shard (memory-mapped: only those tensors are read).
    return _with_shared_state(
        _checked_shard(paths, rank, section, main_path), lambda: _checked_shard(paths, 0, section, main_path)
    )


def _with_shared_state(state: dict[str, Any], rank_0: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    """``state`` with the algorithm state it left to rank 0's shard (``rank_0()``) filled in."""
    algorithm = state.get("algorithm")
    shared = algorithm.pop(SHARED_FROM_RANK_0, None) if isinstance(algorithm, dict) else None
    if shared:
        first = rank_0()["algorithm"]
        algorithm.update({key: first[key] for key in shared if key in first})
    return state


def _checked_shard(paths: list[str], rank: int, section: dict[str, Any], main_path: _PATH) -> dict[str, Any]:
    state = _load(paths[rank])
    if state.get("token") != section["token"] or state.get("rank") != rank:
        raise ValueError(
            f"The shard {paths[rank]!r} belongs to another save (token {state.get('token')!r}, rank "
            f"{state.get('rank')!r}) than the main file {str(main_path)!r} (token {section['token']!r}, rank {rank}). "
            "Resume from another checkpoint."
        )
    return state


def _load(path: str) -> Any:
    fs = get_filesystem(path)
    if isinstance(fs, LocalFileSystem):  # memory-mapped: tensors are paged in when used, not all read up front
        return torch.load(path, map_location="cpu", mmap=True, weights_only=False)
    with fs.open(path, "rb") as handle:
        return torch.load(handle, map_location="cpu", weights_only=False)
