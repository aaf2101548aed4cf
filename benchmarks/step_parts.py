"""Where one strategy's training step goes, part by part, on the MLP of :mod:`benchmarks.exchange_memory`.

    python -m benchmarks.step_parts --strategy detag [--params-millions 100] [--steps 24] [--warmup 2]

Runs :mod:`benchmarks.exchange_memory_worker` (2 ranks on loopback gloo, one thread each; ``--strategy single`` is
plain one-process Lightning) with wall-clock timers around named functions: Lightning's forward and backward, the
whole optimizer step (its closure runs forward, backward and the strategy's exchange inside it), this package's
per-step exchanges, and within them the waits, the posting of neighbour exchanges and the C kernels. No profiler
runs, so the step is not slowed down by sampling. Rank 0 prints each part's mean seconds per step over the steps
after ``--warmup``, beside the mean step time. A part named "- ..." runs inside the unindented part above it;
"the optimizer's own step" is the whole optimizer step less the parts that run inside it. A benchmark, not a test:
the numbers belong to this machine.
"""

from __future__ import annotations

import argparse
import functools
import importlib
import tempfile
import time
from collections import defaultdict
from pathlib import Path
from typing import Any, Callable

import lightning as L
from lightning.pytorch.callbacks import Callback

from benchmarks import exchange_memory_worker

STRATEGY = "lightning.pytorch.strategies.strategy"
GOSSIP = "lightning_localsgd.algorithms.gossip"
GOSSIP_KERNELS = "lightning_localsgd.algorithms.gossip_native"
COMM = "lightning_localsgd.comm.communicator"
EXCHANGE = "lightning_localsgd.algorithms.gradient_exchange"
SIGN_KERNELS = "lightning_localsgd.compression.native"
GRADIENT_EXCHANGE = "gradient exchange (warm-up or compressed)"

# (label, module, class, methods): the methods' times add up under the label. A method that calls another one of
# the same label (an override calling its parent) counts once.
PARTS: list[tuple[str, str, str, tuple[str, ...]]] = [
    ("forward", STRATEGY, "Strategy", ("training_step",)),
    ("backward", STRATEGY, "Strategy", ("backward",)),
    ("optimizer step, all of it", "torch.optim", "SGD", ("step",)),
    ("gossip", GOSSIP, "GossipAlgorithm", ("before_optimizer_step",)),
    ("- posting neighbour exchanges", GOSSIP, "GossipAlgorithm", ("_start_exchange",)),
    ("- waiting for neighbour exchanges", COMM, "PendingNeighbourExchange", ("wait",)),
    ("- gossip kernels: mix", GOSSIP_KERNELS, "GossipKernels", ("mix",)),
    ("- gossip kernels: tracker", GOSSIP_KERNELS, "GossipKernels", ("track",)),
    ("- gossip kernels: copies and checks", GOSSIP_KERNELS, "GossipKernels", ("copy_finite", "all_finite")),
    (GRADIENT_EXCHANGE, EXCHANGE, "GradientExchange", ("before_optimizer_step",)),
    ("- all-gathers, blocking (the flags)", COMM, "Communicator", ("all_gather_",)),
    ("- waiting for all-gathers", COMM, "PendingAllGather", ("wait",)),
    ("- sign kernels", SIGN_KERNELS, "SignKernels", ("abs_sum_signs", "decode", "residual", "decode_add")),
]
INSIDE_THE_OPTIMIZER_STEP = ("forward", "backward", "gossip", GRADIENT_EXCHANGE)


class PartTimers:
    """Seconds spent in each part since the last :meth:`reset`."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = defaultdict(float)
        self._depth: dict[str, int] = defaultdict(int)

    def reset(self) -> None:
        self.seconds.clear()

    def install(self) -> None:
        for label, module, owner, methods in PARTS:
            cls = getattr(importlib.import_module(module), owner)
            for name in methods:
                setattr(cls, name, self._timed(label, getattr(cls, name)))

    def _timed(self, label: str, function: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(function)
        def timed(*args: Any, **kwargs: Any) -> Any:
            self._depth[label] += 1
            start = time.perf_counter()
            try:
                return function(*args, **kwargs)
            finally:
                self._depth[label] -= 1
                if self._depth[label] == 0:
                    self.seconds[label] += time.perf_counter() - start

        return timed


class ResetAfterWarmup(Callback):
    """Starts the timers afresh at the first measured step."""

    def __init__(self, timers: PartTimers, warmup: int) -> None:
        self.timers, self.warmup = timers, warmup

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, index: int) -> None:
        if index == self.warmup:
            self.timers.reset()


def table(seconds: dict[str, float], step_seconds: list[float], warmup: int) -> list[str]:
    """Mean seconds per measured step of every part that ran, and of the step itself."""
    measured = step_seconds[warmup:]
    per_step = {label: total / len(measured) for label, total in seconds.items()}
    rows = ["| part | seconds per step |", "|---|---:|"]
    for label, *_ in PARTS:
        if label in per_step:
            rows.append(f"| {label} | {per_step[label]:.3f} |")
    if "optimizer step, all of it" in per_step:
        inside = sum(per_step.get(label, 0.0) for label in INSIDE_THE_OPTIMIZER_STEP)
        rows.append(f"| the optimizer's own step | {per_step['optimizer step, all of it'] - inside:.3f} |")
    rows.append(f"| step (batch start to end) | {sum(measured) / len(measured):.3f} |")
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--strategy", required=True, help="'single', or a registered strategy name")
    parser.add_argument("--params-millions", type=float, default=100.0)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--steps", type=int, default=24)
    parser.add_argument("--warmup", type=int, default=2, help="first steps left out of the means")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--out", type=Path, default=None, help="where the ranks' records go (default: a temporary dir)")
    args = parser.parse_args()
    if not 0 <= args.warmup < args.steps:
        parser.error("--warmup must be at least 0 and below --steps")
    args.save_at = 0
    timers = PartTimers()
    timers.install()
    with tempfile.TemporaryDirectory() as scratch:
        if args.out is None:
            args.out = Path(scratch)
        record = exchange_memory_worker.run(args, [ResetAfterWarmup(timers, args.warmup)])
    if record["rank"] != 0:
        return
    print(
        f"`{args.strategy}`: MLP of {record['numel'] / 1e6:.1f} M float32 parameters, batch {args.batch_size}, "
        f"{args.steps} steps (means after the first {args.warmup}), rank 0"
    )
    print()
    print("\n".join(table(timers.seconds, record["step_seconds"], args.warmup)))


if __name__ == "__main__":
    main()
