"""DropIT on the CNN workload: activation memory saved and accuracy kept, against the same run without it.

    python -m benchmarks.dropit [--gammas 0.5 0.7 0.9] [--skip-gammas 0.7 0.9] [--steps 880] [--seeds 0 1 2]

One process (DropIT acts per rank, whatever the strategy): DigitsCNN (1.08 M parameters) on sklearn's digits,
batch 32, SGD momentum 0.9, the same seed, batches and steps for every gamma. Per configuration: the bytes autograd
keeps for backward in one training step (whole model; and the swapped layers' own inputs alone), the test accuracy
and final training loss (mean and spread over the seeds) and the time per step. Writes dropit.json and dropit.md
to ``--out`` (default results/dropit). A benchmark, not a test.

``--skip-gammas``: runs with the layers whose input a ReLU keeps alive anyway left dense (``RELU_FED``): a ReLU
saves its output for backward, and that output is the next layer's input, so DropIT's sparse copy of it frees
nothing and only adds its own bytes.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
import warnings
from pathlib import Path
from typing import Any, Optional

import torch
from torch import nn

from benchmarks.simulated import batches_forever
from benchmarks.workloads import CNN
from lightning_localsgd.dropit import SavedTensorBytes, apply_dropit

RELU_FED = ["features.2", "classifier.2"]  # DigitsCNN's second convolution and last linear layer


def layer_input_bytes(model: nn.Module, batch: Any, swapped: list[str]) -> int:
    """What the swapped layers alone keep of their inputs in one step: each layer run by itself on the input it
    sees in the model (the whole-model figure hides it where another op keeps the same tensor alive)."""
    layers = dict(model.named_modules())
    inputs: dict[str, torch.Tensor] = {}

    def keep(name: str) -> Any:
        def hook(module: nn.Module, args: tuple, output: Any) -> None:  # None: the output is left as it is
            inputs[name] = args[0].detach()

        return hook

    hooks = [layers[name].register_forward_hook(keep(name)) for name in swapped]
    with torch.no_grad():
        CNN.loss(model, batch)
    for hook in hooks:
        hook.remove()
    total = 0
    for name in swapped:
        with SavedTensorBytes(layers[name]) as saved:
            layers[name](inputs[name])
        total += saved.bytes
    return total


def run(gamma: Optional[float], skip: list[str], seed: int, steps: int) -> dict[str, Any]:
    torch.manual_seed(seed)
    model = CNN.build_model()
    batches = batches_forever(CNN.train_loader(0, 1))
    first = next(batches)
    targets = [n for n, m in model.named_modules() if type(m) in (nn.Linear, nn.Conv2d) and n not in skip]
    dense_layer_bytes = layer_input_bytes(model, first, targets)
    if gamma is not None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # float32 at gamma 0.5 saves nothing: that row shows it
            apply_dropit(model, gamma, skip)
    optimizer = CNN.make_optimizer(model.parameters())
    with SavedTensorBytes(model) as saved:
        loss = CNN.loss(model, first)
    loss.backward()  # frees the graph measured; the gradients are cleared before the first step below
    layer_bytes = layer_input_bytes(model, first, targets)
    batches = batches_forever(CNN.train_loader(0, 1))
    start = time.perf_counter()
    for _ in range(steps):
        optimizer.zero_grad()
        loss = CNN.loss(model, next(batches))
        loss.backward()
        optimizer.step()
    seconds = time.perf_counter() - start
    scores = CNN.evaluate(model, 1)
    return {
        "saved_bytes": saved.bytes,
        "layer_input_bytes": layer_bytes,
        "dense_layer_input_bytes": dense_layer_bytes,
        "ms_per_step": 1000 * seconds / steps,
        "train_loss": scores["loss"],
        "test_acc": scores["acc"],
    }


def summarise(
    gamma: Optional[float], skip: list[str], runs: list[dict[str, Any]], dense: Optional[dict[str, Any]]
) -> dict[str, Any]:
    accs = [r["test_acc"] for r in runs]
    row = {
        "gamma": gamma,
        "skip": skip,
        "saved_bytes": runs[0]["saved_bytes"],
        "layer_input_bytes": runs[0]["layer_input_bytes"],
        "test_acc_mean": statistics.mean(accs),
        "test_acc_min": min(accs),
        "test_acc_max": max(accs),
        "train_loss_mean": statistics.mean(r["train_loss"] for r in runs),
        "ms_per_step": statistics.median(r["ms_per_step"] for r in runs),
        "runs": runs,
    }
    base = dense or row
    row["saved_ratio"] = row["saved_bytes"] / base["saved_bytes"]
    row["layer_input_ratio"] = row["layer_input_bytes"] / runs[0]["dense_layer_input_bytes"]
    return row


def markdown(rows: list[dict[str, Any]], seeds: list[int], steps: int) -> str:
    lines = [
        f"DigitsCNN (1.08 M parameters), sklearn digits, batch 32, SGD momentum 0.9, {steps} steps, seeds {seeds}.",
        "",
        "| run | saved for backward per step (KB) | vs dense | swapped layers' inputs (KB) | vs dense |"
        " test accuracy (mean, min-max) | final train loss | ms per step |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        name = "dense" if r["gamma"] is None else f"DropIT gamma={r['gamma']}"
        name += f", skip {', '.join(r['skip'])}" if r["skip"] else ""
        lines.append(
            f"| {name} | {r['saved_bytes'] / 1024:.1f} | {r['saved_ratio']:.3f} | {r['layer_input_bytes'] / 1024:.1f}"
            f" | {r['layer_input_ratio']:.3f} | {100 * r['test_acc_mean']:.2f} % ({100 * r['test_acc_min']:.2f}-"
            f"{100 * r['test_acc_max']:.2f}) | {r['train_loss_mean']:.4f} | {r['ms_per_step']:.2f} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gammas", type=float, nargs="+", default=[0.5, 0.7, 0.9])
    parser.add_argument("--skip-gammas", type=float, nargs="*", default=[0.7, 0.9], help="again, RELU_FED skipped")
    parser.add_argument("--steps", type=int, default=880, help="training steps (44 a pass over the digits)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=Path("results/dropit"))
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    rows: list[dict[str, Any]] = []
    configs = [(None, []), *((g, []) for g in args.gammas), *((g, RELU_FED) for g in args.skip_gammas)]
    for gamma, skip in configs:
        runs = [run(gamma, skip, seed, args.steps) for seed in args.seeds]
        rows.append(summarise(gamma, skip, runs, rows[0] if rows else None))
        print(markdown(rows[-1:], args.seeds, args.steps).splitlines()[-1], flush=True)
    table = markdown(rows, args.seeds, args.steps)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "dropit.json").write_text(json.dumps(rows, indent=2))
    (args.out / "dropit.md").write_text(table)
    print(table)


if __name__ == "__main__":
    main()
