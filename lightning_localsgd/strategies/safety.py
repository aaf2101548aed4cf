"""Checks and Lightning patches that keep a local-update run from hanging, mixing tensors or losing work.

* set-up refuses what cannot work (devices without a supported backend, sharded or already-wrapped models,
  optimizers that communicate by themselves), with a message that says what to do instead;
* ranks agree on the number of training batches per epoch before the epoch, so a rank with fewer batches
  never leaves the others waiting at a round;
* SLURM's requeue signal and SIGTERM are acted on at the next synchronisation point, where every rank is
  at the same step, instead of inside the signal handler at whatever point each rank happens to be (and
  Lightning's per-step SIGTERM broadcast, a collective on every local step, is gone);
* settings that make Lightning add a collective to every local step (``max_time``, a time-based
  ``ModelCheckpoint``, ``self.log(..., sync_dist=True)`` in ``training_step``) are named in a warning.
"""

from __future__ import annotations

import logging
import os
from datetime import timedelta
from typing import Any, Callable, Optional, Union

import lightning.pytorch as pl
import torch
import torch.distributed as dist
from lightning.pytorch.plugins.precision import Precision
from lightning.pytorch.utilities import rank_zero_warn
from torch import nn
from torch.optim import Optimizer

from lightning_localsgd.algorithms.periodic import PeriodicAlgorithm
from lightning_localsgd.comm import Communicator
from lightning_localsgd.strategies.resume_data import fast_forward_after_mid_epoch_resume

log = logging.getLogger(__name__)

SUPPORTED_DEVICE_TYPES = ("cpu", "cuda")


def as_timeout(value: Union[float, timedelta, None]) -> Optional[timedelta]:
    """The collectives' timeout from seconds (as LightningCLI YAML gives it) or a ``timedelta``."""
    if value is None or isinstance(value, timedelta):
        seconds = None if value is None else value.total_seconds()
    elif isinstance(value, (int, float)) and not isinstance(value, bool):
        seconds = float(value)
    else:
        raise ValueError(f"`timeout` must be a number of seconds or a datetime.timedelta, got {value!r}.")
    if seconds is not None and not seconds > 0:
        raise ValueError(f"`timeout` must be positive, got {seconds} s.")
    return None if seconds is None else timedelta(seconds=seconds)


def check_supported_device(device: torch.device, strategy: str) -> None:
    if device.type not in SUPPORTED_DEVICE_TYPES:
        raise ValueError(
            f"{strategy} runs on CPU (gloo) and CUDA GPUs (NCCL); this Trainer's device is {device.type!r}. "
            "Use `accelerator='cpu'` or `accelerator='gpu'`."
        )


def check_supported_model(model: Optional[nn.Module], strategy: str, fsdp_allowed: bool = False) -> None:
    """Refuse models that are sharded (unless the strategy has replica groups, ``fsdp_allowed``) or already wrapped
    by another data-parallel engine."""
    if model is None:
        return
    from torch.distributed.fsdp import FSDPModule, FullyShardedDataParallel
    from torch.nn.parallel import DistributedDataParallel

    for name, module in model.named_modules():
        where = f"`{name}`" if name else "the model"
        if isinstance(module, FullyShardedDataParallel) or (isinstance(module, FSDPModule) and not fsdp_allowed):
            raise ValueError(
                f"{where} is sharded with FSDP, but {strategy} keeps a full replica per rank and averages it. "
                "Shard inside replica groups instead: set `shard_size` (FSDP2 `fully_shard` over "
                "`self.device_mesh['shard']` in `configure_model`, or let the strategy shard by `shard_layers`); "
                "the FSDP1 wrapper `FullyShardedDataParallel` is not supported."
            )
        if isinstance(module, DistributedDataParallel):
            raise ValueError(
                f"{where} is wrapped in DistributedDataParallel, which all-reduces gradients every step and "
                f"would undo what {strategy} saves. Pass the bare module; the strategy does the synchronisation."
            )
        if type(module).__module__.split(".")[0] == "deepspeed":
            raise ValueError(
                f"{where} is a DeepSpeed engine; {strategy} does not combine with DeepSpeed (ZeRO shards the "
                "state it averages). Pass the bare module, or use Lightning's `DeepSpeedStrategy` alone."
            )


def check_supported_optimizers(optimizers: list[Optimizer], strategy: str) -> None:
    """Refuse optimizers that communicate by themselves: their collectives would race the strategy's."""
    from torch.distributed.optim import PostLocalSGDOptimizer, ZeroRedundancyOptimizer

    for optimizer in optimizers:
        if isinstance(optimizer, ZeroRedundancyOptimizer):
            raise ValueError(
                f"ZeroRedundancyOptimizer shards optimizer state across ranks and broadcasts parameters after every "
                f"step; {strategy} needs each rank to step its own full replica. Return the plain optimizer "
                f"(e.g. `{optimizer.optim.__class__.__name__}`) from `configure_optimizers`."
            )
        if isinstance(optimizer, PostLocalSGDOptimizer):
            raise ValueError(
                f"PostLocalSGDOptimizer averages parameters itself; with {strategy} the model would be averaged "
                "twice. Return the wrapped optimizer and set the strategy's `period`/`warmup_steps` instead."
            )


