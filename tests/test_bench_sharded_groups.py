"""benchmarks.sharded_groups end to end at its ``--smoke`` size (a tiny model, loopback, forked ranks; ~15 s): the
tables, the JSON's structure, and the bytes per round checked against the ring all-reduce of each rank's shard,
computed here from FSDP2's documented layout (``torch.chunk`` along dim 0). No timing is asserted."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).parent.parent
FLAGS_SLACK = 1024  # unsharded rounds carry the guard's few flags in the same count; sharded ones count them apart


def shard_numel(shape: list[int], k: int, shards: int) -> int:
    """Elements of shard ``k`` when dim 0 is chunked as ``torch.chunk`` does (the last chunk may be short)."""
    per = math.ceil(shape[0] / shards)
    rows = max(0, min(shape[0], (k + 1) * per) - k * per)
    return rows * math.prod(shape[1:])


def ring_bytes(payload: int, ranks: int) -> float:
    return 2 * (ranks - 1) / ranks * payload


def test_sharded_groups_smoke_measures_a_shard_of_the_bytes_per_round(tmp_path: Path) -> None:
    command = [sys.executable, "-m", "benchmarks.sharded_groups", "--smoke", "--out", str(tmp_path)]
    proc = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "| local_sgd, shard_size 2, 4 processes (2 groups x 2) |" in proc.stdout
    assert (tmp_path / "table.md").read_text().count("\n|") >= 12
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["lab"] is None  # loopback only

    width, layers = results["model"]["width"], results["model"]["layers"]
    shapes = [shape for _ in range(layers) for shape in ([width, width], [width])]
    assert width % 2 == 1  # odd: FSDP2's two shards differ by a row, so the check below tells them apart
    full = 4 * sum(math.prod(s) for s in shapes)
    rows = results["memory"]["rows"]
    layouts = {(r["config"]["strategy"], r["config"]["shard_size"], r["config"]["world"], r["allocator"]) for r in rows}
    assert len(layouts) == len(rows) == 10
    for row in rows:
        assert "error" not in row, row
        assert row["shapes"] == shapes and row["model_bytes"] == full
        assert row["peak_rss_bytes"] >= row["start_rss_bytes"] > 0 and row["training_rss_bytes"] >= 0
        config = row["config"]
        world, shard_size = config["world"], config["shard_size"]
        groups = world // shard_size
        assert len(row["rounds"]) == len(row["bytes_per_round"]) == world
        assert min(row["rounds"]) == max(row["rounds"]) >= 2
        for rank, per_round in enumerate(row["bytes_per_round"]):
            if shard_size == 1:  # a full replica, all-reduced over every rank, plus the guard's flags
                expected = ring_bytes(full, world)
                assert expected <= per_round <= expected + FLAGS_SLACK, (config, rank, per_round)
            else:  # shard k of the model, all-reduced over the ranks holding shard k: one per group
                mine = 4 * sum(shard_numel(s, rank % shard_size, shard_size) for s in shapes)
                assert per_round == ring_bytes(mine, groups), (config, rank, per_round, mine)
        # bytes_sent also holds the set-up broadcast and the final average: at least the rounds' bytes
        assert all(sent >= r * b for sent, r, b in zip(row["bytes_sent"], row["rounds"], row["bytes_per_round"]))

    ratios = results["memory"]["ratios"]
    allocators = ("glibc default", "mmap >= 1 MiB")
    pairs = {(strategy, allocator) for strategy in ("local_sgd", "diloco") for allocator in allocators}
    assert {(q["strategy"], q["allocator"]) for q in ratios} == pairs
    largest_shard = 4 * sum(shard_numel(s, 0, 2) for s in shapes)
    for q in ratios:
        # 4 full replicas: 1.5 models per rank per round; 2 groups x 2: half a model, once; 2 full replicas: 1 model.
        assert abs(q["bytes_per_round"] - largest_shard / ring_bytes(full, 4)) < 0.01
        assert q["bytes_per_round"] < 0.35
        if q["allocator"] != "glibc default":
            assert abs(q["bytes_per_round_vs_2_replicas"] - largest_shard / full) < 0.01
        assert q["peak_rss"] > 0 and q["training_rss"] > 0
