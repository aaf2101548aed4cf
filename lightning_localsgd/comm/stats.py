"""Counters of what a rank sent over the network."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any


@dataclass
class CommStats:
    """Per-rank communication counters.

    Attributes:
        rounds: synchronisations the algorithm performed (a warm-up step counts as one round).
        collectives: collective calls issued (a round is one collective per bucket).
        bytes_sent: bytes this rank put on the wire, by the algorithm's cost model
            (ring all-reduce: ``2 (N - 1) / N`` times the payload).
        seconds: wall-clock seconds training was blocked on communication (blocking collectives, and waits
            for non-blocking ones).
        background_seconds: wall-clock seconds non-blocking collectives were in flight (start to completion).
        exchanges: per-step gradient exchanges (compressed steps of LIEC-SGD and EF-SGD; not warm-up steps).
        exchange_bytes_sent: the part of ``bytes_sent`` those exchanges put on the wire; the rest went to rounds,
            warm-up steps and consensus.
        wait_seconds: the part of ``seconds`` spent waiting for non-blocking collectives; the communication
            hidden behind computation is ``1 - wait_seconds / background_seconds``.
    """

    rounds: int = 0
    collectives: int = 0
    bytes_sent: int = 0
    seconds: float = 0.0
    background_seconds: float = 0.0
    wait_seconds: float = 0.0
    exchanges: int = 0
    exchange_bytes_sent: int = 0

    def as_metrics(self, prefix: str = "comm/", exchanges: bool = True) -> dict[str, float]:
        """The counters as metrics (bytes in MB). ``exchanges=False`` leaves out ``exchanges`` and
        ``exchange_mb_sent``, which stay 0 for algorithms that exchange nothing between rounds."""
        metrics = {
            f"{prefix}rounds": float(self.rounds),
            f"{prefix}collectives": float(self.collectives),
            f"{prefix}mb_sent": self.bytes_sent / 1e6,
            f"{prefix}seconds": self.seconds,
            f"{prefix}background_seconds": self.background_seconds,
            f"{prefix}wait_seconds": self.wait_seconds,
        }
        if exchanges:
            metrics[f"{prefix}exchanges"] = float(self.exchanges)
            metrics[f"{prefix}exchange_mb_sent"] = self.exchange_bytes_sent / 1e6
        return metrics

    def state_dict(self) -> dict[str, Any]:
        return asdict(self)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for key, value in state.items():
            if hasattr(self, key):  # tolerate checkpoints written by older or newer versions
                setattr(self, key, type(getattr(self, key))(value))
