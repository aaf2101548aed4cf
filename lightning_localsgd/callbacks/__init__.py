"""Callbacks for runs that must survive: checkpoints at round boundaries, found again after a restart."""

from lightning_localsgd.callbacks.round_checkpoint import RoundCheckpoint

__all__ = ["RoundCheckpoint"]
