"""Lightning Fabric entry point: ``Fabric(strategy="vrl_sgd")`` and every other name, or a class with arguments.

::

    fabric = Fabric(accelerator="cpu", devices=2, strategy=lightning_localsgd.fabric.VRLSGDStrategy(period=20))
    fabric.launch()
    model, optimizer = fabric.setup(model, optimizer)            # one call for the model and all its optimizers
    for batch in loader:
        fabric.backward(loss(model, batch)); optimizer.step(); optimizer.zero_grad()
    with fabric.strategy.consensus():                            # evaluate the average of the replicas
        evaluate(model)
    fabric.save("ckpt.pt", {"model": model, "optimizer": optimizer})   # the average + every rank's own state
    fabric.strategy.finalize()                                   # every rank keeps the average

Importing ``lightning_localsgd`` registers the names with Fabric's registry.
"""

from lightning.fabric.strategies import STRATEGY_REGISTRY

from lightning_localsgd import strategies as _trainer
from lightning_localsgd.fabric.strategy import FabricLocalUpdateStrategy
from lightning_localsgd.fabric.variants import NamedFabricStrategy, fabric_variant

LocalSGDStrategy = fabric_variant(_trainer.LocalSGDStrategy)
VRLSGDStrategy = fabric_variant(_trainer.VRLSGDStrategy)
OverlapLocalSGDStrategy = fabric_variant(_trainer.OverlapLocalSGDStrategy)
CoCoDSGDStrategy = fabric_variant(_trainer.CoCoDSGDStrategy)
LIECSGDStrategy = fabric_variant(_trainer.LIECSGDStrategy)
ErrorFeedbackStrategy = fabric_variant(_trainer.ErrorFeedbackStrategy)
DPSGDStrategy = fabric_variant(_trainer.DPSGDStrategy)
DeTAGStrategy = fabric_variant(_trainer.DeTAGStrategy)
DiLoCoStrategy = fabric_variant(_trainer.DiLoCoStrategy)
STLSGDStrategy = fabric_variant(_trainer.STLSGDStrategy)
HierarchicalLocalSGDStrategy = fabric_variant(_trainer.HierarchicalLocalSGDStrategy)

ALL_FABRIC_STRATEGIES: tuple[type[NamedFabricStrategy], ...] = (
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
assert {cls.trainer_strategy for cls in ALL_FABRIC_STRATEGIES} == set(_trainer.ALL_STRATEGIES), "a strategy is missing"


def register_fabric_strategies() -> None:
    for strategy in ALL_FABRIC_STRATEGIES:
        strategy.register_strategies(STRATEGY_REGISTRY)


def log_comm_metrics(fabric: object, step: int) -> None:
    """Log the strategy's communication counters to Fabric's loggers (``fabric.log_dict``)."""
    strategy = getattr(fabric, "strategy", None)
    if not isinstance(strategy, FabricLocalUpdateStrategy):
        raise TypeError(f"The Fabric's strategy is {type(strategy).__name__}, not one of lightning_localsgd's.")
    fabric.log_dict(strategy.comm_metrics(), step=step)  # type: ignore[attr-defined]


__all__ = [
    "ALL_FABRIC_STRATEGIES",
    "CoCoDSGDStrategy",
    "DPSGDStrategy",
    "DeTAGStrategy",
    "DiLoCoStrategy",
    "ErrorFeedbackStrategy",
    "FabricLocalUpdateStrategy",
    "HierarchicalLocalSGDStrategy",
    "LIECSGDStrategy",
    "LocalSGDStrategy",
    "NamedFabricStrategy",
    "OverlapLocalSGDStrategy",
    "STLSGDStrategy",
    "VRLSGDStrategy",
    "log_comm_metrics",
    "register_fabric_strategies",
]
