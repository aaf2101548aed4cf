"""Helpers for tests that run N simulated workers in one process."""

from __future__ import annotations

import torch
from torch import nn

# A bucket cap so small that the layered model (see `make_model(hidden_layers=2)`) splits into several buckets,
# some holding one parameter and some several: 4 buckets in float32, 5 in float64.
SMALL_BUCKET_MB = 0.0001
DTYPES = (torch.float32, torch.float64)


def make_model(
    seed: int = 0, batchnorm: bool = False, dtype: torch.dtype = torch.float32, hidden_layers: int = 1
) -> nn.Module:
    """A small model initialised from its own generator (simulated workers are threads sharing the global RNG).

    ``hidden_layers`` Linear(., 8) + Tanh blocks, then Linear(8, 1); the first block has the optional BatchNorm.
    The values are drawn in float32 and then cast, so every dtype starts from the same model.
    """
    layers: list[nn.Module] = [nn.Linear(5, 8)]
    if batchnorm:
        layers.append(nn.BatchNorm1d(8))
    layers.append(nn.Tanh())
    for _ in range(hidden_layers - 1):
        layers += [nn.Linear(8, 8), nn.Tanh()]
    layers.append(nn.Linear(8, 1))
    model = nn.Sequential(*layers)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    return model.to(dtype)


def make_layered_model(dtype: torch.dtype = torch.float32, seed: int = 0) -> nn.Module:
    """The model of the bucket-layout tests: with :data:`SMALL_BUCKET_MB` it spans at least 3 buckets."""
    return make_model(seed, dtype=dtype, hidden_layers=2)


def worker_batch(rank: int, step: int, batch: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    """Deterministic, rank-dependent (non-identical) data: each rank sees a shifted input distribution."""
    g = torch.Generator().manual_seed(1000 * rank + step)
    x = torch.randn(batch, 5, generator=g) + rank
    y = (x.sum(dim=1, keepdim=True) * (1 + rank)).sin()
    return x, y


def loss_of(model: nn.Module, rank: int, step: int) -> torch.Tensor:
    x, y = worker_batch(rank, step)
    dtype = next(model.parameters()).dtype  # the data follows the model's dtype
    return nn.functional.mse_loss(model(x.to(dtype)), y.to(dtype))


def flat_params(model: nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


def mean_gradient_step(model: nn.Module, opt: torch.optim.Optimizer, world: int, step: int) -> None:
    """The reference: one model stepped on the mean of every worker's gradient (synchronous SGD)."""
    grads = []
    for rank in range(world):
        model.zero_grad()
        loss_of(model, rank, step).backward()
        grads.append([p.grad.clone() for p in model.parameters()])
    for i, p in enumerate(model.parameters()):
        p.grad = sum(g[i] for g in grads) / world
    opt.step()


def local_step(algo, model: nn.Module, opt: torch.optim.Optimizer, rank: int, step: int, skip: bool = False) -> bool:
    """One training step of a worker through every moment of the algorithm; ``skip`` leaves out ``opt.step()``
    (as when an fp16 grad scaler skips it). Returns whether the step ended with a round."""
    opt.zero_grad()
    loss_of(model, rank, step).backward()
    algo.before_optimizer_step(opt)
    if not skip:
        opt.step()
    algo.after_optimizer_step(opt)
    return algo.end_step()


def train_workers(
    make_algorithm, world, steps, *, dtype=torch.float64, make_optimizer=None, cut=None, record=None, prepare=None
):
    """Each simulated worker trains ``steps`` steps of the layered model through every moment of a fresh
    ``make_algorithm()``. With ``cut``, the state is saved before that step and training goes on in new objects
    loaded from it, as a resumed process would. Returns, per rank, ``(history, algorithm)``: one entry per step with
    the parameters after it (``"params"``), whether it ended with a round (``"round"``), and ``record(algorithm,
    optimizer)``'s items. ``prepare(model)`` runs on each new model (e.g. swapping in DropIT layers)."""
    from lightning_localsgd.comm import run_simulated

    make_optimizer = make_optimizer or (lambda m: torch.optim.SGD(m.parameters(), lr=0.05, momentum=0.9))

    prepare = prepare or (lambda model: None)

    def worker(rank, comm):
        model = make_layered_model(dtype)
        prepare(model)
        opt = make_optimizer(model)
        algorithm = make_algorithm()
        algorithm.setup(model, comm, [opt])
        history = []
        for step in range(steps):
            if step == cut:
                saved = (algorithm.state_dict(), opt.state_dict())
                model = make_layered_model(dtype, seed=9)  # other weights until the state is loaded
                prepare(model)
                opt = make_optimizer(model)
                algorithm = make_algorithm()
                algorithm.setup(model, comm, [opt])
                algorithm.load_state_dict(saved[0])
                opt.load_state_dict(saved[1])
            opt.zero_grad()
            loss_of(model, rank, step).backward()
            algorithm.before_optimizer_step(opt)
            opt.step()
            algorithm.after_optimizer_step(opt)
            held = algorithm.end_step()
            entry = {"params": flat_params(model).clone(), "round": held}
            entry.update(record(algorithm, opt) if record else {})
            history.append(entry)
        return history, algorithm

    return run_simulated(world, worker)
