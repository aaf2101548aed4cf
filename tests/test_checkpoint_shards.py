"""Per-rank checkpoint shards: naming, atomic writes, stale shards, reading back, RNG states, removal.

Ranks are simulated workers (threads) here; the 2- and 3-process runs through ``Trainer.fit`` are in
``test_lightning_e2e.py``.
"""

from __future__ import annotations

import random
import warnings

import numpy as np
import pytest
import torch

from lightning_localsgd.comm.simulated import run_simulated
from lightning_localsgd.strategies.checkpointing import (
    CHECKPOINT_KEY,
    PARTIAL_SUFFIX,
    missing_shards,
    read_rank_state,
    read_shards,
    remove_stale_shards,
    restore_rng_states,
    rng_states,
    shard_folder,
    without_replica_if_in_sync,
    write_shards,
)
from lightning_localsgd.strategies.local_sgd import LocalSGDStrategy

STRATEGY = "LocalSGDStrategy"


def payload(rank: int) -> dict:
    """A rank's state as the strategy hands it over: its own replica and momentum."""
    return {
        "algorithm": {"in_sync": False, "param_buckets": [torch.full((1000,), float(rank))]},
        "optimizer_states": [{"state": {0: {"momentum_buffer": torch.full((10,), 10.0 + rank)}}}],
        "grad_scaler": None,
    }


def save(main, world: int, write_main=True) -> dict:
    """Every rank writes its shard, then "rank 0" writes the main file, as ``LocalUpdateStrategy`` does."""
    sections = run_simulated(world, lambda rank, comm: write_shards(comm, payload(rank), main, STRATEGY))
    assert all(section == sections[0] for section in sections)  # every rank agrees on the token and names
    if write_main:
        torch.save({"state_dict": {"w": torch.zeros(3)}, CHECKPOINT_KEY: sections[0]}, main)
        remove_stale_shards(main, sections[0]["token"])
    return sections[0]


def test_each_rank_writes_its_own_shard_and_the_main_file_only_names_them(tmp_path):
    main = tmp_path / "step=6.ckpt"
    section = save(main, 3)
    token = section["token"]
    assert section == {
        "strategy": STRATEGY,
        "world_size": 3,
        "token": token,
        "shards": [f"step=6.ckpt.shards/rank{r}-of-3.{token}.pt" for r in range(3)],
    }
    assert sorted(p.name for p in (tmp_path / "step=6.ckpt.shards").iterdir()) == [
        f"rank{r}-of-3.{token}.pt" for r in range(3)
    ]  # no temporary file left
    for rank, shard in enumerate(read_shards(main)):
        assert (shard["rank"], shard["world_size"], shard["token"]) == (rank, 3, token)
        assert torch.equal(shard["algorithm"]["param_buckets"][0], torch.full((1000,), float(rank)))
        assert set(shard["rng"]) >= {"torch", "python", "numpy"}
    assert missing_shards(main) == []


def test_each_rank_reads_back_its_own_state(tmp_path):
    main = tmp_path / "a.ckpt"
    section = save(main, 2)
    for rank in range(2):
        state = read_rank_state(section, main, rank, 2, STRATEGY)
        assert state["optimizer_states"][0]["state"][0]["momentum_buffer"][0] == 10.0 + rank


def test_a_save_to_the_same_path_never_mixes_in_the_older_saves_shards(tmp_path):
    main = tmp_path / "last.ckpt"
    first = save(main, 2)
    # A second save to the same path that stops after the shards (before the main file): the first stays whole.
    second = save(main, 2, write_main=False)
    assert first["token"] != second["token"]
    assert read_rank_state(first, main, 1, 2, STRATEGY)["token"] == first["token"]
    # Once the second save's main file is in place, the first save's shards go.
    torch.save({CHECKPOINT_KEY: second}, main)
    remove_stale_shards(main, second["token"])
    assert sorted(p.name for p in (tmp_path / "last.ckpt.shards").iterdir()) == [
        f"rank{r}-of-2.{second['token']}.pt" for r in range(2)
    ]
    assert missing_shards(main) == []


def test_a_shard_of_another_save_under_the_expected_name_is_refused(tmp_path):
    main = tmp_path / "a.ckpt"
    section = save(main, 2)
    other = torch.load(tmp_path / section["shards"][0], weights_only=False)
    other["token"] = "0123456789abcdef"
    torch.save(other, tmp_path / section["shards"][0])
    with pytest.raises(ValueError, match="belongs to another save"):
        read_rank_state(section, main, 0, 2, STRATEGY)


