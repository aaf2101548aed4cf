"""Fabric: a ``DDPStrategy`` of Lightning Fabric whose synchronisation is done by a local-update algorithm.

Fabric keeps its own strategy classes and registry and has no training-loop hooks, so the moments are taken where
Fabric passes through its strategy: the model is not wrapped in ``DistributedDataParallel`` (``setup_module`` sets
the algorithm up instead), ``optimizer.step()`` runs the algorithm's pre-step exchange, the step and its correction,
and a training step ends (the round schedule counts it) with the step of the optimizer set up last. Evaluation and
the end of training are the user's loop's: :meth:`consensus` and :meth:`finalize`. ``fabric.save`` stores the
average as the weights and each rank's own state in a shard beside the file (the same layout as the Trainer's
checkpoints); ``fabric.load`` after ``fabric.setup`` restores every rank exactly.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from datetime import timedelta
from typing import Any, Callable, Optional, Union

import torch
import torch.distributed as dist
from lightning.fabric.accelerators import Accelerator
from lightning.fabric.plugins import CheckpointIO, ClusterEnvironment, Precision
from lightning.fabric.plugins.collectives.torch_collective import default_pg_timeout
from lightning.fabric.strategies import DDPStrategy
from lightning.fabric.strategies.strategy import _BackwardSyncControl
from lightning.fabric.utilities.rank_zero import rank_zero_warn
from lightning.fabric.utilities.types import _PATH
from torch import Tensor, nn
from torch.optim import Optimizer
from typing_extensions import override

from lightning_localsgd._validation import check_positive_float
from lightning_localsgd.algorithms.periodic import PeriodicAlgorithm
from lightning_localsgd.comm import CommStats, ProcessGroupCommunicator
from lightning_localsgd.comm.layout import WorldLayout
from lightning_localsgd.driving import comm_metrics, rank_payload, restore_rank_payload, step_and_follow
from lightning_localsgd.strategies.checkpointing import (
    CHECKPOINT_KEY,
    read_rank_state,
    remove_stale_shards,
    write_shards,
)
from lightning_localsgd.strategies.rendezvous import init_process_group
from lightning_localsgd.strategies.safety import (
    as_timeout,
    check_supported_device,
    check_supported_model,
    check_supported_optimizers,
    grad_scaler_of,
)
from lightning_localsgd.strategies.sharded_checkpoint import (
    MODEL_KEY,
    PER_RANK_KEY,
    load_consensus_into,
    save_consensus,
)
from lightning_localsgd.strategies.sharding import ReplicaGroups, local_optimizer_state, sharded_optimizer_state


class _NothingToSkip(_BackwardSyncControl):
    """``fabric.no_backward_sync``: backward never communicates here (warm-up averages at the step), so there is
    nothing to skip under gradient accumulation."""

    @override
    def no_backward_sync(self, module: nn.Module, enabled: bool) -> Any:
        return nullcontext()


class FabricLocalUpdateStrategy(DDPStrategy):
    """Fabric strategy driving ``algorithm`` (any of this package's, e.g. ``VRLSGD(period=20)``).

    The named strategies (``Fabric(strategy="vrl_sgd")``, :class:`lightning_localsgd.fabric.VRLSGDStrategy`, ...)
    build their algorithm from plain values, as the Trainer's do.

    Args:
        algorithm: a fresh algorithm instance.
        on_nonfinite: ``"raise"`` or ``"skip_round"``, as for the Trainer's strategies.
        collective_timeout: seconds a collective of the algorithm may wait for a peer before the run stops.
        init_timeout: seconds every rank has to start and check in at start-up; then an error says which are missing.
        groups: replica groups (``shard_size`` > 1: FSDP2 inside each group), as the named strategies build them from
            ``shard_size=...``; None: a full replica per rank. Call ``fabric.setup_module(model)``, then build the
            optimizer from the sharded ``model.parameters()`` and ``fabric.setup_optimizers(optimizer)``.
        Remaining arguments: as Fabric's :class:`~lightning.fabric.strategies.DDPStrategy`.
    """

    def __init__(
        self,
        algorithm: PeriodicAlgorithm,
        on_nonfinite: str = "raise",
        collective_timeout: float = 600.0,
        init_timeout: float = 300.0,
        accelerator: Optional[Accelerator] = None,
        parallel_devices: Optional[list[torch.device]] = None,
        cluster_environment: Optional[ClusterEnvironment] = None,
        checkpoint_io: Optional[CheckpointIO] = None,
        precision: Optional[Precision] = None,
        process_group_backend: Optional[str] = None,
        timeout: Union[float, timedelta, None] = default_pg_timeout,
        start_method: str = "popen",
        groups: Optional[ReplicaGroups] = None,
    ) -> None:
        super().__init__(
            accelerator=accelerator,
            parallel_devices=parallel_devices,
            cluster_environment=cluster_environment,
            checkpoint_io=checkpoint_io,
            precision=precision,
            process_group_backend=process_group_backend,
            timeout=as_timeout(timeout),
            start_method=start_method,  # type: ignore[arg-type]
        )
        algorithm.set_nonfinite_policy(on_nonfinite)
        self.algorithm = algorithm
        self.algorithm.label = f"{type(self).__name__} ({type(algorithm).__name__})"
        self.collective_timeout = timedelta(seconds=check_positive_float("collective_timeout", collective_timeout))
        self.algorithm.timeout = self.collective_timeout
        self.init_timeout = timedelta(seconds=check_positive_float("init_timeout", init_timeout))
        self._backward_sync_control = _NothingToSkip()
        self._module: Optional[nn.Module] = None
        self._optimizers: list[Optimizer] = []
        self._ending_optimizer: Optional[Optimizer] = None
        self._communicator: Optional[ProcessGroupCommunicator] = None
        # During a save: the consensus values that differ from the module's tensors (see `consensus_state`).
        self._saving_consensus: Optional[dict[int, Tensor]] = None
        self._groups = groups

    # ------------------------------------------------------------------ read-outs
    @property
    def rounds(self) -> int:
        return self.algorithm.rounds

    @property
    def comm_stats(self) -> CommStats:
        return self.algorithm.comm.stats if self.algorithm.is_set_up else CommStats()

    def comm_metrics(self) -> dict[str, float]:
        """``comm/rounds``, ``comm/mb_sent``, ``comm/seconds``, ... and the algorithm's own values: log them with
        ``fabric.log_dict(fabric.strategy.comm_metrics(), step=...)`` (or :func:`log_comm_metrics`)."""
        return comm_metrics(self.algorithm)

    # ------------------------------------------------------------------ set-up
    @override
    def setup_environment(self) -> None:
        check_supported_device(self.root_device, type(self).__name__)
        super().setup_environment()
        if self._groups is not None:
            self._groups.build_mesh(self.world_size, self.num_processes, self.root_device.type)

    @property
    def device_mesh(self) -> Any:
        """With ``shard_size`` > 1, the ``("replicate", "shard")`` mesh (after ``fabric.launch()``)."""
        if self._groups is None or self._groups.mesh is None:
            raise RuntimeError(f"{type(self).__name__} has a device mesh only with `shard_size` > 1, once launched.")
        return self._groups.mesh

    @override
    def setup_module_and_optimizers(  # type: ignore[override]
        self, module: nn.Module, optimizers: list[Optimizer], *args: Any, **kwargs: Any
    ) -> Any:  # Lightning >= 2.5 passes a scheduler too; 2.4 does not
        if self._groups is not None and optimizers:
            raise ValueError(
                f"{type(self).__name__} with `shard_size` > 1 shards the model in `fabric.setup_module`, which gives "
                "it new (sharded) parameters: an optimizer built before holds the old ones. Call `model = "
                "fabric.setup_module(model)`, then build the optimizer from `model.parameters()` and pass it to "
                "`fabric.setup_optimizers(optimizer)`."
            )
        return super().setup_module_and_optimizers(module, optimizers, *args, **kwargs)

    @override
    def _setup_distributed(self) -> None:
        # As Fabric's, on a store every rank checked in on within `init_timeout` (see strategies/rendezvous.py).
        self._set_world_ranks()
        self._process_group_backend = self._get_process_group_backend()
        init_process_group(self)

    @override
    def setup_module(self, module: nn.Module) -> nn.Module:  # type: ignore[override]
        """Collective: every rank starts from rank 0's model; the algorithm takes over its parameters (no DDP)."""
        name = type(self).__name__
        if self._module is not None and module is not self._module:
            raise ValueError(
                f"{name} drives one model, set up once; this is a second one. Put the models in one container "
                "(e.g. `nn.ModuleDict({'generator': g, 'discriminator': d})`) and call `fabric.setup(container, "
                "optimizer_g, optimizer_d)` once."
            )
        check_supported_model(module, name, fsdp_allowed=self._groups is not None)
        if self._communicator is None:
            group = dist.new_group(timeout=self.collective_timeout)
            self._communicator = ProcessGroupCommunicator(group, timeout=self.collective_timeout)
            layout = WorldLayout(self.num_nodes, self.num_processes, self.global_rank, node_rank=self.node_rank)
            self.algorithm.create_groups(layout, self.collective_timeout)
            if self._groups is not None:  # the algorithm averages over the ranks holding this rank's shard
                self._communicator = self._groups.communicator(
                    self._communicator, self.global_rank, self.collective_timeout
                )
                self.algorithm.set_guard_communicator(self._groups.world)
        scaler = grad_scaler_of(self.precision)
        self.algorithm.gradients_may_overflow = scaler is not None
        self.algorithm.grad_scale = scaler.get_scale if scaler is not None else None
        runs_on = self._groups.shard(module, self.algorithm.buffers) if self._groups is not None else module
        self.algorithm.setup(runs_on, self._communicator, self._optimizers)
        self._module = module
        return module

    @override
    def setup_optimizer(self, optimizer: Optimizer) -> Optimizer:
        check_supported_optimizers([optimizer], type(self).__name__)
        if not any(known is optimizer for known in self._optimizers):
            self._optimizers.append(optimizer)
            self._ending_optimizer = optimizer
        if self.algorithm.is_set_up:
            self.algorithm.register_optimizers(self._optimizers)
        return optimizer

    def end_step_after(self, optimizer: Optimizer) -> None:
        """Count a training step (and hold a round when due) after ``optimizer``'s steps rather than after the
        steps of the optimizer set up last (e.g. a GAN whose discriminator steps several times per generator step
        and whose rounds should follow the generator)."""
        if not any(known is optimizer for known in self._optimizers):
            raise ValueError(f"{type(self).__name__}: this optimizer was not set up with `fabric.setup`.")
        self._ending_optimizer = optimizer

    @property
    def _active(self) -> bool:
        return self._module is not None and self.algorithm.is_set_up

    # ------------------------------------------------------------------ the training step
    @override
    def optimizer_step(self, optimizer: Any, **kwargs: Any) -> Any:
        if not self._active or not any(known is optimizer for known in self._optimizers):
            return super().optimizer_step(optimizer, **kwargs)
        closure: Optional[Callable[[], Any]] = kwargs.get("closure")
        if closure is not None:

            def closure_then_exchange() -> Any:
                result = closure()
                self._before_optimizer_step(optimizer)
                return result

            kwargs["closure"] = closure_then_exchange
        else:
            self._before_optimizer_step(optimizer)

        def run_step() -> Any:
            return super(FabricLocalUpdateStrategy, self).optimizer_step(optimizer, **kwargs)

        output, counted = step_and_follow(self.algorithm, optimizer, run_step, grad_scaler_of(self.precision))
        if counted and optimizer is self._ending_optimizer:
            self.algorithm.end_step()
        return output

    def _before_optimizer_step(self, optimizer: Optimizer) -> None:
        if self._groups is None:
            self.algorithm.before_optimizer_step(optimizer)
        else:  # on this rank's shards
            self._groups.before_optimizer_step(self.algorithm, optimizer)

    def _reshard(self) -> None:
        if self._groups is not None:  # the next forward gathers what the shards hold now (see LocalShards.reshard)
            self._groups.reshard()

    # ------------------------------------------------------------------ consensus
    @contextmanager
    def consensus(self) -> Iterator[None]:
        """Collective: inside, the model holds the average of the replicas (evaluate here); each rank's own
        replica comes back on exit."""
        if not self._active:
            yield
            return
        self._reshard()
        try:
            with self.algorithm.consensus():
                yield
        finally:
            self._reshard()  # training's next forward gathers the replica back, not what evaluation gathered

    def finalize(self) -> None:
        """Collective, at the end of training: every rank keeps the average of the replicas."""
        if self._active:
            self._reshard()
            self.algorithm.finalize()

    # ------------------------------------------------------------------ checkpoints
    @override
    def get_module_state_dict(self, module: nn.Module) -> dict[str, Any]:
        state = super().get_module_state_dict(module)
        if not (self._active and module is self._module):
            return state
        values = self._saving_consensus
        if values is None:  # inside the consensus: copies, the replica comes back after
            return {key: value.detach().clone() if torch.is_tensor(value) else value for key, value in state.items()}
        # A save, written at once: the consensus where it differs from the module's tensors, which stay as they are.
        if self._groups is not None and self._groups.shards is not None:
            values = self._groups.shards.as_sharded(values)
        tensors = [*module.named_parameters(remove_duplicate=False), *module.named_buffers(remove_duplicate=False)]
        by_name = {name: values[id(t)] for name, t in tensors if id(t) in values}
        return {key: by_name.get(key, value) for key, value in state.items()}

    @override
    def save_checkpoint(
        self,
        path: _PATH,
        state: dict[str, Any],
        storage_options: Optional[Any] = None,
        filter: Optional[dict[str, Callable[[str, Any], bool]]] = None,
    ) -> None:
        if not self._active:
            return super().save_checkpoint(path, state, storage_options, filter)
        self._saving_consensus = self.algorithm.consensus_state()  # one copy of the model at most, no backup
        try:
            converted = self._convert_stateful_objects_in_state(state, filter=(filter or {}))
        finally:
            self._saving_consensus = None
        # Each rank writes its own shard (no tensor travels to rank 0); the main file names them.
        scaler = grad_scaler_of(self.precision)
        world = self._groups.world if self._groups is not None else None
        mine = rank_payload(  # written at once; what every rank holds alike only in rank 0's shard
            self.algorithm,
            self._optimizers,
            scaler,
            drop_replica=True,
            copy=False,
            shared_in_rank_0=not self.is_global_zero and world is None,
        )
        if world is not None:  # replica groups: every rank's optimizer state (its shards) in its own shard only
            mine["optimizer_states"] = [local_optimizer_state(optimizer) for optimizer in self._optimizers]
        section = write_shards(world or self.algorithm.comm, mine, path, type(self).__name__)
        if world is not None:  # the weights, written by every rank (strategies/sharded_checkpoint.py)
            modules = [key for key, obj in state.items() if isinstance(obj, nn.Module)]
            weights = {key: converted.pop(key) for key in modules}
            section[MODEL_KEY] = save_consensus(weights, path, section["token"])
            converted.update({key: {} for key in modules})
            per_rank = [key for key, obj in state.items() if isinstance(obj, Optimizer)]
            converted.update(dict.fromkeys(per_rank))  # their states: in each rank's shard
            section[PER_RANK_KEY] = per_rank
        converted[CHECKPOINT_KEY] = section
        if self.is_global_zero:
            self.checkpoint_io.save_checkpoint(checkpoint=converted, path=path, storage_options=storage_options)
            remove_stale_shards(path, section["token"])
        return None

    def _load_sharded(self, path: _PATH, state: dict[str, Any], weights_only: Optional[bool]) -> dict[str, Any]:
        """``load_checkpoint`` of a checkpoint written with replica groups: the weights through DCP into the (sharded)
        modules in place, each rank's optimizer state from its own shard, the rest from the main file."""
        extra = {} if weights_only is None else {"weights_only": weights_only}
        checkpoint = self.checkpoint_io.load_checkpoint(path, **extra)
        section = checkpoint.pop(CHECKPOINT_KEY, None)
        if not isinstance(section, dict) or MODEL_KEY not in section:
            raise ValueError(f"{type(self).__name__}: {str(path)!r} was not written with `shard_size` > 1.")
        modules = {key: obj for key, obj in state.items() if isinstance(obj, nn.Module) and key in checkpoint}
        load_consensus_into(modules, path, section)
        for name, obj in state.copy().items():
            if name not in checkpoint:
                continue
            value = checkpoint.pop(name)
            if isinstance(obj, (nn.Module, Optimizer)):
                continue  # the weights are in, the optimizers' states come from this rank's shard below
            if callable(getattr(obj, "load_state_dict", None)):
                obj.load_state_dict(value)
            else:
                state[name] = value
        if not self._active:
            return checkpoint
        rank_state = read_rank_state(section, path, self.global_rank, self.world_size, type(self).__name__)
        if rank_state is not None:
            saved = rank_state["optimizer_states"] or []
            rank_state["optimizer_states"] = [sharded_optimizer_state(s, o) for s, o in zip(saved, self._optimizers)]
            restore_rank_payload(
                rank_state, self.algorithm, self._optimizers, grad_scaler_of(self.precision), self.root_device
            )
        return checkpoint

    @override
    def load_checkpoint(
        self,
        path: _PATH,
        state: Optional[Union[nn.Module, Optimizer, dict[str, Any]]] = None,
        strict: bool = True,
        weights_only: Optional[bool] = None,
    ) -> dict[str, Any]:
        restores = isinstance(state, dict) and bool(state)
        if restores and self._active:
            self.algorithm.exit_consensus()
        if restores and self._groups is not None:
            assert isinstance(state, dict)
            return self._load_sharded(path, state, weights_only)
        # `weights_only` reaches strategies from Lightning 2.6 on; before, it is never given and the parent takes none.
        extra = {} if weights_only is None else {"weights_only": weights_only}
        remainder = super().load_checkpoint(path, state, strict=strict, **extra)
        if not restores:
            return remainder
        section = remainder.pop(CHECKPOINT_KEY, None)
        if not self._active:
            if section is not None:
                rank_zero_warn(
                    f"{type(self).__name__}: the checkpoint was loaded before `fabric.setup`, so every rank starts "
                    "from the averaged weights with fresh algorithm state. Load after `fabric.setup(...)` to "
                    "resume exactly."
                )
            return remainder
        rank_state = read_rank_state(section, path, self.global_rank, self.world_size, type(self).__name__)
        if rank_state is not None:
            # A shard saved in sync has no replica: the module keeps the main file's averaged weights, loaded above.
            restore_rank_payload(
                rank_state, self.algorithm, self._optimizers, grad_scaler_of(self.precision), self.root_device
            )
        return remainder
