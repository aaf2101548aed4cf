"""The two figures of a lab run: loss against wall-clock seconds, and loss against MB sent."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only: no display on the machines this runs on
import matplotlib.pyplot as plt  # after choosing the backend


def style(label: str, index: int) -> dict[str, Any]:
    """Ours solid, peers dashed, no-communication references dotted; one colour per table row."""
    color = plt.get_cmap("tab10")(index % 10)
    if label.startswith(("compute limit", "Lightning 1 process")):
        return {"linestyle": ":", "color": "black" if label.startswith("compute") else "grey"}
    if label.startswith(("Lightning DDP", "torch")):
        return {"linestyle": "--", "color": color}
    return {"linestyle": "-", "linewidth": 2, "color": color}


def plot(rows: list[dict[str, Any]], x: str, out: Path, title: str, target: float) -> None:
    """``x`` is ``"seconds"`` or ``"mb"``, both on log axes: the peers differ by orders of magnitude there.

    The starting point (step 0) cannot sit on a log axis and is left out; so are peers that send nothing
    from the MB plot. Ours are drawn first, so a peer with the same trajectory stays visible on top (dashed).
    """
    fig, ax = plt.subplots(figsize=(8, 5), dpi=110)
    styles = {r["label"]: style(r["label"], i) for i, r in enumerate(rows)}
    for r in sorted(rows, key=lambda r: styles[r["label"]]["linestyle"] != "-"):
        if "error" in r or r["label"].startswith(("compute, every rank", "compute limit, again")):  # repeats
            continue
        points = [p for p in r["points"] if p["step"] > 0 and p[x] > 0]
        if not points:
            continue
        ax.plot([p[x] for p in points], [p["loss"] for p in points], marker=".", label=r["label"], **styles[r["label"]])
    ax.axhline(target, color="black", linewidth=0.8, alpha=0.6)
    ax.annotate(f"target {target:g}", (0.99, target), xycoords=("axes fraction", "data"), ha="right", va="bottom")
    ax.set_xscale("log")
    ax.set_xlabel("MB sent per rank (log scale)" if x == "mb" else "training wall-clock seconds, rank 0 (log scale)")
    ax.set_ylabel("loss of the averaged model")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out)
    plt.close(fig)
