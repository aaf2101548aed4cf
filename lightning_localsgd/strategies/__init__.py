"""Lightning strategies, one per algorithm, sharing :class:`LocalUpdateStrategy`."""

from lightning_localsgd.strategies.base import LocalUpdateStrategy
from lightning_localsgd.strategies.local_sgd import LocalSGDStrategy
from lightning_localsgd.strategies.vrl_sgd import VRLSGDStrategy

__all__ = ["LocalSGDStrategy", "LocalUpdateStrategy", "VRLSGDStrategy"]
