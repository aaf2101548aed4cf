"""The Lightning glue shared by every local-update strategy.

It translates Lightning's life cycle into the algorithm's moments and nothing more:

* the module is *not* wrapped in ``DistributedDataParallel``: no gradient all-reduce and no buffer
  broadcast happen behind the algorithm's back, on CPU as on CUDA (Lightning registers DDP comm hooks only
  on CUDA, so that route cannot be relied on);
* gradients are averaged inside the optimizer closure during warm-up (after backward, before clipping and
  ``optimizer.step``), the algorithm's correction runs right after each ``optimizer.step``, and the step is
  counted once per batch in which an optimizer stepped, from a callback that runs before every other
  ``on_train_batch_end`` (so ``ModelCheckpoint`` sees the post-round state);
* validation, test, prediction, checkpoint weights and the model left after ``fit`` are the average of
  the replicas; each rank's own state is stored in the checkpoint too, so resuming is exact.
"""

from __future__ import annotations

from datetime import timedelta
from typing import TYPE_CHECKING, Any, Callable, ClassVar, Literal, Optional, Union

import lightning.pytorch as pl
from lightning.fabric.plugins import CheckpointIO, ClusterEnvironment
from lightning.fabric.plugins.collectives.torch_collective import default_pg_timeout
from lightning.fabric.strategies.registry import _StrategyRegistry
from lightning.fabric.utilities.types import _PATH
from lightning.pytorch.plugins.precision import Precision
from lightning.pytorch.strategies import DDPStrategy
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities import rank_zero_warn
from torch.nn import Module
from torch.optim import Optimizer
from typing_extensions import override

from lightning_localsgd._validation import check_bool
from lightning_localsgd.algorithms.periodic import PeriodicAlgorithm
from lightning_localsgd.comm import CommStats, ProcessGroupCommunicator
from lightning_localsgd.strategies.checkpointing import (
    CHECKPOINT_KEY,
    pick_rank_state,
    rank_section,
    to_cpu,
    to_device,
)
from lightning_localsgd.strategies.round_callback import RoundCallback

if TYPE_CHECKING:
    from collections.abc import Mapping


