"""RoundCheckpoint: file naming, atomic completion, the newest complete checkpoint, pruning, arguments."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from lightning_localsgd import RoundCheckpoint
from lightning_localsgd.callbacks.round_checkpoint import hpc_checkpoint, newest_complete_checkpoint
from lightning_localsgd.strategies.checkpointing import CHECKPOINT_KEY, shard_relpath


def write(path, payload=None):
    torch.save(payload if payload is not None else {"x": torch.arange(1000)}, path)
    return path


def write_sharded(path, world=2, token="00112233aabbccdd"):
    """A main file naming ``world`` shards, and the shards, laid out as the strategies write them."""
    names = [shard_relpath(path, rank, world, token) for rank in range(world)]
    for rank, name in enumerate(names):
        (path.parent / name).parent.mkdir(exist_ok=True)
        torch.save({"token": token, "rank": rank}, path.parent / name)
    section = {"strategy": "LocalSGDStrategy", "world_size": world, "token": token, "shards": names}
    return write(path, {"x": torch.arange(10), CHECKPOINT_KEY: section})


def test_the_newest_complete_checkpoint_wins_over_newer_partial_or_truncated_files(tmp_path):
    write(tmp_path / "round-00000002-step-000000008.ckpt")
    good = write(tmp_path / "round-00000004-step-000000016.ckpt")
    truncated = write(tmp_path / "round-00000006-step-000000024.ckpt")
    truncated.write_bytes(truncated.read_bytes()[:100])  # e.g. a disk that filled up mid-copy
    write(tmp_path / "round-00000008-step-000000032.ckpt.partial")  # a save cut short by a crash
    (tmp_path / "notes.txt").write_text("not a checkpoint")
    assert newest_complete_checkpoint(tmp_path) == good


def test_rounds_order_numerically_not_by_modification_time(tmp_path):
    newer_round = write(tmp_path / "round-00000010-step-000000040.ckpt")
    write(tmp_path / "round-00000009-step-000000036.ckpt")  # written later (e.g. copied back)
    assert newest_complete_checkpoint(tmp_path) == newer_round


def test_no_checkpoint_means_none(tmp_path):
    assert newest_complete_checkpoint(tmp_path) is None
    assert newest_complete_checkpoint(tmp_path / "missing") is None


def test_pruning_keeps_the_newest(tmp_path):
    callback = RoundCheckpoint(dirpath=tmp_path, keep_last=2)
    for rounds in (1, 2, 3, 4):
        write(tmp_path / f"round-{rounds:08d}-step-{4 * rounds:09d}.ckpt")
    callback._prune(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "round-00000003-step-000000012.ckpt",
        "round-00000004-step-000000016.ckpt",
    ]


def test_a_checkpoint_with_a_missing_shard_is_skipped(tmp_path):
    good = write_sharded(tmp_path / "round-00000002-step-000000008.ckpt")
    lost = write_sharded(tmp_path / "round-00000004-step-000000016.ckpt")
    assert newest_complete_checkpoint(tmp_path) == lost
    next((tmp_path / (lost.name + ".shards")).glob("rank1-*")).unlink()  # e.g. not copied along
    assert newest_complete_checkpoint(tmp_path) == good


def test_a_hpc_checkpoint_with_a_missing_shard_is_skipped(tmp_path):
    trainer = SimpleNamespace(default_root_dir=tmp_path)
    older = write_sharded(tmp_path / "hpc_ckpt_1.ckpt")
    newer = write_sharded(tmp_path / "hpc_ckpt_2.ckpt")
    assert hpc_checkpoint(trainer) == newer
    next((tmp_path / "hpc_ckpt_2.ckpt.shards").glob("rank0-*")).unlink()
    assert hpc_checkpoint(trainer) == older


def test_pruning_removes_the_shards_of_the_checkpoints_it_deletes(tmp_path):
    callback = RoundCheckpoint(dirpath=tmp_path, keep_last=1)
    for rounds in (1, 2):
        write_sharded(tmp_path / f"round-{rounds:08d}-step-{4 * rounds:09d}.ckpt")
    callback._prune(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "round-00000002-step-000000008.ckpt",
        "round-00000002-step-000000008.ckpt.shards",
    ]
    assert newest_complete_checkpoint(tmp_path) == tmp_path / "round-00000002-step-000000008.ckpt"


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [({"every_n_rounds": 0}, "every_n_rounds"), ({"keep_last": 0}, "keep_last"), ({"every_n_rounds": 1.5}, "integer")],
)
def test_bad_arguments_are_rejected(kwargs, match):
    with pytest.raises(ValueError, match=match):
        RoundCheckpoint(**kwargs)


def test_warmup_steps_are_not_counted_as_rounds():
    from types import SimpleNamespace

    from lightning_localsgd import LocalSGDStrategy

    strategy = LocalSGDStrategy(period=2, warmup_steps=5)
    strategy.algorithm.schedule.step = 5  # the warm-up just ended: 5 synchronisations, no round yet
    strategy.algorithm.schedule.rounds = 0
    trainer = SimpleNamespace(strategy=strategy, global_step=5)
    assert RoundCheckpoint._rounds(trainer) == 0
    strategy.algorithm.schedule.rounds = 3
    assert RoundCheckpoint._rounds(trainer) == 3
