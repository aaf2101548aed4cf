"""A newcomer's first hour: what a misconfigured or too-short run says, and where the strategy's metrics show up.

* a run whose other ranks never start (``num_nodes=2`` started on one node) stops within ``init_timeout`` with a
  message naming the missing ranks and the commands that start them, instead of waiting 30 minutes;
* a fit in which no round averages the replicas warns once (at the start when the step budget shows it, else at
  the end), and a normal fit does not;
* ``comm/*`` are in ``trainer.callback_metrics`` at every step (``ModelCheckpoint(monitor="comm/mb_sent")`` works)
  and the rounds and megabytes in the progress bar, which a constructor argument switches off.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import threading
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from dist_utils import free_port, run_ranks

from lightning_localsgd import VRLSGDStrategy
from lightning_localsgd.algorithms import DPSGD, LIECSGD, STLSGD, VRLSGD, DiLoCo, LocalSGD
from lightning_localsgd.algorithms.hierarchical import HierarchicalLocalSGD
from lightning_localsgd.driving import exchanges_every_step
from lightning_localsgd.fabric import VRLSGDStrategy as FabricVRLSGDStrategy
from lightning_localsgd.strategies.rendezvous import RanksMissingError, _Describe, _ranges, check_in
from lightning_localsgd.strategies.round_budget import first_world_round

SCRIPT = Path(__file__).parent / "e2e" / "newcomer_case.py"


# ---------------------------------------------------------------------- start-up: ranks that never arrive
def run_alone(out: Path, node_rank: int, init_timeout: float) -> tuple[subprocess.CompletedProcess, float]:
    """One process of a ``Trainer(num_nodes=2, devices=1)`` run, started as a launcher would, with nobody else.
    Returns the process and the seconds its ``trainer.fit`` ran."""
    out.mkdir(parents=True, exist_ok=True)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("TORCHELASTIC", "SLURM", "WORLD_SIZE", "RANK"))}
    env.update(LOCAL_RANK="0", NODE_RANK=str(node_rank), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    args = ["--devices", "1", "--num-nodes", "2", "--init-timeout", str(init_timeout), "--out", str(out)]
    # Without the check-in, this process would wait for its peer for Lightning's 30 minutes: the timeout fails it.
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), *args], cwd=out, env=env, capture_output=True, text=True, timeout=150
    )
    ran = re.search(r"newcomer_case: fit ran ([0-9.]+) s", proc.stderr)
    assert ran is not None, proc.stderr[-3000:]
    return proc, float(ran.group(1))


def test_rank_0_alone_stops_within_init_timeout_naming_the_missing_node(tmp_path):
    proc, seconds = run_alone(tmp_path, node_rank=0, init_timeout=2)
    assert proc.returncode != 0 and seconds < 2 + 4  # the check-in's wait, and set-up on a busy machine
    message = proc.stderr.replace("\n", " ")
    assert "RanksMissingError" in message
    assert "only 1 of 2 ranks arrived within `init_timeout=2` s (missing: 1, on node(s) 1)" in message
    assert "expected: 2 processes, `Trainer(num_nodes=2, devices=1)`" in message
    # The commands that start both nodes on one machine, this script included.
    for node in (0, 1):
        assert f"torchrun --nnodes 2 --nproc-per-node 1 --node-rank {node} --master-addr 127.0.0.1" in message
    assert "newcomer_case.py --devices 1 --num-nodes 2" in message


def test_a_rank_that_cannot_reach_rank_0_stops_within_init_timeout(tmp_path):
    proc, seconds = run_alone(tmp_path, node_rank=1, init_timeout=4)
    assert proc.returncode != 0 and seconds < 4 + 4  # torch retries a connection: not much later than the limit
    message = proc.stderr.replace("\n", " ")
    assert "rank 1 could not reach the main process (rank 0) at 127.0.0.1:" in message
    assert "within `init_timeout=4` s" in message and "--node-rank 0" in message


def check_in_threads(world: int, arriving: list[int], ranks_per_node: int, seconds: float) -> dict[int, str]:
    """``check_in`` for the ``arriving`` ranks of a ``world``, one thread each, on a store this test serves;
    returns each rank's error message ("" when it got through)."""
    server = dist.TCPStore("127.0.0.1", 0, None, True, timedelta(seconds=30), wait_for_workers=False)
    results: dict[int, str] = {}

    def rank(r: int) -> None:
        client = dist.TCPStore("127.0.0.1", server.port, None, False, timedelta(seconds=30))
        describe = _Describe("127.0.0.1", server.port, world, ranks_per_node, timedelta(seconds=seconds), "S")
        try:
            check_in(client, r, world, describe)
            results[r] = ""
        except RanksMissingError as error:
            results[r] = str(error)

    threads = [threading.Thread(target=rank, args=(r,)) for r in arriving]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    return results


