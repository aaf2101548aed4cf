"""Errors a run stops with. Each message says what happened, where (strategy, round, step, rank) and what to do."""

from __future__ import annotations


class NonFiniteError(RuntimeError):
    """A rank's parameters or gradients held inf/NaN at a synchronisation point; nothing was averaged."""

    def __init__(self, message: str, ranks: list[int], step: int) -> None:
        super().__init__(message)
        self.ranks = ranks
        self.step = step


class PeerFailureError(RuntimeError):
    """A collective failed or timed out: a peer rank died, is stuck, or the network between them broke."""


class OutOfStepError(RuntimeError):
    """Ranks reached different synchronisation points (different steps or kinds): their data or control flow differs."""


class RanksDisagreeError(RuntimeError):
    """Values every rank must share differ between ranks (learning rates, the set of trainable parameters)."""