class LocalUpdateStrategy(DDPStrategy):
    """Base class: a ``DDPStrategy`` whose synchronisation is done by a local-update algorithm.

    Subclasses build their algorithm in ``__init__`` (so bad arguments fail before any process starts) and
    register their names in :meth:`register_strategies`.

    Args:
        algorithm: the per-rank algorithm instance (not yet set up).
        log_comm_metrics: log ``comm/rounds``, ``comm/mb_sent``, ``comm/seconds`` and ``comm/collectives``
            to the trainer's loggers every ``log_every_n_steps`` steps and at the end of training.
        Remaining arguments: as :class:`~lightning.pytorch.strategies.DDPStrategy` (``timeout`` bounds every
        collective, so a dead peer becomes an error instead of a hang).
    """

    strategy_names: ClassVar[tuple[str, ...]] = ()

    def __init__(
        self,
        algorithm: PeriodicAlgorithm,
        log_comm_metrics: bool = True,
        accelerator: Optional[pl.accelerators.Accelerator] = None,
        parallel_devices: Optional[list[Any]] = None,
        cluster_environment: Optional[ClusterEnvironment] = None,
        checkpoint_io: Optional[CheckpointIO] = None,
        precision_plugin: Optional[Precision] = None,
        process_group_backend: Optional[str] = None,
        timeout: Optional[timedelta] = default_pg_timeout,
        start_method: Literal["popen", "spawn", "fork", "forkserver"] = "popen",
    ) -> None:
        super().__init__(
            accelerator=accelerator,
            parallel_devices=parallel_devices,
            cluster_environment=cluster_environment,
            checkpoint_io=checkpoint_io,
            precision_plugin=precision_plugin,
            process_group_backend=process_group_backend,
            timeout=timeout,
            start_method=start_method,
        )
        self.algorithm = algorithm
        self.log_comm_metrics = check_bool("log_comm_metrics", log_comm_metrics)
        self._active = False  # the algorithm drives the model (between setup and teardown of a fit)
        self._stepped_this_batch = False
        self._pending_rank_state: Optional[Any] = None
        self._round_callback: Optional[RoundCallback] = None
        self._lightning_sigterm_check: Optional[Callable[[], None]] = None

    # ------------------------------------------------------------------ public read-outs
    @property
    def comm_stats(self) -> CommStats:
        """This rank's communication counters (rounds, collectives, bytes sent, seconds)."""
        return self.algorithm.comm.stats if self.algorithm.is_set_up else CommStats()

    # ------------------------------------------------------------------ set-up
    @override
    def _setup_model(self, model: Module) -> Module:
        return model  # no DistributedDataParallel: the algorithm owns every collective

    @override
    def configure_ddp(self) -> None:
        assert self.model is not None
        self.model = self._setup_model(self.model)
        self.algorithm.setup(self.model, ProcessGroupCommunicator(timeout=self._timeout))

    @override
    def setup(self, trainer: pl.Trainer) -> None:
        if trainer.state.fn == TrainerFn.FITTING and self._layer_sync is not None:
            rank_zero_warn(
                f"`sync_batchnorm=True` all-reduces BatchNorm statistics at every forward pass, which undoes what "
                f"{type(self).__name__} saves; its float buffers are averaged at every round already."
            )
        super().setup(trainer)
        if trainer.state.fn != TrainerFn.FITTING:
            return
        self.algorithm.register_optimizers(self.optimizers)
        self._round_callback = RoundCallback(self)
        trainer.callbacks.insert(0, self._round_callback)
        self._move_sigterm_check_to_rounds(trainer)
        self._active = True

    def _move_sigterm_check_to_rounds(self, trainer: pl.Trainer) -> None:
        # Lightning broadcasts a SIGTERM flag before *every* training step when world_size > 1: a collective on
        # every local step. Keep the check, but only before steps that synchronise anyway.
        epoch_loop = trainer.fit_loop.epoch_loop
        original = getattr(epoch_loop, "_broadcast_sigterm_tensor", None)
        if original is None:
            return
        self._lightning_sigterm_check = original

        def broadcast_sigterm_on_synchronising_steps() -> None:
            if self.algorithm.step_synchronises():
                original()

        epoch_loop._broadcast_sigterm_tensor = broadcast_sigterm_on_synchronising_steps

    @override
    def teardown(self) -> None:
        trainer = self.lightning_module.trainer if self.lightning_module is not None else None
        if trainer is not None:
            if self._round_callback is not None and self._round_callback in trainer.callbacks:
                trainer.callbacks.remove(self._round_callback)
            if self._lightning_sigterm_check is not None:
                del trainer.fit_loop.epoch_loop._broadcast_sigterm_tensor  # back to the class method
        self._round_callback = None
        self._lightning_sigterm_check = None
        self._active = False
        super().teardown()

    # ------------------------------------------------------------------ the training step
    @override
    def optimizer_step(
        self,
        optimizer: Optimizer,
        closure: Callable[[], Any],
        model: Optional[Union[pl.LightningModule, Module]] = None,
        **kwargs: Any,
    ) -> Any:
        if not self._active:
            return super().optimizer_step(optimizer, closure, model, **kwargs)

        def closure_then_synchronise() -> Any:
            result = closure()  # forward + backward (automatic), or nothing (manual: backward already ran)
            self.algorithm.before_optimizer_step(optimizer)
            return result

        output = super().optimizer_step(optimizer, closure_then_synchronise, model, **kwargs)
        self.algorithm.after_optimizer_step(optimizer)
        self._stepped_this_batch = True
        return output

    def on_train_batch_end_first(self, trainer: pl.Trainer) -> None:
        """Called by :class:`RoundCallback` before any other ``on_train_batch_end``."""
        if not self._stepped_this_batch:
            return  # a micro-batch under gradient accumulation, or a skipped step
        self._stepped_this_batch = False
        self.algorithm.end_step()
        if self.log_comm_metrics and self.algorithm.step % max(trainer.log_every_n_steps, 1) == 0:
            self._log_comm_metrics(trainer)

    def _log_comm_metrics(self, trainer: pl.Trainer) -> None:
        metrics = self.comm_stats.as_metrics()
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=trainer.global_step)

    # ------------------------------------------------------------------ consensus for evaluation and at the end
    @override
    def on_validation_start(self) -> None:
        if self._active:
            self.algorithm.enter_consensus()

    @override
    def on_validation_end(self) -> None:
        if self._active:
            self.algorithm.exit_consensus()

    on_test_start = on_validation_start
    on_test_end = on_validation_end
    on_predict_start = on_validation_start
    on_predict_end = on_validation_end

    @override
    def on_train_end(self) -> None:
        if self._active:
            self.algorithm.finalize()
            trainer = self.lightning_module.trainer if self.lightning_module is not None else None
            if self.log_comm_metrics and trainer is not None:
                self._log_comm_metrics(trainer)

    # ------------------------------------------------------------------ checkpoints
    @override
    def lightning_module_state_dict(self) -> dict[str, Any]:
        if not self._active:
            return super().lightning_module_state_dict()
        with self.algorithm.consensus():
            return {k: v.detach().clone() for k, v in super().lightning_module_state_dict().items()}

    @override
    def save_checkpoint(
        self, checkpoint: dict[str, Any], filepath: _PATH, storage_options: Optional[Any] = None
    ) -> None:
        if self._active and "optimizer_states" in checkpoint:  # a full checkpoint, not weights only
            mine = to_cpu(
                {
                    "algorithm": self.algorithm.state_dict(),
                    "optimizer_states": [optimizer.state_dict() for optimizer in self.optimizers],
                }
            )
            everyone = self.algorithm.comm.gather_object(mine, dst=0)
            if everyone is not None:
                checkpoint[CHECKPOINT_KEY] = rank_section(everyone, type(self).__name__)
        super().save_checkpoint(checkpoint, filepath, storage_options=storage_options)

    @override
    def load_checkpoint(self, checkpoint_path: _PATH, weights_only: Optional[bool] = None) -> dict[str, Any]:
        checkpoint = super().load_checkpoint(checkpoint_path, weights_only=weights_only)
        section = checkpoint.pop(CHECKPOINT_KEY, None)
        self._pending_rank_state = pick_rank_state(section, self.global_rank, self.world_size, type(self).__name__)
        return checkpoint

    @override
    def load_optimizer_state_dict(self, checkpoint: Mapping[str, Any]) -> None:
        super().load_optimizer_state_dict(checkpoint)
        state, self._pending_rank_state = self._pending_rank_state, None
        if state is None or not self._active:
            return
        for optimizer, optimizer_state in zip(self.optimizers, state["optimizer_states"]):
            optimizer.load_state_dict(optimizer_state)  # this rank's own momentum, not rank 0's
        self.algorithm.load_state_dict(to_device(state["algorithm"], self.root_device))

    # ------------------------------------------------------------------ registry
    @classmethod
    @override
    def register_strategies(cls, strategy_registry: _StrategyRegistry) -> None:
        for name in cls.strategy_names:
            if name not in strategy_registry:  # importing twice must not fail
                strategy_registry.register(name, cls, description=(cls.__doc__ or "").strip().splitlines()[0])
