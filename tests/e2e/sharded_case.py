"""One CPU run through ``Trainer.fit`` with replica groups (``--shard-size S`` > 1) or its unsharded equivalent.

The data make the two comparable: replica group ``g`` sees the batch ``X[g, t]`` (8 samples) at step ``t``. With
``--shard-size 2`` the group's two ranks take 4 samples each (FSDP2 averages their gradients, which for a mean
loss is the gradient of the 8); unsharded (``--shard-size 1``, one rank per group) the rank takes all 8. Started
as torchrun starts ranks (``tests/dist_utils.run_ranks``). Rank 0 saves ``<out>/result.pt``: the full consensus
after ``fit`` (gathered for the comparison only) and each rank's bytes and rounds across groups; every rank saves
what its validation saw in ``<out>/validated<rank>.pt``.
"""

from __future__ import annotations

import argparse
import os
import signal
from pathlib import Path

import lightning as L
import torch
import torch.distributed as dist
from lightning.pytorch.callbacks import ModelCheckpoint
from torch import nn
from torch.utils.data import DataLoader, Dataset

import lightning_localsgd  # noqa: F401 - registers the strategy names
from lightning_localsgd.comm.local_shards import is_sharded

GROUP_BATCH = 8
FSDP_BYTES = [0]  # what this rank sent in FSDP2's all-gathers and reduce-scatters (ring: (S - 1) / S of the full)
COUNTING = [True]  # training only: `comm/intra_group_mb` counts training batches


def count_fsdp_traffic() -> None:
    """Count the bytes of FSDP2's collectives, which it calls as ``dist.all_gather_single`` /
    ``dist.reduce_scatter_single``, from their tensors' sizes."""
    gather, scatter = dist.all_gather_single, dist.reduce_scatter_single

    def counted_gather(*args, **kwargs):
        sent = args[1] if len(args) > 1 else kwargs.get("input_tensor", kwargs.get("input"))
        size = dist.get_world_size(kwargs["group"])
        FSDP_BYTES[0] += (size - 1) * sent.numel() * sent.element_size() * COUNTING[0]
        return gather(*args, **kwargs)

    def counted_scatter(*args, **kwargs):
        kept = args[0] if args else kwargs["output"]
        size = dist.get_world_size(kwargs["group"])
        FSDP_BYTES[0] += (size - 1) * kept.numel() * kept.element_size() * COUNTING[0]
        return scatter(*args, **kwargs)

    dist.all_gather_single, dist.reduce_scatter_single = counted_gather, counted_scatter


class GroupData(Dataset):
    """Step ``t`` of group ``g``: rows ``[part * n, (part + 1) * n)`` of the group's batch ``X[g, t]``."""

    def __init__(self, group: int, part: int, parts: int, steps: int) -> None:
        g = torch.Generator().manual_seed(100 + group)
        self.x = torch.randn(steps, GROUP_BATCH, 6, generator=g) + group
        self.y = (self.x[..., :2] * (group + 1)).sin()
        n = GROUP_BATCH // parts
        self.rows = slice(part * n, (part + 1) * n)
        self.steps = steps

    def __len__(self) -> int:
        return self.steps

    def __getitem__(self, t: int):
        return self.x[t, self.rows], self.y[t, self.rows]


class Net(L.LightningModule):
    def __init__(self, optimizer: str, shard_size: int) -> None:
        super().__init__()
        torch.manual_seed(0)
        # Odd widths: FSDP2's shards are uneven (5 rows -> 3 + 2, 3 -> 2 + 1, 1 -> 1 + 0).
        self.body = nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 3), nn.Tanh())
        self.head = nn.Linear(3, 2)
        self.optimizer_name = optimizer
        self.shard_size = shard_size
        self.validated: list[dict[str, torch.Tensor]] = []
        self.shard_in_configure_model = False
        self.poison = (-1, -1)  # (rank, step): that rank's shard turns NaN after that step
        self.terminate = (-1, -1)  # (rank, step): that rank gets SIGTERM during that step

    def forward(self, x):
        return self.head(self.body(x))

    def configure_model(self):
        from torch.distributed.fsdp import FSDPModule, fully_shard

        if not self.shard_in_configure_model or self.shard_size == 1 or isinstance(self.head, FSDPModule):
            return  # Lightning calls the hook again for `validate` after `fit`: shard once

        mesh = self.trainer.strategy.device_mesh["shard"]  # the LightningModule's `device_mesh` is the same mesh
        assert self.device_mesh is self.trainer.strategy.device_mesh
        for layer in (self.body[0], self.body[2], self.body, self.head):
            fully_shard(layer, mesh=mesh)

    def training_step(self, batch, batch_idx):
        x, y = batch
        if (self.global_rank, self.trainer.global_step) == self.terminate:
            os.kill(os.getpid(), signal.SIGTERM)  # e.g. a scheduler stopping one task
        return nn.functional.mse_loss(self(x[0]), y[0])

    def on_train_batch_end(self, outputs, batch, batch_idx):
        nan_rank, nan_step = self.poison
        if self.global_rank == nan_rank and self.trainer.global_step == nan_step:
            with torch.no_grad():  # this rank's shard of the first layer's weight only
                self.body[0].weight.to_local()[0, 0] = float("nan")

    def on_validation_start(self):
        COUNTING[0] = False

    def on_validation_end(self):
        COUNTING[0] = True

    def validation_step(self, batch, batch_idx):
        x, _ = batch
        self(x[0])
        self.validated.append(full_state(self))

    def configure_optimizers(self):
        if self.optimizer_name == "adam":
            return torch.optim.Adam(self.parameters(), lr=0.01)
        return torch.optim.SGD(self.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-4)

    def _data(self, steps: int) -> DataLoader:
        rank = self.global_rank
        group, part = divmod(rank, self.shard_size)
        return DataLoader(GroupData(group, part, self.shard_size, steps), batch_size=1)

    def train_dataloader(self):
        return self._data(400)

    def val_dataloader(self):
        return self._data(1)


