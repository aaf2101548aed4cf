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

import secrets
import signal
import warnings
from datetime import timedelta
from typing import TYPE_CHECKING, Any, Callable, ClassVar, Literal, Optional, Union

import lightning.pytorch as pl
import torch.distributed as dist
from lightning.fabric.plugins import CheckpointIO, ClusterEnvironment
from lightning.fabric.plugins.collectives.torch_collective import default_pg_timeout
from lightning.fabric.strategies.registry import _StrategyRegistry
from lightning.fabric.utilities.seed import reset_seed
from lightning.fabric.utilities.types import _PATH
from lightning.pytorch.plugins.precision import Precision
from lightning.pytorch.strategies import DDPStrategy
from lightning.pytorch.strategies.launchers.subprocess_script import _SubprocessScriptLauncher
from lightning.pytorch.trainer.connectors.signal_connector import _get_sigkill_signal
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities import rank_zero_warn
from lightning.pytorch.utilities.exceptions import SIGTERMException
from torch.nn import Module
from torch.optim import Optimizer
from typing_extensions import override

from lightning_localsgd._validation import (
    check_bool,
    check_positive_float,
    keyword_names,
    unexpected_keywords_error,
)
from lightning_localsgd.algorithms.periodic import PeriodicAlgorithm
from lightning_localsgd.comm import CommStats, ProcessGroupCommunicator
from lightning_localsgd.comm.layout import WorldLayout
from lightning_localsgd.comm.local_shards import sharded_parameters
from lightning_localsgd.driving import comm_metrics, rank_payload, restore_rank_payload, step_and_follow
from lightning_localsgd.strategies.checkpointing import (
    CHECKPOINT_KEY,
    read_rank_state,
    remove_shards,
    remove_stale_shards,
    write_shards,
)
from lightning_localsgd.strategies.comm_logging import log_final_metrics, log_step_metrics
from lightning_localsgd.strategies.lightning_compat import complete_batch_end_restart
from lightning_localsgd.strategies.rendezvous import init_process_group
from lightning_localsgd.strategies.round_budget import RoundBudgetCheck
from lightning_localsgd.strategies.round_callback import RoundCallback
from lightning_localsgd.strategies.safety import (
    SyncedStepLogCheck,
    as_timeout,
    check_supported_device,
    check_supported_model,
    check_supported_optimizers,
    defer_signals,
    grad_scaler_of,
    prepare_training_data,
    restore_patched_hooks,
    warn_about_per_step_collectives,
)
from lightning_localsgd.strategies.sharded_checkpoint import MODEL_KEY, load_consensus_into, save_consensus
from lightning_localsgd.strategies.sharding import (
    ShardLayers,
    local_optimizer_state,
    replica_groups,
    sharded_optimizer_state,
)
from lightning_localsgd.strategies.weight_averaging import weight_averaging_copies

if TYPE_CHECKING:
    from collections.abc import Mapping


