"""Per-rank measurements: step times, bytes on the wire, and snapshots of the replica for the loss curves.

Training time excludes the snapshots themselves (a parameter copy), so taking them does not slow the curve
of a fast peer more than that of a slow one.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Callable, Optional

import torch
from torch import nn


def wire_counter(interface: Optional[str]) -> Optional[Callable[[], int]]:
    """Bytes this rank's interface has transmitted; None on loopback, where every process shares ``lo``."""
    if interface is None or interface == "lo":
        return None
    path = Path(f"/sys/class/net/{interface}/statistics/tx_bytes")
    return lambda: int(path.read_text())


class StepRecorder:
    """Call :meth:`start` before the first step and :meth:`step_done` after every optimizer step.

    Args:
        model: the replica whose parameters are snapshotted.
        warmup, steps: the throughput window is steps ``warmup + 1 .. warmup + steps``.
        eval_every: snapshot after every ``eval_every``-th step (and after the last).
        modelled_bytes: bytes sent so far by the peer's cost model (ring all-reduce: 2 (N-1)/N of a payload).
        wire_bytes: bytes sent so far as counted by the network interface (None on loopback).
    """

    def __init__(
        self,
        model: nn.Module,
        warmup: int,
        steps: int,
        eval_every: int,
        modelled_bytes: Callable[[], int],
        wire_bytes: Optional[Callable[[], int]],
    ) -> None:
        self.model, self.warmup, self.total, self.eval_every = model, warmup, warmup + steps, eval_every
        self.modelled_bytes, self.wire_bytes = modelled_bytes, wire_bytes
        self.count = 0
        self.paused = 0.0  # seconds spent snapshotting, taken off the training clock
        self.snapshots: list[torch.Tensor] = []
        self.points: list[dict[str, float]] = []
        self.window: dict[str, float] = {}
        self.step_ends: list[float] = []  # the training clock after each step, for per-period statistics
        self.t0 = 0.0
        self.extra: dict[str, object] = {}  # anything else a runner wants in rank<r>.json

    def start(self) -> None:
        self.t0 = time.perf_counter()
        self._snapshot()  # the common starting point of every curve

    def clock(self) -> float:
        return time.perf_counter() - self.t0 - self.paused

    def _bytes(self) -> dict[str, float]:
        wire = self.wire_bytes() if self.wire_bytes is not None else -1
        return {"modelled_bytes": float(self.modelled_bytes()), "wire_bytes": float(wire)}

    def _prefixed(self, prefix: str) -> dict[str, float]:
        return {f"{prefix}_{k}": v for k, v in self._bytes().items()}

    def _snapshot(self) -> None:
        begin = time.perf_counter()
        point = {"step": float(self.count), "seconds": begin - self.t0 - self.paused, **self._bytes()}
        self.snapshots.append(nn.utils.parameters_to_vector(self.model.parameters()).detach().clone())
        self.points.append(point)
        self.paused += time.perf_counter() - begin

    def step_done(self) -> None:
        self.count += 1
        self.step_ends.append(self.clock())
        if self.count == self.warmup:
            self.window = {"start": self.clock(), "start_cpu": time.process_time(), **self._prefixed("start")}
        if self.count == self.total:
            self.window.update({"end": self.clock(), "end_cpu": time.process_time(), **self._prefixed("end")})
        if self.count % self.eval_every == 0 or self.count == self.total:
            self._snapshot()

    def save(self, out: Path, rank: int, extra: dict) -> None:
        """``rank<r>.json`` (numbers) and ``rank<r>.pt`` (the snapshots) in ``out``."""
        w = self.window
        if "end" not in w:
            raise RuntimeError(f"rank {rank} stopped after {self.count} of {self.total} steps")
        steps = self.total - self.warmup
        seconds = w["end"] - w["start"]
        result = {
            "rank": rank,
            "steps": steps,
            "window_seconds": seconds,
            "steps_per_s": steps / seconds,
            # CPU of every thread of this process (the training thread, gloo's, the kernel's work on its behalf)
            "cpu_seconds_per_step": (w["end_cpu"] - w["start_cpu"]) / steps,
            "step_ends": self.step_ends[self.warmup - 1 :],
            "modelled_bytes_per_step": (w["end_modelled_bytes"] - w["start_modelled_bytes"]) / steps,
            "wire_bytes_per_step": (w["end_wire_bytes"] - w["start_wire_bytes"]) / steps
            if self.wire_bytes is not None
            else None,
            "points": self.points,
            **self.extra,
            **extra,
        }
        (out / f"rank{rank}.json").write_text(json.dumps(result, indent=1))
        torch.save(torch.stack(self.snapshots), out / f"rank{rank}.pt")
