"""RoundCheckpoint: file naming, atomic completion, the newest complete checkpoint, pruning, arguments."""

from __future__ import annotations

import pytest
import torch

from lightning_localsgd import RoundCheckpoint
from lightning_localsgd.callbacks.round_checkpoint import newest_complete_checkpoint


def write(path, payload=None):
    torch.save(payload if payload is not None else {"x": torch.arange(1000)}, path)
    return path


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


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [({"every_n_rounds": 0}, "every_n_rounds"), ({"keep_last": 0}, "keep_last"), ({"every_n_rounds": 1.5}, "integer")],
)
def test_bad_arguments_are_rejected(kwargs, match):
    with pytest.raises(ValueError, match=match):
        RoundCheckpoint(**kwargs)