def grad_scaler_of(precision: Precision) -> Optional[Any]:
    """The enabled fp16 ``GradScaler`` of a mixed-precision plugin, if any."""
    scaler = getattr(precision, "scaler", None)
    return scaler if scaler is not None and scaler.is_enabled() else None


def prepare_training_data(trainer: pl.Trainer, comm: Communicator, strategy: str) -> None:
    """Each time Lightning (re)builds the training data: fast-forward it after a mid-epoch resume (see
    ``resume_data``), then make every rank run the smallest rank's number of batches per epoch."""
    fit_loop = trainer.fit_loop
    original = fit_loop.setup_data
    prepared: list[Any] = [None]  # the combined loader last prepared (Lightning's set-up runs every epoch)

    def setup_data_then_prepare() -> None:
        original()
        loader = fit_loop._combined_loader
        if loader is None or loader is prepared[0]:
            return
        prepared[0] = loader
        fast_forward_after_mid_epoch_resume(trainer)
        agree_on_batches_per_epoch(trainer, comm, strategy)

    fit_loop.setup_data = setup_data_then_prepare  # type: ignore[method-assign]


def agree_on_batches_per_epoch(trainer: pl.Trainer, comm: Communicator, strategy: str) -> None:
    """Every rank runs the smallest rank's number of batches this epoch, with a warning if they differ."""
    fit_loop = trainer.fit_loop
    counts = comm.all_gather_object(fit_loop.max_batches)
    fewest = min(counts)
    if fewest == float("inf") or all(count == fewest for count in counts):
        return
    fit_loop.max_batches = fewest
    if isinstance(trainer.val_check_interval, float) and trainer.check_val_every_n_epoch is not None:
        trainer.val_check_batch = max(1, int(fewest * trainer.val_check_interval))
    else:
        trainer.val_check_batch = min(trainer.val_check_batch, fewest)
    dropped = {rank: count - fewest for rank, count in enumerate(counts) if count != fewest}
    rank_zero_warn(
        f"{strategy}: the ranks have different numbers of training batches per epoch ({counts}, by rank). "
        f"Every rank runs {fewest} so that rounds stay aligned; batches dropped per epoch: "
        + ", ".join(f"rank {rank}: {n}" for rank, n in dropped.items())
        + ". Give every rank an equal shard (e.g. `lightning_localsgd.NonIIDSampler` or Lightning's "
        "DistributedSampler) to use all data."
    )


def elastic_attempt_store(timeout: Optional[timedelta]) -> Optional[dist.Store]:
    """Under torchrun: a client of the launcher's store whose keys are namespaced by the restart attempt.

    torchrun keeps one store for all restart attempts, and the process group writes the same keys in every
    attempt (gloo: each rank's listening address). A restarted rank may then read its peer's address from the
    killed attempt: "Connection refused" when it connects, a wait for the whole timeout when it listens
    (torch's env:// rendezvous no longer prefixes keys per attempt). Returns None outside torchrun.
    """
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
        return None
    client = dist.TCPStore(
        host_name=os.environ["MASTER_ADDR"],
        port=int(os.environ["MASTER_PORT"]),
        is_master=False,  # the torchrun agent serves the store
        timeout=timeout or timedelta(minutes=30),
    )
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    # The world size joins the prefix: torchrun keeps the count when nodes join or leave an elastic job.
    return dist.PrefixStore(f"/lightning_localsgd/attempt_{attempt}/world_{os.environ.get('WORLD_SIZE', '')}", client)


def defer_signals(trainer: pl.Trainer, algorithm: PeriodicAlgorithm) -> Callable[[Any, Any], None]:
    """Make SLURM's requeue signal and SIGTERM requests that the ranks agree on at a synchronisation point.

    Lightning saves the requeue checkpoint inside the signal handler, at whatever point each rank is, and the
    strategy's checkpoint has every rank write its shard and agree on it: ranks one step apart would be saved at
    different steps, and the agreement interleaved with a round's collectives would mix tensors. Its SIGTERM
    handler broadcasts from inside the handler too, and its training loop broadcasts a SIGTERM flag before every
    step. Here the
    handlers only record a request; the flag collective of the next round carries it to every rank.
    Returns Lightning's requeue handler, to be called by every rank at the step the ranks agreed on.
    """
    connector = trainer._signal_connector
    lightning_requeue = connector._slurm_sigusr_handler_fn

    def request_requeue(signum: Any, frame: Any) -> None:
        log.info("Requeue signal %s received: checkpointing at the next synchronisation point.", signum)
        algorithm.raise_request("requeue")

    def request_stop(signum: Any, frame: Any) -> None:
        # Lightning would mark SIGTERM received here, and its loop would stop this rank alone at the end of the
        # batch while the others wait for it at the next round. The mark is set on every rank once agreed.
        log.info("SIGTERM received: stopping at the next synchronisation point.")
        if "stop" not in algorithm.requests_pending and trainer.strategy.launcher is not None:
            trainer.strategy.launcher.kill(signum)  # pass it on to the processes this one launched
        algorithm.raise_request("stop")

    def no_collective_per_step() -> None:
        pass  # the flag travels in the next synchronisation point's collective instead

    connector._slurm_sigusr_handler_fn = request_requeue  # type: ignore[method-assign]
    connector._sigterm_notifier_fn = request_stop  # type: ignore[method-assign]
    trainer.fit_loop.epoch_loop._broadcast_sigterm_tensor = no_collective_per_step  # type: ignore[method-assign]
    return lightning_requeue


