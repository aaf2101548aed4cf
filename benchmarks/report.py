"""From the ranks' files to numbers: loss curves of the averaged replicas, table rows, the markdown table."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional

import torch
from torch import nn

from benchmarks.workloads import Workload


def load_ranks(run_dir: Path) -> list[dict[str, Any]]:
    files = sorted(run_dir.glob("rank*.json"), key=lambda p: int(p.stem[4:]))
    return [json.loads(p.read_text()) for p in files]


def sent_bytes(point: dict[str, float]) -> float:
    """What the network interface counted when there is one; the peer's cost model on loopback."""
    return point["wire_bytes"] if point["wire_bytes"] >= 0 else point["modelled_bytes"]


@torch.no_grad()
def curve(workload: Workload, run_dir: Path, ranks: list[dict[str, Any]]) -> list[dict[str, float]]:
    """One point per snapshot: the average of the ranks' replicas, scored by the workload.

    For the local-update peers this is the model a round at that moment would produce: replicas in between
    rounds are scored by their average, the same rule for every peer (for DDP all replicas are equal).
    """
    world = len(ranks)
    snapshots = torch.stack([torch.load(run_dir / f"rank{r['rank']}.pt") for r in ranks]).mean(0)
    torch.manual_seed(0)
    model = workload.build_model()
    points = []
    for i, vector in enumerate(snapshots):
        nn.utils.vector_to_parameters(vector, model.parameters())
        mb = sum(sent_bytes(r["points"][i]) - sent_bytes(r["points"][0]) for r in ranks) / world / 1e6
        meta = ranks[0]["points"][i]  # rank 0's clock; the ranks meet at every round
        points.append({"step": meta["step"], "seconds": meta["seconds"], "mb": mb, **workload.evaluate(model, world)})
    return points


def time_to(points: list[dict[str, float]], target: float) -> Optional[float]:
    return next((p["seconds"] for p in points if p["loss"] <= target), None)


def time_to_acc(points: list[dict[str, float]], target: Optional[float]) -> Optional[float]:
    return None if target is None else next((p["seconds"] for p in points if p.get("acc", 0.0) >= target), None)


def row(
    label: str,
    ranks: list[dict[str, Any]],
    points: list[dict[str, float]],
    target: float,
    target_acc: Optional[float] = None,
) -> dict[str, Any]:
    wire = [r["wire_bytes_per_step"] for r in ranks]
    per_step = wire if all(w is not None for w in wire) else [r["modelled_bytes_per_step"] for r in ranks]
    return {
        "label": label,
        "wire": all(w is not None for w in wire),
        "world_size": len(ranks),
        "steps_per_s": min(r["steps_per_s"] for r in ranks),  # ranks in lockstep; the slowest sets the pace
        "mb_per_step": sum(per_step) / len(per_step) / 1e6,
        "modelled_mb_per_step": sum(r["modelled_bytes_per_step"] for r in ranks) / len(ranks) / 1e6,
        "time_to_target": time_to(points, target),
        "time_to_acc": time_to_acc(points, target_acc),
        "final_loss": points[-1]["loss"],
        "final_acc": points[-1].get("acc"),
        "train_seconds": points[-1]["seconds"],
        "points": points,
    }


def compute_limit(rows: list[dict[str, Any]]) -> Optional[float]:
    """The faster of the compute-limit measurements (before and after the peers): fractions err low."""
    limits = [r["steps_per_s"] for r in rows if r["label"].startswith("compute limit") and "error" not in r]
    return max(limits, default=None)


def seconds_or_not(value: Optional[float]) -> str:
    return "not reached" if value is None else f"{value:.1f}"


def blocking_bound(limit: float, mb_per_step: float, link_bits: float) -> float:
    """Steps/s of a peer that computes at the limit and then waits for every byte it sends to cross the link.

    Each direction of the link carries what one rank sends, so a step costs ``1 / limit`` plus the bytes' time.
    Waiting peers cannot beat this; peers that overlap communication with computation can.
    """
    return 1 / (1 / limit + mb_per_step * 1e6 * 8 / link_bits)


def markdown(
    rows: list[dict[str, Any]], target: float, target_acc: Optional[float] = None, link_bits: Optional[float] = None
) -> str:
    limit = compute_limit(rows)
    has_acc = any(r.get("final_acc") is not None for r in rows)
    wire = all(r.get("wire") for r in rows if "error" not in r and r["world_size"] > 1)
    sent = "MB sent per step per rank" + (" (wire)" if wire else " (cost model)")
    head = ["strategy", "steps/s", "of compute limit"]
    head += ["of the wait-for-every-byte bound"] if link_bits and limit else []
    head += [sent, f"time to loss <= {target:g} (s)"]
    head += [f"time to accuracy >= {100 * target_acc:g} % (s)"] if target_acc is not None else []
    head += ["final loss"]
    head += ["final accuracy"] if has_acc else []
    head += ["training s"]
    lines = ["| " + " | ".join(head) + " |", "|---" + "|---:" * (len(head) - 1) + "|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['label']} | failed: {r['error']} |" + " |" * (len(head) - 2))
            continue
        fraction = f"{100 * r['steps_per_s'] / limit:.1f} %" if limit else "n/a"
        cells = [r["label"], f"{r['steps_per_s']:.1f}", fraction]
        if link_bits and limit:
            bound = blocking_bound(limit, r["mb_per_step"], link_bits)
            cells += [f"{100 * r['steps_per_s'] / bound:.0f} % of {bound:.1f}"]
        cells += [f"{r['mb_per_step']:.3f}"]
        cells += [seconds_or_not(r["time_to_target"])]
        cells += [seconds_or_not(r.get("time_to_acc"))] if target_acc is not None else []
        cells += [f"{r['final_loss']:.3f}"]
        cells += [f"{100 * r['final_acc']:.1f} %" if r.get("final_acc") is not None else ""] if has_acc else []
        cells += [f"{r['train_seconds']:.1f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)
