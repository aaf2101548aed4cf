"""One rank of a run through the entry points beyond the Trainer: Fabric (``--entry fabric``), the plain-PyTorch
optimizer wrapper on a bare model (``--entry plain``) or on a ``DistributedDataParallel`` model (``--entry ddp``).

Every rank trains the simulated-worker tests' layered model (float64, SGD with momentum) on ``loss_of(model, rank,
step)``, so the parameters after each step can be compared with ``tests/sim_utils.train_workers``. ``--save-at K``
saves a checkpoint after step K; ``--resume`` loads it (after set-up) and continues from step K + 1. Writes
``<out>/rank<R>.pt``: the parameters after every step, the consensus seen at the end, the final parameters, the
communication counters.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from sim_utils import flat_params, loss_of, make_layered_model

import lightning_localsgd
from lightning_localsgd import fabric as fabric_strategies

# Small periods, so that a 10-step run holds several rounds (and, for STL-SGD, a stage change).
STRATEGY_OPTIONS = {
    "local_sgd": lambda p: {"period": p},
    "vrl_sgd": lambda p: {"period": p},
    "overlap_local_sgd": lambda p: {"period": p},
    "cocod_sgd": lambda p: {"period": p},
    "liec_sgd": lambda p: {"full_sync_period": p},
    "ef_sign": lambda p: {"period": p},
    "dpsgd": lambda p: {"check_every": p},
    "detag": lambda p: {"check_every": p, "gossip_rounds": 2},
    "diloco": lambda p: {"period": p},
    "stl_sgd": lambda p: {"first_period": p, "first_stage_steps": 2 * p, "period_growth": "identical"},
    "hierarchical_local_sgd": lambda p: {"intra_period": p, "inter_period": 2 * p},
}


def trainer_strategy_class(name: str) -> type:
    from lightning.pytorch.strategies import StrategyRegistry

    return StrategyRegistry[name]["strategy"]


def make_algorithm(name: str, period: int, warmup: int = 0):
    """The algorithm the Trainer's strategy of that name builds (the same constructor, so the same checks)."""
    return trainer_strategy_class(name)(**STRATEGY_OPTIONS[name](period), warmup_steps=warmup).algorithm


def parse() -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--entry", choices=["fabric", "plain", "ddp"], required=True)
    parser.add_argument("--strategy", choices=sorted(STRATEGY_OPTIONS), default="vrl_sgd")
    parser.add_argument("--warmup", type=int, default=0)
    parser.add_argument("--by-name", action="store_true", help="Fabric(strategy='<name>') with its defaults")
    parser.add_argument("--period", type=int, default=3)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--save-at", type=int, default=-1)
    parser.add_argument("--resume", action="store_true")
    parser.add_argument("--closure", action="store_true", help="plain/ddp: optimizer.step(closure)")
    parser.add_argument("--dropit", type=float, default=0.0, help="swap in DropIT layers with this gamma")
    return parser.parse_args()


def make_optimizer(model: torch.nn.Module) -> torch.optim.Optimizer:
    return torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)


def main() -> None:
    args = parse()
    torch.set_num_threads(1)
    rank = int(os.environ["RANK"])
    checkpoint = args.out / "checkpoint.pt"
    history: list[torch.Tensor] = []
    first = args.save_at + 1 if args.resume else 0
    strategy_class = trainer_strategy_class(args.strategy).__name__

    if args.entry == "fabric":
        from lightning.fabric import Fabric

        if args.by_name:
            strategy: object = args.strategy  # the defaults: long periods
        else:
            options = STRATEGY_OPTIONS[args.strategy](args.period)
            strategy = getattr(fabric_strategies, strategy_class)(**options, warmup_steps=args.warmup)
        fabric = Fabric(accelerator="cpu", devices=2, strategy=strategy)
        fabric.launch()
        assert type(fabric.strategy).__name__ == strategy_class, type(fabric.strategy)
        module = make_layered_model(torch.float64)
        if args.dropit:
            lightning_localsgd.apply_dropit(module, args.dropit)
        model, optimizer = fabric.setup(module, make_optimizer(module))
        if args.resume:
            remainder = fabric.load(checkpoint, {"model": model, "optimizer": optimizer})
            assert remainder["step"] == args.save_at, remainder
            assert "lightning_localsgd" not in remainder
        for step in range(first, args.steps):
            optimizer.zero_grad()
            fabric.backward(loss_of(model, rank, step))
            optimizer.step()
            history.append(flat_params(module).clone())
            if step == args.save_at and not args.resume:
                fabric.save(checkpoint, {"model": model, "optimizer": optimizer, "step": step})
        with fabric.strategy.consensus():
            consensus = flat_params(module).clone()
        local_after_consensus = flat_params(module).clone()
        metrics = fabric.strategy.comm_metrics()
        fabric.strategy.finalize()
    else:
        dist.init_process_group("gloo")
        module = make_layered_model(torch.float64)
        if args.dropit:
            lightning_localsgd.apply_dropit(module, args.dropit)
        model: torch.nn.Module = module
        if args.entry == "ddp":
            model = DistributedDataParallel(module)  # no buffers: broadcast_buffers may stay on
        algorithm = make_algorithm(args.strategy, args.period, args.warmup)
        optimizer = lightning_localsgd.LocalSGDOptimizer(make_optimizer(module), algorithm, model)
        # A schedule on the wrapper (it must pass for an optimizer); the learning rate stays, for the reference.
        scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=1.0)
        if args.resume:
            optimizer.load_state_dict(torch.load(args.out / f"checkpoint.rank{rank}.pt", weights_only=False))
        for step in range(first, args.steps):
            optimizer.zero_grad()
            if args.closure:  # forward and backward inside the step (warm-up gradients travel during backward)
                optimizer.step(lambda: loss_of(model, rank, step).backward())  # noqa: B023 - called right here
            else:
                loss_of(model, rank, step).backward()
                optimizer.step()
            scheduler.step()
            history.append(flat_params(module).clone())
            if step == args.save_at and not args.resume:
                torch.save(optimizer.state_dict(), args.out / f"checkpoint.rank{rank}.pt")
        with optimizer.consensus():
            consensus = flat_params(module).clone()
        local_after_consensus = flat_params(module).clone()
        metrics = optimizer.comm_metrics()
        optimizer.finalize()
    torch.save(
        {
            "history": history,
            "first": first,
            "consensus": consensus,
            "local_after_consensus": local_after_consensus,
            "final": flat_params(module).clone(),
            "metrics": metrics,
        },
        args.out / f"rank{rank}{'-resumed' if args.resume else ''}.pt",
    )


if __name__ == "__main__":
    main()