def test_a_missing_shard_stops_every_rank_with_a_clear_error(tmp_path):
    main = tmp_path / "a.ckpt"
    section = save(main, 2)
    (tmp_path / section["shards"][1]).unlink()
    assert missing_shards(main) == [str(tmp_path / section["shards"][1])]
    for rank in range(2):  # rank 0's own shard is there, but it stops too: the ranks must not part ways
        with pytest.raises(FileNotFoundError, match=r"incomplete: its per-rank shard\(s\) .*rank1-of-2"):
            read_rank_state(section, main, rank, 2, STRATEGY)


def test_another_world_size_or_strategy_warns_and_resumes_fresh(tmp_path):
    main = tmp_path / "a.ckpt"
    section = save(main, 2)
    with pytest.warns(
        UserWarning, match="written by 'LocalSGDStrategy' with 2 ranks; this run is 'LocalSGDStrategy' with 3"
    ):
        assert read_rank_state(section, main, 0, 3, STRATEGY) is None
    with pytest.warns(UserWarning, match="this run is 'VRLSGDStrategy' with 2"):
        assert read_rank_state(section, main, 0, 2, "VRLSGDStrategy") is None
    with pytest.warns(UserWarning, match="no per-rank"):
        assert read_rank_state(None, main, 0, 2, STRATEGY) is None


def test_a_checkpoint_in_the_format_before_shards_still_resumes(tmp_path):
    old = {"strategy": STRATEGY, "world_size": 2, "ranks": [payload(0), payload(1)]}
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        state = read_rank_state(old, tmp_path / "missing.ckpt", 1, 2, STRATEGY)
    assert state["algorithm"]["param_buckets"][0][0] == 1.0


def test_a_failed_write_on_one_rank_stops_every_rank_before_any_main_file(tmp_path):
    main = tmp_path / "a.ckpt"

    def worker(rank, comm):
        state = payload(rank)
        if rank == 1:
            state["unpicklable"] = lambda: None  # torch.save fails on this rank only
        try:
            write_shards(comm, state, main, STRATEGY)
        except RuntimeError as error:
            return str(error)
        return None

    messages = run_simulated(2, worker)
    assert all(m is not None and "failed on rank 1" in m and "no main file was written" in m for m in messages)


def test_a_partial_main_file_names_its_shards_after_its_final_name(tmp_path):
    final = tmp_path / "round-00000004-step-000000016.ckpt"
    partial = final.with_name(final.name + PARTIAL_SUFFIX)
    assert shard_folder(partial) == shard_folder(final) == str(final) + ".shards"
    section = save(partial, 2)
    partial.rename(final)  # what RoundCheckpoint does once the main file is written
    assert missing_shards(final) == []
    assert read_rank_state(section, final, 1, 2, STRATEGY)["rank"] == 1


def test_no_replica_is_stored_when_the_replicas_agree():
    state = {"in_sync": True, "param_buckets": [torch.ones(2)], "float_buffers": [], "delta": [torch.ones(2)]}
    assert set(without_replica_if_in_sync(state)) == {"in_sync", "delta"}  # per-rank state stays
    state["in_sync"] = False
    assert without_replica_if_in_sync(state) is state


def test_rng_states_round_trip():
    states = rng_states()
    expected = (torch.rand(3), random.random(), np.random.rand())
    torch.rand(5), random.random(), np.random.rand()  # draws that the restore undoes
    restore_rng_states(states)
    assert torch.equal(torch.rand(3), expected[0])
    assert random.random() == expected[1] and np.random.rand() == expected[2]


def test_removing_a_checkpoint_through_the_strategy_removes_its_shards_and_only_its(tmp_path):
    main, other = tmp_path / "step=2.ckpt", tmp_path / "step=4.ckpt"
    save(main, 2)
    save(other, 2)
    link = tmp_path / "last.ckpt"
    link.symlink_to(other.name)  # ModelCheckpoint(save_last="link")
    strategy = LocalSGDStrategy(period=2)
    strategy.remove_checkpoint(main)
    strategy.remove_checkpoint(link)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step=4.ckpt", "step=4.ckpt.shards"]
    assert missing_shards(other) == []
