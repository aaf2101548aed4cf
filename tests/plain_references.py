"""Reference trajectories written in plain torch from ALGORITHMS.md, for tests that would otherwise compare one
algorithm of the package with another (a bug the two share would then pass)."""

from __future__ import annotations

import torch
from sim_utils import flat_params, loss_of, make_layered_model


def local_sgd_trajectories(
    world: int, steps: int, period: int, dtype: torch.dtype = torch.float64, overlapped: bool = False
) -> list[list[torch.Tensor]]:
    """Per rank, the parameters after every step of ``world`` layered models, each trained by its own SGD (lr 0.05,
    momentum 0.9, as ``sim_utils.train_workers``) on ``loss_of(model, rank, step)``.

    Every ``period`` steps (after steps H, 2H, ...):
    * ``overlapped=False``, Local SGD (spec section 1): every replica becomes the mean of the replicas;
    * ``overlapped=True``, CoCoD-SGD (spec section 4): with s_i the replica at the round's start (after set-up, the
      initial model), x_i <- mean_j s_j + (x_i - s_i), and the result is the next round's start.
    Momentum buffers stay per rank."""
    models = [make_layered_model(dtype) for _ in range(world)]
    optimizers = [torch.optim.SGD(m.parameters(), lr=0.05, momentum=0.9) for m in models]
    starts = [flat_params(m).clone() for m in models]
    out: list[list[torch.Tensor]] = [[] for _ in range(world)]
    for step in range(steps):
        for rank, (model, opt) in enumerate(zip(models, optimizers)):
            opt.zero_grad()
            loss_of(model, rank, step).backward()
            opt.step()
        if (step + 1) % period == 0:
            replicas = [flat_params(m) for m in models]
            if overlapped:
                mean_start = torch.stack(starts).mean(0)
                updated = [mean_start + (x - s) for x, s in zip(replicas, starts)]
                starts = [u.clone() for u in updated]
            else:
                updated = [torch.stack(replicas).mean(0)] * world
            with torch.no_grad():
                for model, vector in zip(models, updated):
                    offset = 0
                    for p in model.parameters():
                        p.copy_(vector[offset : offset + p.numel()].view_as(p))
                        offset += p.numel()
        for rank, model in enumerate(models):
            out[rank].append(flat_params(model).clone())
    return out


def documented_sum(values: list[float]) -> float:
    """The scaled sign's float64 sum of |values| in payload format 2 (``sign_kernels.c``): element i into lane
    i % 1024, each lane in order from 0, then the lanes folded in halves (lane k += lane k + half) until one is left."""
    lanes = [0.0] * 1024
    for i, value in enumerate(values):
        lanes[i % 1024] += abs(value)
    half = 512
    while half:
        for k in range(half):
            lanes[k] = lanes[k] + lanes[k + half]
        half //= 2
    return lanes[0]