@pytest.mark.parametrize(
    ("world", "arriving", "missing"),
    [
        (6, [0, 1, 4], "(missing: 2-3, 5, on node(s) 1-2)"),  # 3 nodes of 2 ranks: node 1 and half of node 2 absent
        (4, [0, 1, 2], "(missing: 3, on node(s) 1)"),  # one rank short
    ],
)
def test_check_in_counts_the_ranks_and_names_the_missing_ones_with_their_nodes(world, arriving, missing):
    results = check_in_threads(world, arriving, ranks_per_node=2, seconds=1.0)
    assert sorted(results) == arriving
    for r, message in results.items():
        assert f"S (rank {r}): only {len(arriving)} of {world} ranks arrived within `init_timeout=1` s" in message
        assert missing in message


def test_check_in_lets_a_complete_world_through():
    assert check_in_threads(4, [0, 1, 2, 3], ranks_per_node=2, seconds=20.0) == {0: "", 1: "", 2: "", 3: ""}


@pytest.mark.parametrize(
    ("kwargs", "named"),
    [
        ({"init_timeout": 0}, "init_timeout"),
        ({"init_timeout": "60"}, "init_timeout"),
        ({"comm_progress_bar": 1}, "comm_progress_bar"),
    ],
)
def test_bad_start_up_and_progress_bar_arguments_are_refused_by_name(kwargs, named):
    with pytest.raises(ValueError, match=f"`{named}`"):
        VRLSGDStrategy(period=4, **kwargs)
    with pytest.raises(ValueError, match=f"`{named}`"):
        FabricVRLSGDStrategy(period=4, **kwargs)


def test_ranges_compress_runs_of_ranks():
    assert _ranges([0, 1, 2, 5, 7, 8]) == "0-2, 5, 7-8"
    assert _ranges([3]) == "3" and _ranges([]) == ""


# ---------------------------------------------------------------------- fits with no round, and normal fits
@pytest.mark.parametrize(
    ("make", "start", "stop", "first"),
    [
        # Rounds after local steps H, 2H, ... (0-based step H - 1): a fit of exactly H steps holds one.
        (lambda: VRLSGD(period=4), 0, 4, 3),
        (lambda: VRLSGD(period=4), 0, 3, None),
        (lambda: VRLSGD(period=4), 5, 40, 7),  # a second fit or a resume starts mid-period
        (lambda: VRLSGD(period=4, warmup_steps=2), 0, 6, 5),  # warm-up steps are not rounds
        (lambda: LocalSGD(period=100), 0, 5, 0),  # torch's phase: a round right after the first local step
        # Node averages every 2 steps do not make replicas agree across nodes: world rounds every 6 local steps.
        (lambda: HierarchicalLocalSGD(intra_period=2, inter_period=6, warmup_steps=1), 0, 7, 6),
        (lambda: HierarchicalLocalSGD(intra_period=2, inter_period=6, warmup_steps=1), 0, 6, None),
        (lambda: STLSGD(first_stage_steps=8, first_period=3), 0, 3, 2),  # the first stage's period
        (lambda: DiLoCo(period=100), 0, 40, None),  # examples/diloco.yaml over 40 steps
    ],
)
def test_first_world_round_follows_the_schedules(make, start, stop, first):
    assert first_world_round(make(), start, stop) == first


def test_algorithms_that_exchange_every_step_are_never_without_rounds():
    assert exchanges_every_step(DPSGD()) and exchanges_every_step(LIECSGD())
    assert not exchanges_every_step(VRLSGD(period=4)) and not exchanges_every_step(DiLoCo(period=4))


def fit(out: Path, *args: str, devices: int = 2) -> tuple[str, list[dict]]:
    proc = run_ranks(SCRIPT, out, "--devices", str(devices), *args, world=devices, timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:]
    return proc.stdout, [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(devices)]


NO_ROUND_AHEAD = "and no round among them"
NO_ROUND_HELD = "and no round averaged the replicas"