def full_state(module: nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter in full (a gather inside the replica group for sharded ones; collective)."""
    return {name: (p.full_tensor() if is_sharded(p) else p).detach().clone() for name, p in module.named_parameters()}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--strategy", default="local_sgd")
    parser.add_argument("--shard-size", type=int, default=2)
    parser.add_argument("--shard-layers", nargs="*", default=None)
    parser.add_argument("--optimizer", default="sgd")
    parser.add_argument("--param-dtype", default=None, help="FSDP2 mixed precision: bf16 / fp16")
    parser.add_argument("--checkpoint-activations", action="store_true")
    parser.add_argument("--max-steps", type=int, default=12)
    parser.add_argument("--period", type=int, default=4)
    parser.add_argument("--overlap", action="store_true")
    parser.add_argument("--val-every", type=int, default=None)
    parser.add_argument("--ckpt-every", type=int, default=None)
    parser.add_argument("--resume", default=None)
    parser.add_argument("--validate-after", action="store_true", help="`trainer.validate` after `fit`")
    parser.add_argument("--validate-only", default=None, help="no `fit`: `trainer.validate(ckpt_path=...)`")
    parser.add_argument("--second-fit", type=int, default=0, help="then `fit` again for this many more steps")
    parser.add_argument("--configure-model", action="store_true", help="shard in `configure_model`, not by policy")
    parser.add_argument("--term", type=int, nargs=2, default=(-1, -1), metavar=("RANK", "STEP"))
    parser.add_argument("--nan", type=int, nargs=2, default=(-1, -1), metavar=("RANK", "STEP"))
    args = parser.parse_args()
    torch.set_num_threads(1)
    count_fsdp_traffic()
    out = Path(args.out)
    world = int(os.environ["WORLD_SIZE"])

    options: dict = {"period": args.period}
    if args.strategy == "diloco":
        options.update(
            outer_optimizer="SGD",
            outer_optimizer_options={"lr": 0.7, "momentum": 0.9, "nesterov": True},
            overlap=args.overlap,
        )
    if args.strategy == "stl_sgd":
        options = {"first_period": 2, "first_stage_steps": 4, "proximal": 0.5}
    if args.shard_size > 1:
        options.update(shard_size=args.shard_size, shard_layers=args.shard_layers)
        options.update(shard_param_dtype=args.param_dtype, shard_activation_checkpointing=args.checkpoint_activations)
    strategy_class = L.pytorch.strategies.StrategyRegistry[args.strategy]["strategy"]
    strategy = strategy_class(**options)
    callbacks = []
    if args.ckpt_every:
        callbacks.append(
            ModelCheckpoint(dirpath=out / "ckpt", every_n_train_steps=args.ckpt_every, save_top_k=-1, filename="{step}")
        )
    model = Net(args.optimizer, args.shard_size)
    model.poison = tuple(args.nan)
    model.terminate = tuple(args.term)
    model.shard_in_configure_model = args.configure_model
    forwards = [0]  # calls of the first layer's forward: recomputed in backward under activation checkpointing
    first = model.body[0]
    plain_forward = first.forward

    def counted_forward(x):  # the recomputation calls `forward` itself, past any module hook
        forwards[0] += 1
        return plain_forward(x)

    first.forward = counted_forward
    trainer = L.Trainer(
        accelerator="cpu",
        devices=world,
        strategy=strategy,
        max_steps=args.max_steps,
        logger=False,
        enable_checkpointing=bool(callbacks),
        callbacks=callbacks,
        enable_progress_bar=False,
        enable_model_summary=False,
        use_distributed_sampler=False,
        val_check_interval=args.val_every,
        limit_val_batches=1 if args.val_every else 0,
        num_sanity_val_steps=0,
    )
    if args.validate_only:  # a fresh process evaluating a sharded checkpoint
        trainer.validate(model, ckpt_path=args.validate_only)
        torch.save(model.validated, out / f"validated{trainer.global_rank}.pt")
        return
    try:
        trainer.fit(model, ckpt_path=args.resume)
    except SystemExit:  # Lightning's SIGTERMException: a graceful stop every rank agreed on
        torch.save({"stopped_after": trainer.global_step}, out / f"stopped{trainer.global_rank}.pt")
        return
    if args.second_fit:  # continue in the same processes: the strategy keeps its groups, shards and state
        trainer.fit_loop.epoch_loop.max_steps = args.max_steps + args.second_fit
        trainer.fit(model)
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("comm/")}
    if args.validate_after:
        trainer.validate(model)  # evaluates the consensus left by `fit`: recorded in `model.validated`
    final = full_state(model)
    stats = strategy.comm_stats
    sent = [None] * world
    mine = {"bytes": stats.bytes_sent, "rounds": stats.rounds, "metrics": metrics, "fsdp_bytes": FSDP_BYTES[0]}
    mine["forwards"] = forwards[0]
    dist.all_gather_object(sent, mine)
    torch.save(model.validated, out / f"validated{trainer.global_rank}.pt")  # the consensus each rank evaluated
    if trainer.is_global_zero:
        torch.save({"final": final, "sent": sent}, out / "result.pt")
    print(f"finished: {trainer.global_step} steps", flush=True)


if __name__ == "__main__":
    main()
