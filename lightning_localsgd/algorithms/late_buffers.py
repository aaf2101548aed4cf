"""Averaged buffers of the algorithms that apply a round one round late: they travel with the round's transfer.

Overlap Local-SGD, CoCoD-SGD and DiLoCo with ``overlap=True`` start a round's all-reduce and read its result at
the next round, so that no round waits for the other ranks. A blocking average of their averaged buffers
(normalisation running statistics, by default) at each round would bring that wait back: it is a meeting point
that waits for the later rank and, on a real link, for a round trip. So those buffers follow CoCoD-SGD's rule:

    at round k, once the transfer started at round k - 1 landed:
        b_i <- b_i + (mean_j s_j - s_i)        s_i: rank i's buffers when round k - 1 started them
        s_i <- b_i, and its average starts in the background with round k's transfer

A round leaves the mean of the ranks' buffers unchanged (the corrections sum to zero) and each rank keeps what its
own batches added since ``s_i``. Normalisation layers update their running statistics linearly (an exponential or
cumulative average of batch statistics, which do not depend on the running ones), so the mean over the ranks
follows the same sequence as with a blocking average at each round: every average of the replicas (evaluation,
checkpoint weights, the model after ``fit``) is unchanged. Buffers are packed in
their state precision (float32 for half-precision buffers), one tensor per device and dtype.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from lightning_localsgd.algorithms.precision import state_dtype
from lightning_localsgd.comm.flat import _grouped_by_layout, _pack


def _groups(buffers: Sequence[Tensor]) -> list[list[Tensor]]:
    """``buffers`` grouped by (device, dtype) as every packed collective groups them: one packed tensor each."""
    return [[buffers[i] for i in group] for group in _grouped_by_layout(buffers)]


def _pack_in_state_precision(group: list[Tensor]) -> Tensor:
    return _pack(group).to(state_dtype(group[0].dtype))


class LateBufferAverage:
    """One rank's buffers in flight: ``s_i`` (``sent``) and the tensors averaged into ``mean_j s_j`` (``means``)."""

    def __init__(self) -> None:
        self.sent: list[Tensor] = []
        self.means: list[Tensor] = []  # being averaged in the background; read only after the transfer settled

    @property
    def pending(self) -> bool:
        return bool(self.sent)

    def start(self, buffers: Sequence[Tensor]) -> list[Tensor]:
        """Take ``s_i`` from ``buffers``; returns the tensors to average with the round's transfer (none without
        buffers)."""
        with torch.no_grad():
            self.sent = [_pack_in_state_precision(group) for group in _groups(buffers)]
        self.means = [s.clone() for s in self.sent]
        return self.means

    def land_(self, buffers: Sequence[Tensor]) -> None:
        """``b_i += mean_j s_j - s_i``, once the transfer that carried ``means`` settled; then nothing is pending."""
        if not self.pending:
            return
        groups = _groups(buffers)
        if [sum(b.numel() for b in g) for g in groups] != [s.numel() for s in self.sent]:
            raise RuntimeError(
                "The model's averaged buffers changed between two rounds (added, removed or moved to another "
                "device or dtype); their pending average cannot be applied. Change buffers before `fit`."
            )
        with torch.no_grad():
            for group, sent, mean in zip(groups, self.sent, self.means):
                correction = mean - sent
                offset = 0
                for b in group:
                    part = correction[offset : offset + b.numel()].view(b.shape).to(b.device)
                    b.copy_(b.to(part.dtype) + part)  # rounded once into a half-precision buffer
                    offset += b.numel()
        self.clear()

    def clear(self) -> None:
        """Drop what is pending (after an average of every replica made the corrections moot: they sum to 0)."""
        self.sent, self.means = [], []

    def state_dict(self) -> dict[str, Any]:
        """What is pending, for a rank's checkpoint (call after the transfer settled)."""
        return {"sent": [s.clone() for s in self.sent], "means": [m.clone() for m in self.means]}

    def load_state_dict(self, state: dict[str, Any] | None) -> None:
        """Restore :meth:`state_dict`; a checkpoint written before buffers travelled late has nothing pending."""
        state = state or {}
        self.sent = [s.clone() for s in state.get("sent", [])]
        self.means = [m.clone() for m in state.get("means", [])]
