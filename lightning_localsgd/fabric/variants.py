"""The named Fabric strategies: one per Trainer strategy, built from the same plain values by the same code.

``lightning_localsgd.fabric.VRLSGDStrategy(period=20)`` takes the arguments of the Trainer's
:class:`lightning_localsgd.VRLSGDStrategy` (validated by it, so both refuse the same bad values) plus Fabric's
``DDPStrategy`` arguments, and drives the algorithm that class builds.
"""

from __future__ import annotations

from datetime import timedelta
from typing import Any, Optional, Union

import torch
from lightning.fabric.accelerators import Accelerator
from lightning.fabric.plugins import CheckpointIO, ClusterEnvironment, Precision
from lightning.fabric.plugins.collectives.torch_collective import default_pg_timeout
from lightning.fabric.strategies.registry import _StrategyRegistry

from lightning_localsgd.fabric.strategy import FabricLocalUpdateStrategy
from lightning_localsgd.strategies import LocalUpdateStrategy


class NamedFabricStrategy(FabricLocalUpdateStrategy):
    """Base of the named Fabric strategies; ``trainer_strategy`` is the Trainer class whose algorithm it drives."""

    trainer_strategy: type[LocalUpdateStrategy]

    def __init__(
        self,
        *args: Any,
        accelerator: Optional[Accelerator] = None,
        parallel_devices: Optional[list[torch.device]] = None,
        cluster_environment: Optional[ClusterEnvironment] = None,
        checkpoint_io: Optional[CheckpointIO] = None,
        precision: Optional[Precision] = None,
        process_group_backend: Optional[str] = None,
        timeout: Union[float, timedelta, None] = default_pg_timeout,
        start_method: str = "popen",
        **kwargs: Any,
    ) -> None:
        # The Trainer class validates the values and builds the algorithm; nothing of it starts or launches.
        spec = self.trainer_strategy(*args, **kwargs)
        super().__init__(
            spec.algorithm,
            on_nonfinite=spec.algorithm.on_nonfinite,
            collective_timeout=spec.collective_timeout.total_seconds(),
            init_timeout=spec.init_timeout.total_seconds(),
            accelerator=accelerator,
            parallel_devices=parallel_devices,
            cluster_environment=cluster_environment,
            checkpoint_io=checkpoint_io,
            precision=precision,
            process_group_backend=process_group_backend,
            timeout=timeout,
            start_method=start_method,
            groups=spec._groups,
        )

    @classmethod
    def register_strategies(cls, strategy_registry: _StrategyRegistry) -> None:
        for name in cls.trainer_strategy.strategy_names:
            if name not in strategy_registry:  # importing twice must not fail
                strategy_registry.register(name, cls, description=cls.__doc__.splitlines()[0] if cls.__doc__ else "")


def fabric_variant(trainer_strategy: type[LocalUpdateStrategy]) -> type[NamedFabricStrategy]:
    """The Fabric strategy driving ``trainer_strategy``'s algorithm, with its name and arguments."""
    summary = (trainer_strategy.__doc__ or "").strip().splitlines()[0]
    variant = type(
        trainer_strategy.__name__,
        (NamedFabricStrategy,),
        {
            "trainer_strategy": trainer_strategy,
            "__doc__": f"{summary}\n\nFabric's counterpart of :class:`{trainer_strategy.__module__}."
            f"{trainer_strategy.__name__}`: its arguments plus Fabric's ``DDPStrategy`` arguments.",
            "__module__": __name__,
        },
    )
    return variant
