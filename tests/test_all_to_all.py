"""The communicator's all-to-all (LIEC-SGD's sharded server): rank k gets piece k of every rank's tensor."""

from __future__ import annotations

import pytest
import torch
from dist_utils import run_processes

from lightning_localsgd.comm import ProcessGroupCommunicator, run_simulated

SPLITS = [3, 0, 5]  # uneven, one empty: the shards of a chunk with fewer blocks than ranks


def sent_by(rank: int) -> torch.Tensor:
    return torch.arange(sum(SPLITS), dtype=torch.uint8) + 100 * rank


def expected_at(rank: int) -> list[torch.Tensor]:
    start = sum(SPLITS[:rank])
    return [sent_by(sender)[start : start + SPLITS[rank]] for sender in range(len(SPLITS))]


def exchange(rank: int, comm) -> tuple[list[torch.Tensor], int]:
    received = comm.all_to_all_(sent_by(rank), SPLITS)
    return [r.clone() for r in received], comm.stats.bytes_sent


def check(results: list[tuple[list[torch.Tensor], int]]) -> None:
    for rank, (received, sent) in enumerate(results):
        assert len(received) == 3
        assert all(torch.equal(got, want) for got, want in zip(received, expected_at(rank)))
        assert sent == sum(SPLITS) - SPLITS[rank]  # every piece but its own


def test_simulated_all_to_all_delivers_piece_k_to_rank_k():
    check(run_simulated(3, exchange))


def gloo_exchange(rank: int) -> tuple[list[torch.Tensor], int]:
    return exchange(rank, ProcessGroupCommunicator())


def test_gloo_all_to_all_delivers_piece_k_to_rank_k():
    check(run_processes(3, gloo_exchange))


def test_splits_that_do_not_cut_the_tensor_are_refused():
    def bad(rank, comm):
        comm.all_to_all_(torch.zeros(7), [3, 3])

    with pytest.raises(ValueError, match=r"cut into 2 pieces; got 7 elements and splits \[3, 3\]"):
        run_simulated(2, bad)