def test_a_period_longer_than_the_fit_warns_once_at_the_start(tmp_path):
    output, ranks = fit(tmp_path, "--strategy", "diloco", "--period", "100", "--max-steps", "6")
    assert output.count(NO_ROUND_AHEAD) == 1 and NO_ROUND_HELD not in output  # rank 0 only, once
    text = " ".join(output.split())
    assert "DiLoCoStrategy: this fit has 6 training step(s) left" in text and "6 of them local" in text
    assert "the 2 ranks train 6 local steps each on their own data, as independent models" in text
    assert "plain average of those independent replicas" in text and "lower `period` (now 100)" in text
    assert ranks[0]["comm"]["rounds"] == 0  # what the warning foretold


def test_a_fit_stopped_before_its_first_round_warns_at_the_end(tmp_path):
    # Period 4 over 12 steps: rounds ahead at the start, but the fit stops after step 3.
    output, ranks = fit(tmp_path, "--strategy", "vrl_sgd", "--period", "4", "--stop-after", "3")
    assert output.count(NO_ROUND_HELD) == 1 and NO_ROUND_AHEAD not in output
    assert "this fit ended after 3 step(s), 3 of them local" in " ".join(output.split())
    assert ranks[0]["comm"]["rounds"] == 0


def test_warm_up_covering_the_fit_is_not_a_fit_without_rounds(tmp_path):
    output, _ = fit(tmp_path, "--strategy", "diloco", "--period", "100", "--warmup", "6", "--max-steps", "6")
    assert NO_ROUND_AHEAD not in output and NO_ROUND_HELD not in output


def test_one_process_warns_that_there_is_nothing_to_average_and_the_progress_bar_switch_works(tmp_path):
    output, ranks = fit(tmp_path, "--strategy", "vrl_sgd", "--no-comm-progress-bar", devices=1)
    assert output.count("runs in one process") == 1 and NO_ROUND_HELD not in output
    assert "there is no other replica to average" in " ".join(output.split())
    seen = ranks[0]["seen"]
    assert "comm/rounds" in seen[-1]["callback"]  # still logged, just not shown
    assert not any(name.startswith("comm/") for name in seen[-1]["progress_bar"])


@pytest.fixture(scope="module")
def monitored_run(tmp_path_factory):
    """VRL-SGD, period 4 over 12 steps (rounds after steps 4, 8, 12), ModelCheckpoint on comm/mb_sent every 4."""
    out = tmp_path_factory.mktemp("monitored")
    output, ranks = fit(out, "--strategy", "vrl_sgd", "--period", "4", "--monitor-every", "4")
    return out, output, ranks


def test_a_normal_fit_does_not_warn_about_rounds(monitored_run):
    _, output, _ = monitored_run
    assert NO_ROUND_AHEAD not in output and NO_ROUND_HELD not in output and "runs in one process" not in output


def test_comm_metrics_are_in_callback_metrics_at_every_step(monitored_run):
    _, _, ranks = monitored_run
    for rank in ranks:
        seen = rank["seen"]
        assert len(seen) == 12
        for batch, step in enumerate(seen, start=1):
            assert step["callback"]["comm/rounds"] == batch // 4  # rounds after steps 4, 8, 12
            assert step["callback"]["comm/mb_sent"] == pytest.approx(step["mb_sent"], rel=1e-6)
            assert not any(name.startswith("comm/exchange") for name in step["callback"])  # gossip's only
        # After fit: the totals, the final average included.
        assert rank["callback_metrics"]["comm/rounds"] == 3
        assert rank["callback_metrics"]["comm/mb_sent"] == pytest.approx(rank["comm"]["bytes_sent"] / 1e6)
        assert rank["comm"]["bytes_sent"] / 1e6 > seen[-1]["mb_sent"]


def test_model_checkpoint_monitors_comm_mb_sent(monitored_run):
    out, _, ranks = monitored_run
    # Megabytes only grow, so with mode="max" the best of the saves at steps 4, 8, 12 is the last one.
    assert sorted(p.name for p in (out / "monitored").glob("*.ckpt")) == ["step=12.ckpt"]
    assert ranks[0]["best_model_path"].endswith("step=12.ckpt")
    assert ranks[0]["best_model_score"] == pytest.approx(ranks[0]["seen"][11]["mb_sent"], rel=1e-6)


def test_the_progress_bar_shows_rounds_and_megabytes(monitored_run):
    _, _, ranks = monitored_run
    shown = ranks[0]["seen"][-1]["progress_bar"]
    assert "comm/rounds" in shown and "comm/mb_sent" in shown
    assert "comm/seconds" not in shown and "comm/collectives" not in shown  # the rest stay in the loggers
