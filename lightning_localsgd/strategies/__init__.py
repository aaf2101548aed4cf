"""Lightning strategies, one per algorithm, sharing :class:`LocalUpdateStrategy`."""

from lightning_localsgd.strategies.base import LocalUpdateStrategy
from lightning_localsgd.strategies.cocod_sgd import CoCoDSGDStrategy
from lightning_localsgd.strategies.detag import DeTAGStrategy
from lightning_localsgd.strategies.diloco import DiLoCoStrategy
from lightning_localsgd.strategies.dpsgd import DPSGDStrategy
from lightning_localsgd.strategies.ef_sgd import ErrorFeedbackStrategy
from lightning_localsgd.strategies.hierarchical import HierarchicalLocalSGDStrategy
from lightning_localsgd.strategies.liec_sgd import LIECSGDStrategy
from lightning_localsgd.strategies.local_sgd import LocalSGDStrategy
from lightning_localsgd.strategies.overlap_local_sgd import OverlapLocalSGDStrategy
from lightning_localsgd.strategies.stl_sgd import STLSGDStrategy
from lightning_localsgd.strategies.vrl_sgd import VRLSGDStrategy

ALL_STRATEGIES = (
    LocalSGDStrategy,
    VRLSGDStrategy,
    OverlapLocalSGDStrategy,
    CoCoDSGDStrategy,
    LIECSGDStrategy,
    ErrorFeedbackStrategy,
    DPSGDStrategy,
    DeTAGStrategy,
    DiLoCoStrategy,
    STLSGDStrategy,
    HierarchicalLocalSGDStrategy,
)

__all__ = [
    "ALL_STRATEGIES",
    "CoCoDSGDStrategy",
    "DPSGDStrategy",
    "DeTAGStrategy",
    "DiLoCoStrategy",
    "ErrorFeedbackStrategy",
    "HierarchicalLocalSGDStrategy",
    "LIECSGDStrategy",
    "LocalSGDStrategy",
    "LocalUpdateStrategy",
    "OverlapLocalSGDStrategy",
    "STLSGDStrategy",
    "VRLSGDStrategy",
]
