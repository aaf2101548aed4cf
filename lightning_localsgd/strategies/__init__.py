"""Lightning strategies, one per algorithm, sharing :class:`LocalUpdateStrategy`."""

from lightning_localsgd.strategies.base import LocalUpdateStrategy
from lightning_localsgd.strategies.cocod_sgd import CoCoDSGDStrategy
from lightning_localsgd.strategies.local_sgd import LocalSGDStrategy
from lightning_localsgd.strategies.overlap_local_sgd import OverlapLocalSGDStrategy
from lightning_localsgd.strategies.vrl_sgd import VRLSGDStrategy

ALL_STRATEGIES = (LocalSGDStrategy, VRLSGDStrategy, OverlapLocalSGDStrategy, CoCoDSGDStrategy)

__all__ = [
    "ALL_STRATEGIES",
    "CoCoDSGDStrategy",
    "LocalSGDStrategy",
    "LocalUpdateStrategy",
    "OverlapLocalSGDStrategy",
    "VRLSGDStrategy",
]
