"""The three workloads of the slow-link lab, each as plain PyTorch pieces.

Every peer (a plain torch loop or a Lightning Trainer) builds its model, optimizer and per-rank data from the
same :class:`Workload`, so they train the same model on the same batches; only synchronisation differs.
``evaluate`` scores the average of the ranks' replicas on one fixed set, the same for every peer.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from functools import cache
from typing import Any, Callable, Optional

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader

from lightning_localsgd.data import NonIIDSampler
from lightning_localsgd.demos import lm
from lightning_localsgd.demos.digits import DigitsCNN, load_images
from lightning_localsgd.demos.mlp import SyntheticClassification, mlp

Batch = Any


@dataclass(frozen=True)
class Workload:
    """What a peer needs to train and what the report needs to score.

    Attributes:
        build_model: a fresh model; seeded by the caller, so every rank starts from the same weights.
        make_optimizer: the optimizer for the model's parameters.
        train_loader: ``(rank, world_size) -> DataLoader`` of that rank's batches (as many epochs as needed).
        loss: ``(model, batch) -> scalar`` training loss.
        evaluate: ``(model, world_size) -> {"loss": ..., optionally "acc": ...}`` on a fixed set.
        warmup, steps: steps before the throughput window, steps inside it (multiples of every period).
        eval_every: steps between snapshots of the replicas (for the loss curves).
        target_loss: the evaluation loss that "time to target" waits for.
        what: one line for the report.
        target_acc: the evaluation accuracy a second "time to target" waits for (workloads that score it).
    """

    build_model: Callable[[], nn.Module]
    make_optimizer: Callable[[Iterable[nn.Parameter]], torch.optim.Optimizer]
    train_loader: Callable[[int, int], DataLoader]
    loss: Callable[[nn.Module, Batch], Tensor]
    evaluate: Callable[[nn.Module, int], dict[str, float]]
    warmup: int
    steps: int
    eval_every: int
    target_loss: float
    what: str
    target_acc: Optional[float] = None


def classification_loss(model: nn.Module, batch: Batch) -> Tensor:
    inputs, labels = batch
    return nn.functional.cross_entropy(model(inputs), labels)


@torch.no_grad()
def score(model: nn.Module, inputs: Tensor, labels: Tensor) -> dict[str, float]:
    model.eval()
    logits = model(inputs)
    model.train()
    loss = nn.functional.cross_entropy(logits, labels).item()
    return {"loss": loss, "acc": (logits.argmax(1) == labels).float().mean().item()}


# ---------------------------------------------------------------- (1) MLP, synthetic, communication-bound
MLP_SAMPLES = 32 * 1000  # SyntheticMLP's default: rank r's inputs are shifted by 0.5 r (non-identical)


def mlp_loader(rank: int, world_size: int) -> DataLoader:
    data = SyntheticClassification(MLP_SAMPLES, rank=rank)
    return DataLoader(data, batch_size=32, shuffle=True, generator=torch.Generator().manual_seed(rank))


@cache
def mlp_eval_set(world_size: int) -> tuple[Tensor, Tensor]:
    """The first 2,048 samples of every rank's data: the objective all ranks train together."""
    sets = [SyntheticClassification(MLP_SAMPLES, rank=r) for r in range(world_size)]
    return torch.cat([s.x[:2048] for s in sets]), torch.cat([s.y[:2048] for s in sets])


MLP = Workload(
    build_model=mlp,
    make_optimizer=lambda params: torch.optim.SGD(params, lr=0.01, momentum=0.9),
    train_loader=mlp_loader,
    loss=classification_loss,
    evaluate=lambda model, world: score(model, *mlp_eval_set(world)),
    warmup=32,
    steps=256,
    eval_every=16,
    target_loss=1.8,
    what="1,317,898-parameter MLP, synthetic data (inputs shifted per rank), batch 32, SGD momentum 0.9",
)


# ---------------------------------------------------------------- (2) CNN, bundled digits, label-sorted shards
@cache
def digits() -> tuple[Any, Any]:
    return load_images("digits")


def digits_loader(rank: int, world_size: int) -> DataLoader:
    train, _ = digits()
    sampler = NonIIDSampler(train.tensors[1], num_replicas=world_size, rank=rank, scheme="label_sorted")
    return DataLoader(train, batch_size=32, sampler=sampler, drop_last=True)


def digits_score(model: nn.Module, world_size: int) -> dict[str, float]:
    train, test = digits()
    loss = score(model, *train.tensors)["loss"]  # the global training objective, every rank's shard at once
    return {"loss": loss, "acc": score(model, *test.tensors)["acc"]}  # accuracy on held-out digits


CNN = Workload(
    # PyTorch's MNIST-example shape: 1.08 M parameters, 4.3 MB a round. The demo's 40 k-parameter CNN is 160 kB,
    # which a 200 Mbit/s link carries in a few training steps: no workload for a lab about slow links.
    build_model=lambda: DigitsCNN(channels=(32, 64), hidden=1024),
    make_optimizer=lambda params: torch.optim.SGD(params, lr=0.01, momentum=0.9, weight_decay=1e-4),
    train_loader=digits_loader,
    loss=classification_loss,
    evaluate=digits_score,
    warmup=32,
    steps=512,
    eval_every=8,
    target_loss=0.15,
    target_acc=0.95,
    what="DigitsCNN (1,078,666 parameters), sklearn digits, label-sorted across ranks, batch 32, SGD momentum 0.9",
)


# ---------------------------------------------------------------- (3) Transformer LM on the stdlib's source
@cache
def corpus() -> tuple[Tensor, Tensor]:
    return lm.split_corpus(lm.stdlib_corpus())


def lm_loader(rank: int, world_size: int) -> DataLoader:
    train, _ = corpus()
    return DataLoader(lm.TextWindows(train, seq_len=64, count=16 * 2000, seed=rank), batch_size=16)


@torch.no_grad()
def lm_score(model: nn.Module, world_size: int) -> dict[str, float]:
    _, val = corpus()
    inputs, targets = zip(*lm.TextWindows(val, seq_len=64, count=256, seed=12345))
    model.eval()
    loss = lm.lm_loss(model, (torch.stack(inputs), torch.stack(targets))).item()
    model.train()
    return {"loss": loss}


LM = Workload(
    build_model=lambda: lm.CausalTransformer(),
    make_optimizer=lambda params: torch.optim.Adam(params, lr=2e-3),
    train_loader=lm_loader,
    loss=lm.lm_loss,
    evaluate=lm_score,
    warmup=32,
    steps=256,
    eval_every=16,
    target_loss=2.4,
    what="byte-level causal Transformer (470,784 parameters) on the stdlib's .py files, 16 x 64 bytes, Adam",
)

WORKLOADS: dict[str, Workload] = {"mlp": MLP, "cnn": CNN, "lm": LM}
