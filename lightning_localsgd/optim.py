"""Plain PyTorch: any algorithm of this package as an optimizer wrapper, for a training loop of one's own.

::

    dist.init_process_group("gloo")                                   # e.g. under torchrun
    model = Net()                                                     # or DistributedDataParallel(Net(), ...)
    optimizer = LocalSGDOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), VRLSGD(period=8), model)
    for x, y in loader:
        optimizer.zero_grad()
        loss_fn(model(x), y).backward()
        optimizer.step()                                              # local step; a round every 8 steps
    with optimizer.consensus():                                       # the average of the replicas, for evaluation
        evaluate(model)
    optimizer.finalize()                                              # every rank keeps the average

The algorithm object is the one the Lightning and Fabric strategies drive: the wrapper only calls its moments
around the wrapped optimizer's ``step``. Each ``step()`` is one training step (the round schedule counts them). A
model wrapped in ``DistributedDataParallel`` gets a communication hook that leaves its gradients local (the
algorithm does the synchronisation, warm-up included), so existing DDP code keeps its wrapper.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from datetime import timedelta
from typing import Any, Callable, Optional

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.optim import Optimizer

from lightning_localsgd._validation import check_positive_float
from lightning_localsgd.algorithms.periodic import PeriodicAlgorithm
from lightning_localsgd.comm import ProcessGroupCommunicator
from lightning_localsgd.comm.layout import WorldLayout
from lightning_localsgd.driving import comm_metrics, rank_payload, restore_rank_payload, step_and_follow
from lightning_localsgd.hooks import local_gradients_hook
from lightning_localsgd.strategies.safety import check_supported_model, check_supported_optimizers


class LocalSGDOptimizer(Optimizer):
    """Wraps ``optimizer`` so that each ``step()`` is a local step of ``algorithm`` on this rank's replica of ``model``.

    Construction is collective (every rank, same model): it starts every rank from rank 0's model and creates the
    algorithm's process group. It looks like the wrapped optimizer to the rest of the loop (``param_groups``,
    ``zero_grad``, learning-rate schedulers).

    Args:
        optimizer: the optimizer of ``model``'s parameters (any: SGD, Adam, ... with an ``lr`` per group).
        algorithm: a fresh algorithm instance, e.g. ``LocalSGD(period=8)`` or ``VRLSGD(period=20)``.
        model: the model, bare or wrapped in ``DistributedDataParallel`` (which then must not broadcast buffers
            every forward: construct it with ``broadcast_buffers=False``; the algorithm averages them per round).
        process_group: the ranks that train together (default: the world); the algorithm makes its own group of
            them, so that its collectives carry ``collective_timeout``.
        grad_scaler: an fp16 ``torch.amp.GradScaler``: ``step()`` then calls ``scaler.step`` and ``scaler.update``
            itself (call ``scaler.scale(loss).backward()``, then ``optimizer.step()``), so that a step the scaler
            skips is seen by the algorithm.
        on_nonfinite: ``"raise"`` (stop every rank naming the rank with inf/NaN) or ``"skip_round"`` (roll back).
        collective_timeout: seconds a collective may wait for a peer before the run stops with an error.
        nodes: ``(num_nodes, processes_per_node)`` for an algorithm with per-node groups (hierarchical Local SGD);
            by default one node holding the whole group.
    """

    def __init__(
        self,
        optimizer: Optimizer,
        algorithm: PeriodicAlgorithm,
        model: nn.Module,
        process_group: Optional[dist.ProcessGroup] = None,
        grad_scaler: Optional[Any] = None,
        on_nonfinite: str = "raise",
        collective_timeout: float = 600.0,
        nodes: Optional[tuple[int, int]] = None,
    ) -> None:
        name = type(self).__name__
        if not isinstance(optimizer, Optimizer):
            raise TypeError(f"{name} wraps a torch.optim.Optimizer; got {type(optimizer).__name__}.")
        if not isinstance(algorithm, PeriodicAlgorithm):
            raise TypeError(f"{name} needs an algorithm such as LocalSGD(period=8); got {type(algorithm).__name__}.")
        if algorithm.is_set_up:
            raise ValueError(f"{name}: the algorithm is already set up for another model; pass a fresh instance.")
        if not dist.is_available() or not dist.is_initialized():
            raise RuntimeError(
                f"{name} needs the default process group: call `torch.distributed.init_process_group(...)` first "
                "(torchrun sets the environment it reads)."
            )
        module = self._unwrap(model, name)
        check_supported_model(module, name)
        check_supported_optimizers([optimizer], name)
        timeout = timedelta(seconds=check_positive_float("collective_timeout", collective_timeout))
        algorithm.set_nonfinite_policy(on_nonfinite)
        algorithm.label = f"{name} ({type(algorithm).__name__})"
        algorithm.timeout = timeout
        self.optimizer = optimizer
        self.algorithm = algorithm
        self.model = module
        self.grad_scaler = grad_scaler if grad_scaler is not None and grad_scaler.is_enabled() else None
        ranks = None if process_group is None else dist.get_process_group_ranks(process_group)
        group = dist.new_group(ranks, timeout=timeout)
        world = dist.get_world_size(group)
        num_nodes, per_node = nodes if nodes is not None else (1, world)
        algorithm.create_groups(WorldLayout(num_nodes, per_node, dist.get_rank(group), ranks), timeout)
        algorithm.gradients_may_overflow = self.grad_scaler is not None
        algorithm.grad_scale = self.grad_scaler.get_scale if self.grad_scaler is not None else None
        algorithm.setup(module, ProcessGroupCommunicator(group, timeout=timeout), [optimizer])

    @staticmethod
    def _unwrap(model: nn.Module, name: str) -> nn.Module:
        if not isinstance(model, DistributedDataParallel):
            return model
        if model.broadcast_buffers and any(True for _ in model.module.buffers()):
            raise ValueError(
                f"{name}: this DistributedDataParallel broadcasts rank 0's buffers at every forward, a collective per "
                "step that also overwrites every rank's BatchNorm statistics between rounds. Construct it with "
                "`broadcast_buffers=False`: the algorithm averages the buffers at each round."
            )
        # DDP would all-reduce every gradient: keep them local, the algorithm synchronises (warm-up included).
        model.register_comm_hook(None, local_gradients_hook)
        return model.module

    # ------------------------------------------------------------------ the optimizer interface
    @property
    def param_groups(self) -> list[dict[str, Any]]:  # type: ignore[override]
        return self.optimizer.param_groups

    @property
    def state(self) -> Any:  # type: ignore[override]
        return self.optimizer.state

    @property
    def defaults(self) -> dict[str, Any]:  # type: ignore[override]
        return self.optimizer.defaults

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.optimizer.zero_grad(set_to_none=set_to_none)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        self.optimizer.add_param_group(param_group)  # the algorithm follows the trainable set at its next round

    @torch.no_grad()
    def step(self, closure: Optional[Callable[[], Any]] = None) -> Any:  # type: ignore[override]
        """One training step: (``closure``), the algorithm's pre-step exchange, the optimizer step, the algorithm's
        correction and, when the schedule says so, a round. With a closure, warm-up gradients travel while its
        backward runs."""
        loss = None
        if closure is not None:
            self.algorithm.before_backward(self.optimizer)
            with torch.enable_grad():
                loss = closure()
        self.algorithm.before_optimizer_step(self.optimizer)
        scaler = self.grad_scaler

        def run_step() -> None:
            if scaler is None:
                self.optimizer.step()
            else:
                scaler.step(self.optimizer)
                scaler.update()

        _, counted = step_and_follow(self.algorithm, self.optimizer, run_step, scaler)
        if counted:
            self.algorithm.end_step()
        return loss

    def state_dict(self) -> dict[str, Any]:  # type: ignore[override]
        """This rank's state: the wrapped optimizer's, the algorithm's (its replica included) and the grad scaler's.
        Every rank saves its own (e.g. ``torch.save(optimizer.state_dict(), f"ckpt.rank{rank}.pt")``)."""
        return rank_payload(self.algorithm, [self.optimizer], self.grad_scaler, drop_replica=False)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:  # type: ignore[override]
        """Restore :meth:`state_dict` on the same rank: model replica, optimizer, algorithm state, schedule."""
        device = next(iter(self.algorithm.flat.params)).device
        restore_rank_payload(state_dict, self.algorithm, [self.optimizer], self.grad_scaler, device)

    # ------------------------------------------------------------------ the algorithm's read-outs
    @contextmanager
    def consensus(self) -> Iterator[None]:
        """Collective: inside, the model holds the average of the replicas (evaluate or save it here)."""
        with self.algorithm.consensus():
            yield

    def finalize(self) -> None:
        """Collective, at the end of training: every rank keeps the average of the replicas."""
        self.algorithm.finalize()

    def comm_metrics(self) -> dict[str, float]:
        """``comm/rounds``, ``comm/mb_sent``, ``comm/seconds``, ... and the algorithm's own values, to log."""
        return comm_metrics(self.algorithm)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({type(self.algorithm).__name__}, {self.optimizer!r})"
