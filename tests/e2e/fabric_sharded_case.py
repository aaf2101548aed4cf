"""One Fabric run with replica groups (``--shard-size 2``, 4 ranks) or its unsharded equivalent (2 ranks): group
``g`` sees the batch ``X[g, t]`` at step ``t``, split over its ranks when sharded (as ``sharded_case.py``).

``fabric.setup_module``, then the optimizer from the sharded parameters, ``fabric.setup_optimizers``; ``--save-at``
writes a checkpoint after that step, ``--resume`` continues from it. Rank 0 saves ``<out>/result.pt``: the full
consensus inside ``consensus()`` at the end, and the weights gathered after ``finalize``.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import torch
from lightning.fabric import Fabric
from torch import nn

from lightning_localsgd import fabric as fabric_strategies
from lightning_localsgd.comm.local_shards import is_sharded

GROUP_BATCH = 8


def batch(group: int, part: int, parts: int, step: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1000 * group + step)
    x = torch.randn(GROUP_BATCH, 6, generator=g) + group
    y = (x[:, :2] * (group + 1)).sin()
    n = GROUP_BATCH // parts
    return x[part * n : (part + 1) * n], y[part * n : (part + 1) * n]


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.body = nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 3), nn.Tanh())
        self.head = nn.Linear(3, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))


def full_state(module: nn.Module) -> dict[str, torch.Tensor]:
    return {n: (p.full_tensor() if is_sharded(p) else p).detach().clone() for n, p in module.named_parameters()}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--shard-size", type=int, default=2)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--save-at", type=int, default=-1)
    parser.add_argument("--resume", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(1)
    world = int(os.environ["WORLD_SIZE"])
    options: dict = {"period": 3}
    if args.shard_size > 1:
        options.update(shard_size=args.shard_size, shard_layers=["Linear"])
    fabric = Fabric(accelerator="cpu", devices=world, strategy=fabric_strategies.VRLSGDStrategy(**options))
    fabric.launch()
    rank = fabric.global_rank
    group, part = divmod(rank, args.shard_size)
    model = fabric.setup_module(Net())
    optimizer = fabric.setup_optimizers(torch.optim.Adam(model.parameters(), lr=0.01))
    checkpoint = args.out / "checkpoint.ckpt"
    first = 0
    if args.resume:
        remainder = fabric.load(checkpoint, {"model": model, "optimizer": optimizer})
        first = remainder["step"] + 1
    for step in range(first, args.steps):
        optimizer.zero_grad()
        x, y = batch(group, part, args.shard_size, step)
        fabric.backward(nn.functional.mse_loss(model(x), y))
        optimizer.step()
        if step == args.save_at and not args.resume:
            fabric.save(checkpoint, {"model": model, "optimizer": optimizer, "step": step})
    with fabric.strategy.consensus():
        model(batch(group, part, args.shard_size, 0)[0])  # an evaluation forward inside, as users do
        consensus = full_state(model)
    fabric.strategy.finalize()
    final = full_state(model)
    if rank == 0:
        torch.save({"consensus": consensus, "final": final}, args.out / "result.pt")
    print("finished", flush=True)


if __name__ == "__main__":
    main()
