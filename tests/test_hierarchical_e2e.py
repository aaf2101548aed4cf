"""Hierarchical Local SGD with 4 real processes posing as 2 nodes x 2 (CPU, gloo) through ``Trainer.fit``."""

from __future__ import annotations

import csv
from pathlib import Path

import torch
from dist_utils import run_ranks

SCRIPT = Path(__file__).parent / "e2e" / "run_case.py"
ARGS = ("--strategy", "hierarchical_local_sgd", "--devices", "2", "--num-nodes", "2", "--period", "2")


def run(out: Path, *args: str) -> list[dict]:
    proc = run_ranks(SCRIPT, out, *ARGS, *args, world=4, nodes=2, timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(4)]


def test_nodes_agree_every_intra_period_the_world_every_inter_period_and_resume_is_exact(tmp_path):
    args = ("--inter-period", "6", "--max-steps", "12", "--val-every", "5", "--csv")
    ranks = run(tmp_path / "full", *args, "--ckpt-every", "4")
    for i in range(12):
        params = [r["steps"][i]["params"] for r in ranks]
        done = i + 1
        if done % 6 == 0:
            assert all(torch.equal(p, params[0]) for p in params[1:])
        elif done % 2 == 0:
            assert torch.equal(params[0], params[1]) and torch.equal(params[2], params[3])
            assert (params[0] - params[2]).abs().max() > 1e-4
        else:
            assert (params[0] - params[1]).abs().max() > 1e-4
    for vals in zip(*(r["val"] for r in ranks)):  # validation on the average of all four
        mean = torch.stack([v["local"] for v in vals]).mean(0)
        for v in vals:
            torch.testing.assert_close(v["evaluated"], mean)
    inter = [r["algorithm_metrics"]["comm/inter_node_mb_sent"] for r in ranks]
    intra = [r["algorithm_metrics"]["comm/intra_node_mb_sent"] for r in ranks]
    assert inter[0] > 0 and intra[0] > inter[0]  # 2 global rounds cross nodes, 6 node rounds stay inside
    with open(tmp_path / "full" / "logs" / "metrics.csv") as f:
        rows = [r for r in csv.DictReader(f) if r.get("comm/inter_node_mb_sent")]
    assert float(rows[-1]["comm/inter_node_mb_sent"]) == inter[0]
    resumed = run(tmp_path / "resumed", *args, "--resume", str(tmp_path / "full" / "ckpt" / "step=4.ckpt"))
    for rank in range(4):
        for got, want in zip(resumed[rank]["steps"], ranks[rank]["steps"][4:], strict=True):
            torch.testing.assert_close(got["params"], want["params"], rtol=0, atol=0)
    torch.testing.assert_close(ranks[0]["final"], ranks[3]["final"], rtol=0, atol=0)


def test_ranks_numbered_round_robin_over_nodes_are_refused_by_every_rank_with_what_to_do(tmp_path):
    # 4 ranks as 2 nodes x 2 numbered cyclically (rank r on node r % 2): per-node groups built from the numbering
    # ({0, 1} and {2, 3}) would each span both machines.
    proc = run_ranks(SCRIPT, tmp_path, *ARGS, "--max-steps", "4", world=4, nodes=2, cyclic=True, timeout=120)
    assert proc.returncode != 0
    assert proc.stderr.count("not numbered node by node") == 4, proc.stderr[-3000:]  # every rank, none left hanging
    assert "rank 1 on node 1, rank 2 on node 0" in proc.stderr and "--distribution=block" in proc.stderr
