"""Callbacks for runs that must survive: checkpoints at round boundaries, found again after a restart; and DropIT,
activation memory saved per rank under any strategy."""

from lightning_localsgd.callbacks.round_checkpoint import RoundCheckpoint
from lightning_localsgd.dropit.callback import DropITCallback

__all__ = ["DropITCallback", "RoundCheckpoint"]
