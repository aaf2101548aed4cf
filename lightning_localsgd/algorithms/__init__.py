"""Algorithm cores: plain PyTorch, one module per paper, no Lightning import."""

from lightning_localsgd.algorithms.cocod_sgd import CoCoDSGD
from lightning_localsgd.algorithms.detag import DeTAG
from lightning_localsgd.algorithms.diloco import DiLoCo
from lightning_localsgd.algorithms.dpsgd import DPSGD
from lightning_localsgd.algorithms.ef_sgd import ErrorFeedbackSGD
from lightning_localsgd.algorithms.hierarchical import HierarchicalLocalSGD
from lightning_localsgd.algorithms.liec_sgd import LIECSGD
from lightning_localsgd.algorithms.local_sgd import LocalSGD
from lightning_localsgd.algorithms.overlap_local_sgd import OverlapLocalSGD
from lightning_localsgd.algorithms.periodic import PeriodicAlgorithm
from lightning_localsgd.algorithms.stl_sgd import STLSGD
from lightning_localsgd.algorithms.vrl_sgd import VRLSGD

__all__ = [
    "DPSGD",
    "LIECSGD",
    "STLSGD",
    "VRLSGD",
    "CoCoDSGD",
    "DeTAG",
    "DiLoCo",
    "ErrorFeedbackSGD",
    "HierarchicalLocalSGD",
    "LocalSGD",
    "OverlapLocalSGD",
    "PeriodicAlgorithm",
]
