"""Lightning Fabric: ``Fabric(strategy="vrl_sgd")`` (or any other name of lightning_localsgd) in your own loop.

    python examples/fabric_train.py --strategy vrl_sgd                  # Fabric starts 2 CPU processes itself
    torchrun --standalone --nproc-per-node=2 examples/fabric_train.py   # or under torchrun / SLURM

A small CNN on scikit-learn's bundled digits (no download), each rank holding a label-sorted shard. Every epoch
evaluates the average of the replicas and saves a checkpoint (``<out>/epoch<E>.ckpt``: the averaged weights, with
each rank's own state in ``epoch<E>.ckpt.shards/``); ``--resume-epoch E`` continues from one exactly.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from lightning.fabric import Fabric
from torch import nn
from torch.utils.data import DataLoader

import lightning_localsgd  # noqa: F401 - registers the strategy names with Fabric
from lightning_localsgd import NonIIDSampler
from lightning_localsgd.demos.digits import DigitsCNN, evaluate, load_images
from lightning_localsgd.fabric import log_comm_metrics


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--strategy", default="vrl_sgd", help="a registered name, e.g. local_sgd, cocod_sgd, dpsgd")
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--out", type=Path, default=Path("fabric_run"))
    parser.add_argument("--resume-epoch", type=int, default=-1)
    args = parser.parse_args()

    torch.set_num_threads(1)
    fabric = Fabric(accelerator="cpu", devices=2, strategy=args.strategy, loggers=[])
    fabric.launch()
    fabric.seed_everything(0)
    train, test = load_images("digits")
    sampler = NonIIDSampler(train.tensors[1], num_replicas=fabric.world_size, rank=fabric.global_rank)
    loader = DataLoader(train, batch_size=32, sampler=sampler)  # our sampler: no `setup_dataloaders` re-wrapping
    network = DigitsCNN()
    model, optimizer = fabric.setup(network, torch.optim.SGD(network.parameters(), lr=0.05, momentum=0.9))

    first_epoch = 0
    if args.resume_epoch >= 0:  # after `fabric.setup`: every rank gets its own replica and momentum back
        remainder = fabric.load(args.out / f"epoch{args.resume_epoch}.ckpt", {"model": model, "optimizer": optimizer})
        first_epoch = remainder["epoch"] + 1

    step = 0
    for epoch in range(first_epoch, args.epochs):
        sampler.set_epoch(epoch)
        model.train()
        for images, labels in loader:
            optimizer.zero_grad()
            fabric.backward(nn.functional.cross_entropy(model(images), labels))
            optimizer.step()
            step += 1
        with fabric.strategy.consensus():  # collective: every rank evaluates the average of the replicas
            loss, accuracy = evaluate(network, test)
        log_comm_metrics(fabric, step)
        fabric.save(args.out / f"epoch{epoch}.ckpt", {"model": model, "optimizer": optimizer, "epoch": epoch})
        fabric.print(f"epoch {epoch}: test loss {loss:.3f}, accuracy {accuracy:.3f}, rounds {fabric.strategy.rounds}")

    fabric.strategy.finalize()  # every rank keeps the average
    loss, accuracy = evaluate(network, test)
    fabric.print(json.dumps({"accuracy": accuracy, "loss": loss, **fabric.strategy.comm_metrics()}))
    if fabric.global_rank == 0:
        torch.save(network.state_dict(), args.out / "final.pt")


if __name__ == "__main__":
    main()
