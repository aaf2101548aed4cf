"""lightning-localsgd: communication-efficient data-parallel training for PyTorch Lightning.

Importing the package registers the strategy names (``local_sgd``, ``vrl_sgd``) with Lightning.
"""

from lightning.pytorch.strategies import StrategyRegistry

from lightning_localsgd.algorithms import VRLSGD, LocalSGD
from lightning_localsgd.data import NonIIDSampler
from lightning_localsgd.strategies import LocalSGDStrategy, LocalUpdateStrategy, VRLSGDStrategy

__version__ = "0.1.0"

for _strategy in (LocalSGDStrategy, VRLSGDStrategy):
    _strategy.register_strategies(StrategyRegistry)

__all__ = [
    "VRLSGD",
    "LocalSGD",
    "LocalSGDStrategy",
    "LocalUpdateStrategy",
    "NonIIDSampler",
    "VRLSGDStrategy",
    "__version__",
]
