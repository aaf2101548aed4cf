"""Plain PyTorch under torchrun: any algorithm of lightning_localsgd as an optimizer wrapper, in your own loop.

    torchrun --standalone --nproc-per-node=2 examples/plain_pytorch.py --algorithm vrl_sgd --period 8
    torchrun --standalone --nproc-per-node=2 examples/plain_pytorch.py --ddp        # keep a DDP wrapper

A small CNN on scikit-learn's bundled digits (no download), each rank holding a label-sorted shard. Every epoch
evaluates the average of the replicas and saves each rank's state (``<out>/epoch<E>.rank<R>.pt``);
``--resume-epoch E`` continues from one exactly. ``<out>/final.pt`` holds the final (averaged) weights.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader

from lightning_localsgd import VRLSGD, CoCoDSGD, LocalSGD, LocalSGDOptimizer, NonIIDSampler, OverlapLocalSGD
from lightning_localsgd.demos.digits import DigitsCNN, evaluate, load_images

ALGORITHMS = {"local_sgd": LocalSGD, "vrl_sgd": VRLSGD, "overlap_local_sgd": OverlapLocalSGD, "cocod_sgd": CoCoDSGD}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--algorithm", choices=sorted(ALGORITHMS), default="vrl_sgd")
    parser.add_argument("--period", type=int, default=8)
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--ddp", action="store_true", help="wrap the model in DistributedDataParallel")
    parser.add_argument("--out", type=Path, default=Path("plain_pytorch_run"))
    parser.add_argument("--resume-epoch", type=int, default=-1)
    args = parser.parse_args()

    dist.init_process_group("gloo")  # "nccl" on GPUs (and move the model and batches to the rank's device)
    rank = dist.get_rank()
    torch.set_num_threads(1)
    torch.manual_seed(0)  # rank 0's model is broadcast anyway; the seed makes the run repeatable
    args.out.mkdir(parents=True, exist_ok=True)

    train, test = load_images("digits")
    sampler = NonIIDSampler(train.tensors[1], scheme="label_sorted")
    loader = DataLoader(train, batch_size=32, sampler=sampler)
    network = DigitsCNN()
    model: nn.Module = DistributedDataParallel(network) if args.ddp else network
    algorithm = ALGORITHMS[args.algorithm](period=args.period)
    optimizer = LocalSGDOptimizer(torch.optim.SGD(network.parameters(), lr=0.05, momentum=0.9), algorithm, model)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=args.epochs * len(loader))

    first_epoch = 0
    if args.resume_epoch >= 0:
        state = torch.load(args.out / f"epoch{args.resume_epoch}.rank{rank}.pt", weights_only=False)
        optimizer.load_state_dict(state["optimizer"])  # this rank's replica, momentum and algorithm state
        scheduler.load_state_dict(state["scheduler"])
        first_epoch = args.resume_epoch + 1

    for epoch in range(first_epoch, args.epochs):
        sampler.set_epoch(epoch)
        model.train()
        for images, labels in loader:
            optimizer.zero_grad()
            nn.functional.cross_entropy(model(images), labels).backward()
            optimizer.step()
            scheduler.step()
        with optimizer.consensus():  # collective: every rank evaluates the average of the replicas
            loss, accuracy = evaluate(network, test)
        state = {"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "epoch": epoch}
        torch.save(state, args.out / f"epoch{epoch}.rank{rank}.pt")
        if rank == 0:
            metrics = optimizer.comm_metrics()
            print(f"epoch {epoch}: test loss {loss:.3f}, accuracy {accuracy:.3f}, rounds {metrics['comm/rounds']:.0f}")

    optimizer.finalize()  # every rank keeps the average
    if rank == 0:
        torch.save(network.state_dict(), args.out / "final.pt")
        loss, accuracy = evaluate(network, test)
        print(json.dumps({"accuracy": accuracy, "loss": loss, **optimizer.comm_metrics()}))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
