"""lightning-localsgd: communication-efficient data-parallel training for PyTorch Lightning.

Importing the package registers the strategy names with Lightning's Trainer and with Fabric: ``local_sgd``,
``vrl_sgd``, ``overlap_local_sgd``, ``cocod_sgd``, ``liec_sgd``, ``ef_sign``, ``dpsgd``, ``detag``, ``diloco``,
``stl_sgd``, ``hierarchical_local_sgd``. Plain PyTorch loops use :class:`LocalSGDOptimizer`.
"""

from lightning.pytorch.strategies import StrategyRegistry

from lightning_localsgd import fabric, hooks
from lightning_localsgd.algorithms import (
    DPSGD,
    LIECSGD,
    STLSGD,
    VRLSGD,
    CoCoDSGD,
    DeTAG,
    DiLoCo,
    ErrorFeedbackSGD,
    HierarchicalLocalSGD,
    LocalSGD,
    OverlapLocalSGD,
)
from lightning_localsgd.callbacks import RoundCheckpoint
from lightning_localsgd.data import NonIIDSampler
from lightning_localsgd.dropit import DropITCallback, apply_dropit, remove_dropit
from lightning_localsgd.optim import LocalSGDOptimizer
from lightning_localsgd.strategies import (
    ALL_STRATEGIES,
    CoCoDSGDStrategy,
    DeTAGStrategy,
    DiLoCoStrategy,
    DPSGDStrategy,
    ErrorFeedbackStrategy,
    HierarchicalLocalSGDStrategy,
    LIECSGDStrategy,
    LocalSGDStrategy,
    LocalUpdateStrategy,
    OverlapLocalSGDStrategy,
    STLSGDStrategy,
    VRLSGDStrategy,
)
from lightning_localsgd.strategies.sharded_checkpoint import consolidate_checkpoint

__version__ = "0.1.0"

for _strategy in ALL_STRATEGIES:
    _strategy.register_strategies(StrategyRegistry)
fabric.register_fabric_strategies()  # the same names for `Fabric(strategy=...)`

__all__ = [
    "DPSGD",
    "LIECSGD",
    "STLSGD",
    "VRLSGD",
    "CoCoDSGD",
    "CoCoDSGDStrategy",
    "DPSGDStrategy",
    "DeTAG",
    "DeTAGStrategy",
    "DiLoCo",
    "DiLoCoStrategy",
    "DropITCallback",
    "ErrorFeedbackSGD",
    "ErrorFeedbackStrategy",
    "HierarchicalLocalSGD",
    "HierarchicalLocalSGDStrategy",
    "LIECSGDStrategy",
    "LocalSGD",
    "LocalSGDOptimizer",
    "LocalSGDStrategy",
    "LocalUpdateStrategy",
    "NonIIDSampler",
    "OverlapLocalSGD",
    "OverlapLocalSGDStrategy",
    "RoundCheckpoint",
    "STLSGDStrategy",
    "VRLSGDStrategy",
    "__version__",
    "apply_dropit",
    "consolidate_checkpoint",
    "fabric",
    "hooks",
    "remove_dropit",
]
