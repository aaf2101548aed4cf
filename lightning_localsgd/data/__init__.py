"""Data utilities: non-identical splits across ranks."""

from lightning_localsgd.data.samplers import NonIIDSampler, split_indices

__all__ = ["NonIIDSampler", "split_indices"]
