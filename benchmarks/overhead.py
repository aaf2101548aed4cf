"""The two costs the strategies add on top of the work itself, measured side by side in one run.

1. A local (non-round) step of LocalSGDStrategy / VRLSGDStrategy (2 processes) against a step of plain
   single-process Lightning training of the same model (target: at most 1.05), and against two such
   single-process runs at once (the same load on the machine as 2 ranks, with no strategy at all).
2. One round (parameter average) against one raw ``all_reduce`` of a flat tensor of the model's size in the
   same 2-process gloo group (target: at most 1.2).

    python benchmarks/overhead.py [--steps 400]

Each rank runs one thread; with 2 ranks on 2 cores every process has a core, as the single process does.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import lightning as L
import torch
import torch.distributed as dist
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.strategies import DDPStrategy

import lightning_localsgd
from lightning_localsgd.algorithms import LocalSGD
from lightning_localsgd.comm import ProcessGroupCommunicator
from lightning_localsgd.demos.mlp import SyntheticMLP, mlp
from lightning_localsgd.strategies import LocalUpdateStrategy


class OwnCodeTimer:
    """Seconds spent in the strategy's own code on local steps, measured inside the run (immune to machine noise).

    Own code = the strategy's ``optimizer_step`` minus the ``DDPStrategy.optimizer_step`` it wraps (which runs
    forward, backward and the optimizer), plus its end-of-batch hook.
    """

    def __init__(self) -> None:
        self.seconds = 0.0
        wrapper, wrapped = LocalUpdateStrategy.optimizer_step, DDPStrategy.optimizer_step
        end_of_batch = LocalUpdateStrategy.on_train_batch_end_first
        inner = [0.0]

        def timed_wrapped(*args, **kwargs):
            start = time.perf_counter()
            try:
                return wrapped(*args, **kwargs)
            finally:
                inner[0] += time.perf_counter() - start

        def timed_wrapper(*args, **kwargs):
            start, inner[0] = time.perf_counter(), 0.0
            try:
                return wrapper(*args, **kwargs)
            finally:
                self.seconds += time.perf_counter() - start - inner[0]

        def timed_end_of_batch(*args, **kwargs):
            start = time.perf_counter()
            try:
                return end_of_batch(*args, **kwargs)
            finally:
                self.seconds += time.perf_counter() - start

        DDPStrategy.optimizer_step = timed_wrapped
        LocalUpdateStrategy.optimizer_step = timed_wrapper
        LocalUpdateStrategy.on_train_batch_end_first = timed_end_of_batch


class StepTimer(Callback):
    def __init__(self) -> None:
        self.ends: list[float] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.ends.append(time.perf_counter())


def time_lightning_steps(strategy: str, steps: int, out: Path) -> None:
    """Runs inside the launched processes; rank 0 writes the median step time of local steps."""
    torch.set_num_threads(1)
    timer = StepTimer()
    own = OwnCodeTimer()
    if strategy == "single":
        trainer_strategy, devices = "auto", 1
    else:
        cls = {"local_sgd": lightning_localsgd.LocalSGDStrategy, "vrl_sgd": lightning_localsgd.VRLSGDStrategy}
        trainer_strategy, devices = cls[strategy](period=10**6, first_period_one_step=False), 2
    trainer = L.Trainer(
        accelerator="cpu",
        devices=devices,
        strategy=trainer_strategy,
        max_steps=steps,
        callbacks=[timer],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(SyntheticMLP())
    if trainer.global_rank == 0:
        intervals = [b - a for a, b in zip(timer.ends[20:], timer.ends[21:])]  # skip warm-up iterations
        per_step_own = own.seconds / len(timer.ends)
        out.write_text(json.dumps({"median": statistics.median(intervals), "own": per_step_own}))


def round_vs_raw_all_reduce(repeats: int) -> dict[str, float]:
    """Runs inside a 2-process gloo group: median seconds of a LocalSGD round and of a raw all_reduce."""
    torch.set_num_threads(1)
    model = mlp()
    algo = LocalSGD(period=1)
    algo.setup(model, ProcessGroupCommunicator())
    raw = torch.zeros(algo.flat.numel)
    round_times, raw_times = [], []
    for i in range(repeats):  # interleaved, alternating which goes first, so drift hits both alike
        for which in ("raw", "round") if i % 2 else ("round", "raw"):
            dist.barrier()
            start = time.perf_counter()
            if which == "raw":
                dist.all_reduce(raw)
            else:
                algo.end_step()  # period 1: every step is a round
            (raw_times if which == "raw" else round_times).append(time.perf_counter() - start)
    return {"round": statistics.median(round_times), "raw": statistics.median(raw_times)}


def launch_round_benchmark(repeats: int) -> dict[str, float]:
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29533", "WORLD_SIZE": "2"}
    with tempfile.TemporaryDirectory() as tmp:
        procs = [
            subprocess.Popen(
                [sys.executable, __file__, "--_round-worker", str(rank), "--repeats", str(repeats), "--_out", tmp],
                env=env,
            )
            for rank in range(2)
        ]
        for proc in procs:
            if proc.wait() != 0:
                raise SystemExit("round benchmark worker failed")
        return json.loads((Path(tmp) / "round.json").read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--repeats", type=int, default=200)
    parser.add_argument("--trials", type=int, default=2, help="alternating repetitions of each step timing")
    parser.add_argument("--_step-worker", default=None)
    parser.add_argument("--_round-worker", type=int, default=None)
    parser.add_argument("--_out", default=None)
    args = parser.parse_args()

    if args._step_worker:
        time_lightning_steps(args._step_worker, args.steps, Path(args._out))
        return
    if args._round_worker is not None:
        dist.init_process_group("gloo", rank=args._round_worker, world_size=2)
        result = round_vs_raw_all_reduce(args.repeats)
        if args._round_worker == 0:
            (Path(args._out) / "round.json").write_text(json.dumps(result))
        dist.destroy_process_group()
        return

    medians: dict[str, list[float]] = {"single": [], "single_x2": [], "local_sgd": [], "vrl_sgd": []}
    own: dict[str, list[float]] = {"local_sgd": [], "vrl_sgd": []}
    with tempfile.TemporaryDirectory() as tmp:
        for _ in range(args.trials):
            for name in medians:
                result = run_step_worker(name, args.steps, Path(tmp))
                medians[name].append(result["median"])
                if name in own:
                    own[name].append(result["own"] / result["median"])
    step = {name: min(values) for name, values in medians.items()}  # least-disturbed trial of each
    rounds = launch_round_benchmark(args.repeats)

    base, pair = step["single"], step["single_x2"]
    print("| measurement | seconds (median step, best trial) | ratio | target |")
    print("|---|---:|---:|---:|")
    print(f"| single-process Lightning step | {base:.5f} | 1.00 | |")
    print(f"| same, two independent runs at once | {pair:.5f} | {pair / base:.3f} | |")
    for name in ("local_sgd", "vrl_sgd"):
        ratio, fair = step[name] / base, step[name] / pair
        print(f"| {name} local step, 2 ranks | {step[name]:.5f} | {ratio:.3f} ({fair:.3f} vs two at once) | <= 1.05 |")
        share = statistics.median(own[name])
        print(f"| {name}: the strategy's own code per local step | | {share:.4f} of a step | |")
    numel = sum(p.numel() for p in mlp().parameters())
    print(f"| raw all_reduce of {numel:,} fp32 | {rounds['raw']:.5f} | 1.00 | |")
    print(f"| one LocalSGD round | {rounds['round']:.5f} | {rounds['round'] / rounds['raw']:.3f} | <= 1.2 |")


def run_step_worker(name: str, steps: int, tmp: Path) -> dict[str, float]:
    """Median local-step seconds of one configuration.

    ``single_x2`` runs two independent single-process trainings at once: the same load on the machine as
    2 ranks, with no strategy at all, so it is the fair baseline for a 2-rank local step.
    """
    copies = 2 if name == "single_x2" else 1
    worker = "single" if name == "single_x2" else name
    outs = [tmp / f"{name}{i}.json" for i in range(copies)]
    command = [sys.executable, __file__, "--_step-worker", worker, "--steps", str(steps), "--_out"]
    procs = [
        subprocess.Popen([*command, str(out)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL) for out in outs
    ]
    if any(proc.wait() != 0 for proc in procs):
        raise SystemExit(f"step benchmark {name} failed")
    return json.loads(outs[0].read_text())


if __name__ == "__main__":
    main()