class LocalUpdateStrategy(DDPStrategy):
    """Base class: a ``DDPStrategy`` whose synchronisation is done by a local-update algorithm.

    Subclasses build their algorithm in ``__init__`` (so bad arguments fail before any process starts) and
    register their names in :meth:`register_strategies`.

    Args:
        algorithm: the per-rank algorithm instance (not yet set up).
        log_comm_metrics: log ``comm/rounds``, ``comm/mb_sent``, ``comm/seconds``, ``comm/collectives``, ... every
            step into ``trainer.callback_metrics`` (so ``ModelCheckpoint``/``EarlyStopping`` can monitor them), to
            the trainer's loggers every ``log_every_n_steps`` steps, and once more at the end of training.
        on_nonfinite: what a synchronisation point does when some rank's parameters (or, in warm-up, gradients)
            hold inf/NaN: ``"raise"`` stops every rank with an error naming the rank and step before anything is
            averaged; ``"skip_round"`` rolls every rank back to the last good round and goes on (keeps one
            copy of the model, optimizer and algorithm state per rank).
        collective_timeout: seconds any of the strategy's collectives (rounds, warm-up averages, consensus,
            checkpoint agreement) may wait for a peer before the run stops with an error naming the strategy and
            round: a dead or stuck peer becomes an error, never a hang. Allow for one round's transfer on the
            slowest link.
        init_timeout: seconds every rank of the world has to start and check in at start-up; then the run stops
            with an error saying how many ranks arrived and how to start the missing ones (e.g. a ``num_nodes=2``
            run started on one node only), instead of waiting for ``timeout``.
        comm_progress_bar: show ``comm/rounds`` and ``comm/mb_sent`` in the progress bar (with
            ``log_comm_metrics``).
        shard_size: ranks per replica group (consecutive ranks, normally one node). Above 1, PyTorch's FSDP2
            (``fully_shard``) shards the model inside each group, reduce-scattering gradients every step there, and
            the algorithm runs across groups on each rank's shards: a round averages shard ``k`` over the ranks
            that hold it. 1 (default): a full replica per rank. See ``sharding.py``.
        shard_layers: with ``shard_size`` > 1, the module classes (names or classes) each sharded on its own, as
            Lightning FSDP's ``auto_wrap_policy``; then every direct child of the LightningModule is. Ignored where
            ``configure_model`` shards the module itself (over ``self.device_mesh["shard"]``).
        shard_param_dtype: with ``shard_size`` > 1, ``"bf16"`` or ``"fp16"``: FSDP2 gathers parameters and computes
            in that dtype and reduce-scatters in float32 (``MixedPrecisionPolicy``); the shards stay float32.
        shard_activation_checkpointing: with ``shard_layers``, recompute those layers' activations in backward
            instead of keeping them (less memory, about one more forward of compute).
        timeout: as in ``DDPStrategy``: Lightning's own collectives, and the process group's once every rank has
            arrived (seconds or a ``timedelta``; Lightning's default, 30 minutes).
        Remaining arguments: as :class:`~lightning.pytorch.strategies.DDPStrategy`.
    """

    strategy_names: ClassVar[tuple[str, ...]] = ()

    def __init__(
        self,
        algorithm: PeriodicAlgorithm,
        log_comm_metrics: bool = True,
        on_nonfinite: str = "raise",
        collective_timeout: float = 600.0,
        init_timeout: float = 300.0,
        comm_progress_bar: bool = True,
        shard_size: int = 1,
        shard_layers: ShardLayers = None,
        shard_param_dtype: Optional[str] = None,
        shard_activation_checkpointing: bool = False,
        accelerator: Optional[pl.accelerators.Accelerator] = None,
        parallel_devices: Optional[list[Any]] = None,
        cluster_environment: Optional[ClusterEnvironment] = None,
        checkpoint_io: Optional[CheckpointIO] = None,
        precision_plugin: Optional[Precision] = None,
        process_group_backend: Optional[str] = None,
        timeout: Union[float, timedelta, None] = default_pg_timeout,
        start_method: Literal["popen", "spawn", "fork", "forkserver"] = "popen",
        **unexpected: Any,
    ) -> None:
        if unexpected:  # else Python's own error names this `__init__`, not the class the user called
            raise unexpected_keywords_error(type(self), unexpected, keyword_names(type(self), LocalUpdateStrategy))
        timeout = as_timeout(timeout)
        algorithm.set_nonfinite_policy(on_nonfinite)
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
        self.algorithm.label = f"{type(self).__name__} ({type(algorithm).__name__})"
        self.collective_timeout = timedelta(seconds=check_positive_float("collective_timeout", collective_timeout))
        self.algorithm.timeout = self.collective_timeout
        self.log_comm_metrics = check_bool("log_comm_metrics", log_comm_metrics)
        self.comm_progress_bar = check_bool("comm_progress_bar", comm_progress_bar)
        self.init_timeout = timedelta(seconds=check_positive_float("init_timeout", init_timeout))
        self._groups = replica_groups(  # None with shard_size=1
            shard_size, shard_layers, shard_param_dtype, shard_activation_checkpointing, algorithm, type(self).__name__
        )
        self._active = False  # the algorithm drives the model (between setup and teardown of a fit)
        self._stepped_this_batch = False
        self._pending_rank_state: Optional[Any] = None
        self._resume_rng: Optional[dict[str, Any]] = None  # restored again at the first batch of a mid-epoch resume
        self._round_callback: Optional[RoundCallback] = None
        self._patched_trainer: Optional[pl.Trainer] = None
        self._requeue: Optional[Callable[[Any, Any], None]] = None  # Lightning's SLURM checkpoint-and-requeue
        self._communicator: Optional[ProcessGroupCommunicator] = None

    # ------------------------------------------------------------------ public read-outs
    @property
    def rounds(self) -> int:
        """Rounds of the local phase so far (warm-up steps are not rounds); what ``RoundCheckpoint`` counts."""
        return self.algorithm.rounds

    @property
    def comm_stats(self) -> CommStats:
        """This rank's communication counters (rounds, collectives, bytes sent, seconds)."""
        return self.algorithm.comm.stats if self.algorithm.is_set_up else CommStats()

    @property
    def shard_size(self) -> int:
        """Ranks per replica group (1: a full replica per rank)."""
        return self._groups.shard_size if self._groups is not None else 1

    @property
    def device_mesh(self) -> Any:
        """With ``shard_size`` > 1, the ``("replicate", "shard")`` mesh (from ``setup_environment`` on): a
        ``configure_model`` that shards the module itself uses ``self.device_mesh["shard"]``."""
        if self._groups is None or self._groups.mesh is None:
            raise RuntimeError(f"{type(self).__name__} has a device mesh only with `shard_size` > 1, once set up.")
        return self._groups.mesh

    @property
    @override
    def restore_checkpoint_after_setup(self) -> bool:
        return self._groups is not None  # the weights are read into the sharded module, in place

    # ------------------------------------------------------------------ set-up
    @override
    def _setup_model(self, model: Module) -> Module:
        return model  # no DistributedDataParallel: the algorithm owns every collective

    @override
    def configure_ddp(self) -> None:
        assert self.model is not None
        self.model = self._setup_model(self.model)
        # A group of the strategy's own, so that its collectives carry `collective_timeout` (the default group's
        # timeout also bounds start-up, where ranks may legitimately arrive minutes apart). A second `fit` keeps
        # the group and the algorithm's state: training continues where the first left off.
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
        if self._groups is not None:
            self.algorithm.setup(self._groups.shard(self.model, self.algorithm.buffers), self._communicator)
            return
        self.algorithm.setup(self.model, self._communicator)

    @override
    def setup_distributed(self) -> None:
        # As DDPStrategy's, on a store every rank has checked in on within `init_timeout` (see rendezvous.py),
        # namespaced per torchrun restart attempt (see elastic_attempt_store).
        reset_seed()
        self.set_world_ranks()
        self._process_group_backend = self._get_process_group_backend()
        init_process_group(self)

    @override
    def setup_environment(self) -> None:
        check_supported_device(self.root_device, type(self).__name__)
        super().setup_environment()
        if self._groups is not None:
            mesh = self._groups.build_mesh(self.world_size, self.num_processes, self.root_device.type)
            if self.lightning_module is not None:  # `configure_model` may shard the module over its "shard" dim
                self.lightning_module._device_mesh = mesh

    @override
    def setup(self, trainer: pl.Trainer) -> None:
        check_supported_model(self.model, type(self).__name__, fsdp_allowed=self._groups is not None)
        if trainer.state.fn == TrainerFn.FITTING and self._layer_sync is not None:
            rank_zero_warn(
                f"`sync_batchnorm=True` all-reduces BatchNorm statistics at every forward pass, which undoes what "
                f"{type(self).__name__} saves; its float buffers are averaged at every round already."
            )
        if trainer.state.fn != TrainerFn.FITTING and sharded_parameters(self.model):
            # Evaluating the module a sharded `fit` left: every group holds the consensus already, and DDP's
            # broadcast of the module's tensors cannot take unevenly sharded DTensors.
            assert self.accelerator is not None
            self.accelerator.setup(trainer)
            self.model_to_device()
            self.setup_precision_plugin()
            return
        super().setup(trainer)
        if trainer.state.fn != TrainerFn.FITTING:
            return
        check_supported_optimizers(self.optimizers, type(self).__name__)
        self.algorithm.register_optimizers(self.optimizers)
        self.algorithm.shadow_modules = weight_averaging_copies(trainer)
        scaler = grad_scaler_of(self.precision_plugin)
        self.algorithm.gradients_may_overflow = scaler is not None
        # Gradients are still scaled when a per-step exchange compresses them; it works in gradient units.
        self.algorithm.grad_scale = scaler.get_scale if scaler is not None else None
        self._round_callback = RoundCallback(self)
        trainer.callbacks.insert(0, self._round_callback)
        self._patched_trainer = trainer
        self._requeue = defer_signals(trainer, self.algorithm)
        world = self._groups.world if self._groups is not None else None
        prepare_training_data(trainer, world or self.algorithm.comm, type(self).__name__)
        warn_about_per_step_collectives(trainer, type(self).__name__)
        self._synced_step_logs = SyncedStepLogCheck(type(self).__name__)
        self._round_budget = RoundBudgetCheck(self.algorithm, type(self).__name__)
        self._active = True

    @override
    def on_exception(self, exception: BaseException) -> None:
        super().on_exception(exception)
        if isinstance(exception, SIGTERMException):
            # A stop every rank agreed on, after the same batch: they all end by themselves, and leave the model
            # as a finished `fit` would, the average (replicas that never agree, e.g. gossip's, differ otherwise).
            if self._active:
                try:
                    self.algorithm.finalize()
                except Exception as error:  # the stop itself must not be masked
                    warnings.warn(f"The replicas could not be averaged after the stop: {error}", stacklevel=2)
            return
        # Lightning stops the ranks it launched only on Ctrl+C. After any other error, a rank that is stuck (or
        # waiting in a collective for this one) would outlive the run and hold the job: stop them now.
        if isinstance(self.launcher, _SubprocessScriptLauncher):
            self.launcher.kill(_get_sigkill_signal())

    @override
    def teardown(self) -> None:
        trainer = self.lightning_module.trainer if self.lightning_module is not None else None
        if trainer is not None and self._round_callback is not None and self._round_callback in trainer.callbacks:
            trainer.callbacks.remove(self._round_callback)
        if self._patched_trainer is not None:
            restore_patched_hooks(self._patched_trainer)
        self._patched_trainer = None
        self._requeue = None
        self._round_callback = None
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
            self.algorithm.before_backward(optimizer)  # warm-up: gradients travel while backward runs
            result = closure()  # forward + backward (automatic), or nothing (manual: backward already ran)
            if self._groups is None:
                self.algorithm.before_optimizer_step(optimizer)
            else:  # on this rank's shards
                self._groups.before_optimizer_step(self.algorithm, optimizer)
            return result

        def run_step() -> Any:
            return super(LocalUpdateStrategy, self).optimizer_step(optimizer, closure_then_synchronise, model, **kwargs)

        output, counted = step_and_follow(self.algorithm, optimizer, run_step, grad_scaler_of(self.precision_plugin))
        self._stepped_this_batch = self._stepped_this_batch or counted
        return output

    def on_train_batch_end_first(self, trainer: pl.Trainer) -> None:
        """Called by :class:`RoundCallback` before any other ``on_train_batch_end``."""
        self._synced_step_logs(trainer)  # once per fit, after the first batch: per-step `sync_dist` logging
        if self._stepped_this_batch:  # else a micro-batch under gradient accumulation, or a skipped step
            self._stepped_this_batch = False
            self._end_step(trainer)
        if self.log_comm_metrics:
            log_step_metrics(trainer, self._comm_metrics(trainer), self.comm_progress_bar)

    def _comm_metrics(self, trainer: pl.Trainer) -> dict[str, float]:
        """``comm/*``; with replica groups also split into ``comm/inter_group_mb`` (the algorithm's, across groups:
        ``comm/mb_sent``) and ``comm/intra_group_mb`` (FSDP2's inside the group, estimated from the layout)."""
        metrics = comm_metrics(self.algorithm)
        if self._groups is None or self._groups.shards is None or not metrics:
            return metrics
        batches = trainer.fit_loop.total_batch_idx + 1  # restored on resume, as the algorithm's counters are
        metrics["comm/inter_group_mb"] = metrics["comm/mb_sent"]
        metrics["comm/intra_group_mb"] = self._groups.intra_group_megabytes(self.model, batches)
        return metrics

    def _end_step(self, trainer: pl.Trainer) -> None:
        self.algorithm.end_step()
        # Requests (signals) raised anywhere were agreed at a synchronisation point: every rank acts at this step.
        if self.algorithm.take_agreed_request("requeue") and self._requeue is not None:
            self._requeue(signal.SIGUSR1, None)  # Lightning's: checkpoint (consistent here), `scontrol requeue`
        if self.algorithm.take_agreed_request("stop"):
            trainer._signal_connector.received_sigterm = True  # Lightning stops every rank after this batch

    # ------------------------------------------------------------------ consensus for evaluation and at the end
    @override
    def on_validation_start(self) -> None:
        if self._active:
            self._reshard()
            self.algorithm.enter_consensus()

    @override
    def on_validation_end(self) -> None:
        if self._active:
            self._reshard()  # training's next forward gathers the restored replica, not what evaluation gathered
            self.algorithm.exit_consensus()

    def _reshard(self) -> None:
        if self._groups is not None:
            self._groups.reshard()

    on_test_start = on_validation_start
    on_test_end = on_validation_end
    on_predict_start = on_validation_start
    on_predict_end = on_validation_end

    @override
    def on_train_end(self) -> None:
        if self._active:
            self._reshard()
            self.algorithm.finalize()
            trainer = self.lightning_module.trainer if self.lightning_module is not None else None
            if trainer is None:
                return
            if self.log_comm_metrics:
                log_final_metrics(trainer, self._comm_metrics(trainer))
            self._round_budget.at_end(trainer)

    # ------------------------------------------------------------------ checkpoints
    @override
    def lightning_module_state_dict(self) -> dict[str, Any]:
        if not self._active:
            return super().lightning_module_state_dict()
        # The consensus where it differs from this rank's tensors (one copy of the model, the replica untouched);
        # in sync, the module's own tensors, uncopied, as Lightning's DDP returns them. Written at once either way.
        values = self.algorithm.consensus_state()
        state = super().lightning_module_state_dict()
        if not values:
            return state
        module = self.lightning_module
        tensors = [*module.named_parameters(remove_duplicate=False), *module.named_buffers(remove_duplicate=False)]
        shards = self._groups.shards if self._groups is not None else None
        if shards is not None:  # the consensus of this rank's shards, placed as the sharded parameters are
            values = shards.as_sharded(values)
        by_name = {name: values[id(t)] for name, t in tensors if id(t) in values}
        return {key: by_name.get(key, value) for key, value in state.items()}

    @override
    def save_checkpoint(
        self, checkpoint: dict[str, Any], filepath: _PATH, storage_options: Optional[Any] = None
    ) -> None:
        section: Optional[dict[str, Any]] = None
        world = self._groups.world if self._groups is not None else None
        sharded = world is not None
        if self._active and "optimizer_states" in checkpoint:  # a full checkpoint, not weights only
            # Each rank writes its own shard (no tensor travels to rank 0); the main file only names them.
            # Written at once: live tensors, no copies. Rank 0's optimizer states are in the main file already
            # (with replica groups they are rank 0's shards only, and every rank writes its own).
            scaler = grad_scaler_of(self.precision_plugin)
            mine = rank_payload(
                self.algorithm,
                self.optimizers,
                scaler,
                drop_replica=True,
                copy=False,
                optimizers_in_main_file=self.is_global_zero and not sharded,
                shared_in_rank_0=not self.is_global_zero and not sharded,
            )
            if sharded:
                mine["optimizer_states"] = [local_optimizer_state(optimizer) for optimizer in self.optimizers]
                checkpoint["optimizer_states"] = []
            section = write_shards(world or self.algorithm.comm, mine, filepath, type(self).__name__)
            checkpoint[CHECKPOINT_KEY] = section
        if sharded and "state_dict" in checkpoint:  # the weights, written by every rank (sharded_checkpoint.py)
            assert world is not None
            if section is None:  # weights only: the ranks still agree on one name for this save's folder
                token = world.all_gather_object(secrets.token_hex(8))[0]
                section = checkpoint[CHECKPOINT_KEY] = {"strategy": type(self).__name__, "token": token}
            weights = {"state_dict": checkpoint.pop("state_dict")}
            section[MODEL_KEY] = save_consensus(weights, filepath, section["token"])
            checkpoint["state_dict"] = {}
        super().save_checkpoint(checkpoint, filepath, storage_options=storage_options)
        if section is not None and self.is_global_zero:
            remove_stale_shards(filepath, section["token"])  # the main file now names this save's shards

    @override
    def load_checkpoint(self, checkpoint_path: _PATH, weights_only: Optional[bool] = None) -> dict[str, Any]:
        # `weights_only` reaches strategies from Lightning 2.6 on; before, it is never given and the parent takes none.
        extra = {} if weights_only is None else {"weights_only": weights_only}
        checkpoint = super().load_checkpoint(checkpoint_path, **extra)
        section = checkpoint.pop(CHECKPOINT_KEY, None)
        self._pending_rank_state = None
        if isinstance(section, dict) and MODEL_KEY in section:  # weights written by every rank of a sharded run
            load_consensus_into({"state_dict": self.lightning_module}, checkpoint_path, section)
            checkpoint["state_dict"] = None  # read already, in place (see `load_model_state_dict`)
            if "shards" not in section:
                section = None
        trainer = getattr(self.lightning_module, "_trainer", None)
        if trainer is not None and trainer.state.fn != TrainerFn.FITTING:
            return checkpoint  # evaluation needs the (consensus) weights only, not the shards
        self._pending_rank_state = read_rank_state(
            section, checkpoint_path, self.global_rank, self.world_size, type(self).__name__
        )
        return checkpoint

    @override
    def load_model_state_dict(self, checkpoint: Mapping[str, Any], strict: bool = True) -> None:
        if checkpoint.get("state_dict", {}) is None:
            return  # a sharded run's weights, read into the module by `load_checkpoint`
        super().load_model_state_dict(checkpoint, strict=strict)

    @override
    def load_optimizer_state_dict(self, checkpoint: Mapping[str, Any]) -> None:
        if self._groups is None or self._groups.world is None:  # else every rank's optimizer state is in its shard
            super().load_optimizer_state_dict(checkpoint)
        trainer = getattr(self.lightning_module, "_trainer", None)
        if trainer is not None:  # the first strategy hook after Lightning restored its loops, before they run
            complete_batch_end_restart(trainer)
        state, self._pending_rank_state = self._pending_rank_state, None
        if state is None or not self._active:
            return
        # A shard saved in sync has no replica: the module keeps the main file's consensus weights, loaded before.
        scaler = grad_scaler_of(self.precision_plugin)
        if self._groups is not None and self._groups.world is not None:
            saved = state["optimizer_states"] or []
            state["optimizer_states"] = [sharded_optimizer_state(s, o) for s, o in zip(saved, self.optimizers)]
        restore_rank_payload(state, self.algorithm, self.optimizers, scaler, self.root_device)
        if state.get("rng") is not None:
            # Restored as at the save. Right for a resume at an epoch's end: the next epoch's data iterator draws
            # first, in both runs. Mid-epoch, Lightning's new iterator draws before the first batch where the
            # uninterrupted run drew nothing: RoundCallback restores them again at that batch.
            self._resume_rng = state["rng"]

    @override
    def remove_checkpoint(self, filepath: _PATH) -> None:
        super().remove_checkpoint(filepath)
        if self.is_global_zero:
            remove_shards(filepath)  # by name: removing a link (`save_last="link"`) keeps its target's shards

    # ------------------------------------------------------------------ registry
    @classmethod
    @override
    def register_strategies(cls, strategy_registry: _StrategyRegistry) -> None:
        for name in cls.strategy_names:
            if name not in strategy_registry:  # importing twice must not fail
                strategy_registry.register(name, cls, description=(cls.__doc__ or "").strip().splitlines()[0])