_PATCHED = (
    ("fit_loop", "setup_data"),
    ("fit_loop.epoch_loop", "_broadcast_sigterm_tensor"),
    ("_signal_connector", "_slurm_sigusr_handler_fn"),
    ("_signal_connector", "_sigterm_notifier_fn"),
)


def restore_patched_hooks(trainer: pl.Trainer) -> None:
    """Undo :func:`prepare_training_data` and :func:`defer_signals` (back to the class methods)."""
    for path, name in _PATCHED:
        owner: Any = trainer
        for part in path.split("."):
            owner = getattr(owner, part)
        if name in vars(owner):
            delattr(owner, name)


def warn_about_per_step_collectives(trainer: pl.Trainer, strategy: str) -> None:
    """Warn about callbacks that add a world collective to every training step (they run on every local step).

    Checked against Lightning 2.6: ``Timer`` (``Trainer(max_time=...)``) broadcasts its stop decision after every
    batch when its interval is ``"step"``; ``ModelCheckpoint(train_time_interval=...)`` broadcasts its "is it
    time" decision after every batch (under automatic optimization; its manual-optimization path never checks
    the time).
    """
    from lightning.pytorch.callbacks import ModelCheckpoint, Timer

    costs = f"one collective on every local step, which undoes what {strategy} saves"
    automatic = trainer.lightning_module is None or trainer.lightning_module.automatic_optimization
    for callback in trainer.callbacks:
        if isinstance(callback, Timer) and callback._duration is not None and callback._interval == "step":
            rank_zero_warn(
                f"`Trainer(max_time=...)` (or `Timer(duration=...)`) broadcasts whether time is up from rank 0 after "
                f"every training batch: {costs}. Bound the run with `max_steps` or `max_epochs` instead, or use "
                "`Timer(duration=..., interval='epoch')` if stopping at the end of an epoch is enough."
            )
        if isinstance(callback, ModelCheckpoint) and callback._train_time_interval is not None and automatic:
            rank_zero_warn(
                f"`ModelCheckpoint(train_time_interval=...)` broadcasts whether the interval has passed from rank 0 "
                f"after every training batch: {costs}. Use `every_n_train_steps` instead (a multiple of the period "
                "checkpoints right after a round), or `lightning_localsgd.RoundCheckpoint(every_n_rounds=...)`."
            )


class SyncedStepLogCheck:
    """After the first training batch of a fit, warn once about values logged with ``sync_dist=True`` per step.

    Lightning syncs such a value when it is logged (``on_step=True`` is the default in ``training_step``): a
    barrier and an all-reduce on the world group, on every local step. Values logged only per epoch, or with
    ``rank_zero_only``, do not sync per step and are not reported; neither are validation metrics (validation is
    rare).
    """

    def __init__(self, strategy: str) -> None:
        self.strategy = strategy
        self.checked = False

    def __call__(self, trainer: pl.Trainer) -> None:
        if self.checked:
            return
        self.checked = True
        synced: dict[str, list[str]] = {}  # hook -> names logged with a per-step sync
        for metric in trainer.fit_loop.epoch_loop._results.values():
            meta = getattr(metric, "meta", None)
            if meta is None or not getattr(metric, "is_tensor", False) or not meta.on_step:
                continue  # a torchmetrics Metric syncs when computed, an epoch-only value at the epoch's end
            if meta.sync.should and not meta.sync.rank_zero_only:
                synced.setdefault(meta.fx, []).append(meta.name)
        if not synced:
            return
        where = "; ".join(f"{', '.join(repr(n) for n in names)} in `{hook}`" for hook, names in synced.items())
        rank_zero_warn(
            f"`self.log(..., sync_dist=True)` on every step ({where}) syncs each value when it is logged: a barrier "
            f"and an all-reduce per value on every local step, which undoes what {self.strategy} saves. Log training "
            "values with `sync_dist=False` (each rank's own value), or log a synced value from `on_train_batch_end` "
            "only every N steps (a multiple of the period); validation metrics with `sync_dist=True` are fine, "
            "validation is rare."
        )
