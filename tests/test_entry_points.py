"""The Fabric strategies and the plain-PyTorch optimizer wrapper: names, arguments, misuse, DDP and AMP details."""

from __future__ import annotations

import pytest
import torch
from dist_utils import run_processes
from lightning.fabric import Fabric
from lightning.fabric.strategies import STRATEGY_REGISTRY
from lightning.pytorch.strategies import StrategyRegistry
from torch import nn

import lightning_localsgd
from lightning_localsgd import VRLSGD, LocalSGD, LocalSGDOptimizer
from lightning_localsgd import fabric as fabric_strategies
from lightning_localsgd.strategies import ALL_STRATEGIES


@pytest.mark.parametrize("trainer_class", ALL_STRATEGIES, ids=lambda c: c.__name__)
def test_every_trainer_name_is_a_fabric_name_with_the_same_algorithm_and_defaults(trainer_class):
    for name in trainer_class.strategy_names:
        fabric = Fabric(accelerator="cpu", devices=2, strategy=name)
        strategy = fabric.strategy
        assert isinstance(strategy, fabric_strategies.FabricLocalUpdateStrategy)
        assert strategy.trainer_strategy is trainer_class
        trainer_algorithm = StrategyRegistry.get(name).algorithm
        assert type(strategy.algorithm) is type(trainer_algorithm)
        assert strategy.algorithm.schedule.state_dict() == trainer_algorithm.schedule.state_dict()
        assert name in STRATEGY_REGISTRY


def test_fabric_strategies_refuse_bad_values_as_the_trainer_strategies_do():
    with pytest.raises(ValueError, match="period"):
        fabric_strategies.VRLSGDStrategy(period=0)
    with pytest.raises(ValueError, match="inter_period"):
        fabric_strategies.HierarchicalLocalSGDStrategy(intra_period=3, inter_period=8)
    with pytest.raises(ValueError, match="on_nonfinite"):
        fabric_strategies.LocalSGDStrategy(on_nonfinite="ignore")
    with pytest.raises(ValueError, match="collective_timeout"):
        fabric_strategies.CoCoDSGDStrategy(collective_timeout=-1)
    strategy = fabric_strategies.DiLoCoStrategy(period=5, timeout=60, process_group_backend="gloo")
    assert strategy.algorithm.period == 5 and strategy.process_group_backend == "gloo"


def test_the_optimizer_wrapper_refuses_misuse_before_any_collective():
    model = nn.Linear(3, 1)
    with pytest.raises(TypeError, match="Optimizer"):
        LocalSGDOptimizer(object(), LocalSGD(period=4), model)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="algorithm"):
        LocalSGDOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), object(), model)  # type: ignore[arg-type]
    with pytest.raises(RuntimeError, match="init_process_group"):
        LocalSGDOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), LocalSGD(period=4), model)
    assert "LocalSGDOptimizer" in lightning_localsgd.__all__


def _ddp_that_broadcasts_buffers(rank: int) -> str:
    from torch.nn.parallel import DistributedDataParallel

    model = DistributedDataParallel(nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4)))
    try:
        LocalSGDOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), LocalSGD(period=4), model)
    except ValueError as error:
        return str(error)
    return "accepted"


def test_a_ddp_model_that_broadcasts_buffers_every_forward_is_refused():
    for message in run_processes(2, _ddp_that_broadcasts_buffers):
        assert "broadcast_buffers=False" in message


def _overflow_on_one_rank(rank: int) -> dict:
    # fp16-style loss scaling on CPU: rank 1's loss overflows at step 5 (local phase, mid-period), so only its
    # scaler skips that step. The step still counts on rank 1 (the round schedule stays the same everywhere).
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.Tanh(), nn.Linear(8, 1))
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8)
    optimizer = LocalSGDOptimizer(
        torch.optim.Adam(model.parameters(), lr=0.01), VRLSGD(period=4, warmup_steps=2), model, grad_scaler=scaler
    )
    generator = torch.Generator().manual_seed(rank)
    rounds = []
    for step in range(12):
        x = torch.randn(8, 4, generator=generator)
        loss = (model(x) - x.sum(1, keepdim=True)).pow(2).mean()
        if rank == 1 and step == 5:
            loss = loss * float("inf")
        optimizer.zero_grad()
        scaler.scale(loss).backward()
        optimizer.step()
        rounds.append(optimizer.algorithm.rounds)
    optimizer.finalize()
    return {
        "rounds": rounds,
        "scale": scaler.get_scale(),
        "final": torch.cat([p.detach().reshape(-1) for p in model.parameters()]),
        "finite": all(torch.isfinite(p).all() for p in model.parameters()),
    }


def test_a_step_one_rank_s_grad_scaler_skips_keeps_every_rank_on_the_same_schedule():
    ranks = run_processes(2, _overflow_on_one_rank)
    assert ranks[0]["rounds"] == ranks[1]["rounds"] == [0, 0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2]
    assert ranks[1]["scale"] < ranks[0]["scale"]  # only rank 1's scaler backed off
    assert ranks[0]["finite"] and ranks[1]["finite"]
    assert torch.equal(ranks[0]["final"], ranks[1]["final"])
