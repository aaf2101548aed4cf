"""The one table of what the lab runs: the compute limit, the peers, and our strategies.

A strategy of ours enters the lab by being registered: rows whose name is not in Lightning's
``StrategyRegistry`` (after ``import lightning_localsgd``) are skipped, and registered names of ours that no
row mentions are added at period 32.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from lightning.pytorch.strategies import StrategyRegistry

import lightning_localsgd

# How a peer runs: "compute" = 1 process, plain loop, no communication (the compute limit); "compute_pair" =
# the same in every rank at once, still no communication (what the machine gives N ranks sharing it);
# "lightning" = a Trainer with a registered strategy; "torch_ddp" = plain loop, DistributedDataParallel;
# "torch_post_local" = plain loop, DDP + PostLocalSGDState(post_local_gradient_allreduce=False) +
# PeriodicModelAverager (a plain loop because Lightning registers DDP comm hooks only on CUDA).
AGAIN = "compute limit, again at the end"
KINDS = ("compute", "compute_pair", "lightning", "torch_ddp", "torch_post_local")


@dataclass(frozen=True)
class Peer:
    label: str
    kind: str
    strategy: str = ""
    options: dict[str, Any] = field(default_factory=dict)
    ours: bool = False

    @property
    def slug(self) -> str:
        return "".join(c if c.isalnum() else "_" for c in self.label.lower()).strip("_")


PEERS: tuple[Peer, ...] = (
    Peer("compute limit (1 process, no comm)", "compute"),
    Peer("compute, every rank at once (no comm)", "compute_pair"),
    Peer("Lightning 1 process (no comm)", "lightning", "single"),
    Peer("Lightning DDP", "lightning", "ddp"),
    Peer("torch DDP", "torch_ddp"),
    Peer("torch DDP + post-local SGD, period 16", "torch_post_local", options={"period": 16}),
    # Synchronous SGD through our warm-up path (gradients averaged bucket by bucket during backward): what a
    # warm-up step costs against the DDP it replaces.
    Peer("local_sgd, warm-up only (synchronous)", "lightning", "local_sgd", {"warmup_steps": 10**9}, ours=True),
    Peer("local_sgd, period 16", "lightning", "local_sgd", {"period": 16}, ours=True),
    Peer("local_sgd, period 32", "lightning", "local_sgd", {"period": 32}, ours=True),
    Peer("vrl_sgd, period 32", "lightning", "vrl_sgd", {"period": 32}, ours=True),
    Peer("overlap_local_sgd, period 32", "lightning", "overlap_local_sgd", {"period": 32}, ours=True),
    Peer("cocod_sgd, period 32", "lightning", "cocod_sgd", {"period": 32}, ours=True),
    # Per-step compressed gradients: scaled signs, about 1/32 of float32 on compressed steps.
    Peer("ef_sign (scaled sign, error feedback)", "lightning", "ef_sign", {"period": 100}, ours=True),
    Peer("liec_sgd, p = 32", "lightning", "liec_sgd", {"full_sync_period": 32}, ours=True),
    Peer("liec_sgd, p = 100", "lightning", "liec_sgd", {"full_sync_period": 100}, ours=True),
    # VRL-SGD's control variate on LIEC-SGD's replicas, for the label-sorted data of the CNN workload.
    *(
        Peer(
            f"liec_sgd, p = {p}, variance_reduction",
            "lightning",
            "liec_sgd",
            {"full_sync_period": p, "variance_reduction": True},
            ours=True,
        )
        for p in (32, 16, 100)
    ),
    # One scale per 0.25 MiB block instead of 5 MiB (a model of ~4 MB is otherwise a single block).
    Peer(
        "liec_sgd, p = 32, 0.25 MiB blocks",
        "lightning",
        "liec_sgd",
        {"full_sync_period": 32, "block_size_mb": 0.25},
        ours=True,
    ),
    Peer("ef_sign, 0.25 MiB blocks", "lightning", "ef_sign", {"compressor_options": {"block_size_mb": 0.25}}, True),
    # Gossip: every step, the replica to each neighbour on a ring (DeTAG: with its gradient tracker).
    Peer("dpsgd, ring", "lightning", "dpsgd", {"topology": "ring"}, ours=True),
    Peer("detag, ring, 1 round", "lightning", "detag", {"topology": "ring"}, ours=True),
    # Outer optimizer on the rounds (Nesterov SGD, lr 0.7, momentum 0.9), blocking or with the delayed outer step.
    Peer("diloco, period 32", "lightning", "diloco", {"period": 32}, ours=True),
    Peer("diloco, overlap, period 32", "lightning", "diloco", {"period": 32, "overlap": True}, ours=True),
    # Stages of 64, 128, ... steps with periods 8, 11, 16, ... and the learning rate halved at each boundary.
    Peer("stl_sgd, first period 8", "lightning", "stl_sgd", {"first_period": 8, "first_stage_steps": 64}, True),
    # Each lab rank is a node of its own (one rank per namespace): the node level is trivial, the world level is
    # Local SGD at period 32. Meaningful with several ranks per node.
    Peer(
        "hierarchical_local_sgd, intra 4, inter 32",
        "lightning",
        "hierarchical_local_sgd",
        {"intra_period": 4, "inter_period": 32},
        ours=True,
    ),
    # The machine's speed drifts by tens of % over minutes (a shared VM): measuring the limit again after the
    # peers and dividing by the larger of the two keeps every fraction an underestimate.
    Peer(AGAIN, "compute"),
)
DEFAULT_PERIOD = 32  # for registered strategies of ours that no row names

# Streaming DiLoCo (issue 28): the model in 4 fragments, each synchronised every 32 steps, 8 steps apart, its
# transfer started 2 steps before it is merged. Run by benchmarks/streaming_diloco.py beside "Lightning DDP" and
# "diloco, period 32"; kept out of PEERS, which slow_link runs in full, because each is a variant of one strategy.
STREAMING_OPTIONS: dict[str, Any] = {"period": 32, "fragments": 4, "sync_delay": 2}
STREAMING_PEERS: tuple[Peer, ...] = (
    Peer("streaming diloco, F = 4, tau = 2", "lightning", "diloco", dict(STREAMING_OPTIONS), ours=True),
    Peer(
        "streaming diloco, F = 4, tau = 2, int4",
        "lightning",
        "diloco",
        {**STREAMING_OPTIONS, "compressor": "int4"},
        ours=True,
    ),
    # SparseLoCo (arXiv 2508.15706): top-64 of every 4096 values, 2-bit values. Its error feedback with decay
    # takes the place of the outer Nesterov momentum, so the outer step is plain SGD at lr 1 (options given
    # replace the default lr 0.7, momentum 0.9, Nesterov) and the error decays by 0.95 a round.
    Peer(
        "streaming diloco, F = 4, tau = 2, sparse top-k",
        "lightning",
        "diloco",
        {
            **STREAMING_OPTIONS,
            "compressor": "sparse_topk",
            "compressor_options": {"k": 64, "chunk_numel": 4096},
            "outer_optimizer_options": {"lr": 1.0},
            "error_decay": 0.95,
        },
        ours=True,
    ),
    # Sparse top-k with the outer Nesterov step kept: 4 times SparseLoCo's density (top-256 of 4096, about 1/28 of
    # float32) and error feedback without decay, for runs too short for SparseLoCo's momentum-free setting.
    Peer(
        "streaming diloco, F = 4, tau = 2, sparse top-k 1/16, Nesterov",
        "lightning",
        "diloco",
        {**STREAMING_OPTIONS, "compressor": "sparse_topk", "compressor_options": {"k": 256, "chunk_numel": 4096}},
        ours=True,
    ),
)


def ours_registered() -> list[str]:
    """Registered strategy names whose class comes from this package."""
    package = lightning_localsgd.__name__
    return [name for name in StrategyRegistry if StrategyRegistry[name]["strategy"].__module__.startswith(package)]


def runnable_peers(smoke: bool = False) -> list[Peer]:
    """The rows to run, in order; ``smoke`` keeps one row of each kind and one of ours."""
    registered = set(StrategyRegistry.available_strategies())
    rows = [p for p in PEERS if p.kind != "lightning" or p.strategy == "single" or p.strategy in registered]
    named = {p.strategy for p in rows}
    for name in ours_registered():
        if name not in named:
            rows.append(Peer(f"{name}, period {DEFAULT_PERIOD}", "lightning", name, {"period": DEFAULT_PERIOD}, True))
    rows.sort(key=lambda p: p.label == AGAIN)  # last, after the rows of ours added above
    if smoke:
        # every code path once (plain loop alone, plain loop with DDP, Lightning with a strategy), in seconds
        keep = {"compute limit (1 process, no comm)", "torch DDP + post-local SGD, period 16"}
        first_ours = next((p for p in rows if p.ours), None)
        rows = [p for p in rows if p.label in keep or p is first_ours]
    return rows


def skipped_peers() -> list[str]:
    registered = set(StrategyRegistry.available_strategies())
    return [p.label for p in PEERS if p.kind == "lightning" and p.strategy not in registered | {"single"}]
