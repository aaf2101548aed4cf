"""Profiler labels around each phase of a synchronisation, so a trace shows where a round's time goes.

``torch.profiler.record_function`` ranges named ``lightning_localsgd/<phase>``; they cost about a microsecond each
when no profiler runs. Phases: ``round/settle`` (waiting for the previous round's transfer), ``round/guard`` (the
flag collective), ``round/rollback_point`` (copies kept under ``on_nonfinite="skip_round"``), ``round/update`` (the
algorithm's round: averaging, or starting a transfer), ``warmup/gradients``, ``warmup/buffers``,
``exchange`` (a per-step gradient exchange), ``gossip`` (a per-step neighbour exchange), ``consensus``, ``final``.
"""

from __future__ import annotations

from torch.profiler import record_function

PREFIX = "lightning_localsgd/"


def phase(name: str) -> record_function:
    """A profiler range for one phase (use as a context manager)."""
    return record_function(PREFIX + name)
