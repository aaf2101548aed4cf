"""DiLoCo: Local SGD whose rounds feed an outer optimizer.

Paper: "DiLoCo: Distributed Low-Communication Training of Language Models" (Douillard et al., arXiv 2311.08455).

Update rule, per rank i, with global parameters theta kept apart from the replicas (on the CPU by default):
    x_i <- inner optimizer step on g_i                        every step (the user's optimizer, state local)
    every `period` steps:
        x_mean = mean_j x_j                                   one all-reduce of the model, as Local SGD's round
        pseudo-gradient  delta = theta - x_mean
        theta <- outer optimizer step on theta with gradient delta   (Nesterov SGD, lr 0.7, momentum 0.9 by default)
        x_i <- theta                                          every replica restarts from the global model
Normalisation statistics are averaged at the round, as in Local SGD. With an outer SGD of lr 1 and no momentum,
theta <- theta - (theta - x_mean) = x_mean: Local SGD (tested step for step).

``overlap=True``: the delayed outer step of Streaming DiLoCo ("Streaming DiLoCo with overlapping communication",
Douillard et al., arXiv 2501.18512), built like CoCoD-SGD's rounds. At a round's start each rank keeps its replica
``s_i`` and starts a non-blocking all-reduce of it; the ``period`` inner steps run meanwhile; at the round's end
    theta <- outer step on theta with gradient (theta - mean_j s_j)      (the previous round's progress)
    x_i  <- theta + (x_i - s_i)                                          (keep this round's own progress)
and the next round starts at once. The outer step is one round late and the transfer never blocks; the replicas
never coincide (each keeps its own progress), so evaluation and checkpoints use their average. With an outer SGD
of lr 1 and no momentum this is CoCoD-SGD (tested step for step), normalisation statistics included (they travel
with the transfer, ``late_buffers.py``). Memory: two more copies of the model.

theta and the outer optimizer's state are the same on every rank (every rank computes the same outer step from the
same mean), are kept in float32 (or the parameters' wider dtype), and are part of each rank's checkpoint state.
"""

from __future__ import annotations

from typing import Any, Optional

import torch
from torch import Tensor

from lightning_localsgd._validation import check_bool
from lightning_localsgd.algorithms.buffers import BufferSelection
from lightning_localsgd.algorithms.periodic import PeriodicAlgorithm
from lightning_localsgd.algorithms.precision import in_state_precision, write_back
from lightning_localsgd.algorithms.rank_state import StateInit
from lightning_localsgd.comm import FlatParameters
from lightning_localsgd.comm.flat import DEFAULT_BUCKET_CAP_MB

DEFAULT_OUTER_OPTIMIZER = "SGD"
DEFAULT_OUTER_OPTIONS: dict[str, Any] = {"lr": 0.7, "momentum": 0.9, "nesterov": True}
GLOBAL_DEVICES = ("cpu", "device")


def outer_optimizer_class(name: str) -> type[torch.optim.Optimizer]:
    """A ``torch.optim`` optimizer by its class name (``"SGD"``, ``"Adam"``, ``"AdamW"``, ...)."""
    optimizer = getattr(torch.optim, name, None) if isinstance(name, str) else None
    if not (isinstance(optimizer, type) and issubclass(optimizer, torch.optim.Optimizer)):
        raise ValueError(f"`outer_optimizer` must name a torch.optim optimizer such as 'SGD' or 'AdamW', got {name!r}.")
    return optimizer


def check_outer_optimizer(name: str, options: Optional[dict[str, Any]]) -> tuple[str, dict[str, Any]]:
    """Validate the outer optimizer and its keyword arguments now, on a throwaway tensor."""
    optimizer = outer_optimizer_class(name)
    if options is not None and not isinstance(options, dict):
        raise ValueError(f"`outer_optimizer_options` must be a mapping of keyword arguments, got {options!r}.")
    chosen = dict(DEFAULT_OUTER_OPTIONS if options is None and name == DEFAULT_OUTER_OPTIMIZER else options or {})
    try:
        optimizer([torch.zeros(1)], **chosen)
    except (TypeError, ValueError) as error:
        raise ValueError(f"`outer_optimizer_options` {chosen} do not fit torch.optim.{name}: {error}") from error
    return name, chosen


class DiLoCo(PeriodicAlgorithm):
    """DiLoCo (see the module docstring).

    Args:
        period: inner steps between two outer steps (H; the paper uses 500 on language models).
        outer_optimizer: a ``torch.optim`` class name (default ``"SGD"``).
        outer_optimizer_options: its keyword arguments (default for SGD: lr 0.7, momentum 0.9, Nesterov).
        global_device: where theta and the outer optimizer's state live: ``"cpu"`` (default: no accelerator memory)
            or ``"device"`` (the model's device: faster outer steps on a GPU).
        overlap: the delayed outer step (see the module docstring): the round's transfer runs behind the next
            ``period`` inner steps.
        warmup_steps, bucket_cap_mb, buffers: as :class:`PeriodicAlgorithm` (theta starts as the model when the
            local phase starts).
    """

    def __init__(
        self,
        period: int = 100,
        outer_optimizer: str = DEFAULT_OUTER_OPTIMIZER,
        outer_optimizer_options: Optional[dict[str, Any]] = None,
        global_device: str = "cpu",
        overlap: bool = False,
        warmup_steps: int = 0,
        bucket_cap_mb: float = DEFAULT_BUCKET_CAP_MB,
        buffers: BufferSelection = None,
    ) -> None:
        super().__init__(period, warmup_steps, False, bucket_cap_mb, buffers)
        self.overlap = check_bool("overlap", overlap)
        self.rounds_synchronise = not self.overlap  # with the delayed step each replica keeps its own progress
        self.applies_rounds_late = self.overlap
        self.outer_optimizer_name, self.outer_optimizer_options = check_outer_optimizer(
            outer_optimizer, outer_optimizer_options
        )
        if global_device not in GLOBAL_DEVICES:
            raise ValueError(f"`global_device` must be one of {list(GLOBAL_DEVICES)}, got {global_device!r}.")
        self.global_device = global_device
        self.global_params: list[Tensor] = []  # theta, one tensor per bucket (at least float32)
        self.outer: Optional[torch.optim.Optimizer] = None

    # theta and its outer optimizer follow the same all-reduced mean on every rank: one copy in a checkpoint.
    shared_state_keys = ("global_params", "outer_optimizer")

    def _begin_local_phase(self) -> None:
        """theta <- the model (in sync: after set-up or warm-up), with a fresh outer optimizer."""
        device = torch.device("cpu") if self.global_device == "cpu" else self.flat.buckets[0].device
        self.global_params = [
            b.detach().to(device=device, dtype=torch.promote_types(b.dtype, torch.float32), copy=True)
            for b in self.flat.buckets
        ]
        optimizer = outer_optimizer_class(self.outer_optimizer_name)
        self.outer = optimizer(self.global_params, **self.outer_optimizer_options)
        if self.overlap:
            self._start_round()

    def _declare_state_buffers(self) -> dict[str, StateInit]:
        if not self.overlap:
            return {}
        # s_i, and the buffer its mean is all-reduced into (holding the mean once the transfer landed)
        return {"round_start": "params", "round_start_mean": "params"}

    def _outer_step(self, means: list[Tensor]) -> None:
        """theta <- outer optimizer step with the pseudo-gradient theta - mean. ``means`` are scratch (the callers
        overwrite them next): one on theta's device in theta's dtype receives the pseudo-gradient itself, so the
        step holds no copy of the model."""
        assert self.outer is not None
        for theta, mean in zip(self.global_params, means):
            if mean.device == theta.device and mean.dtype == theta.dtype:
                theta.grad = torch.sub(theta, mean, out=mean)
            else:  # theta on the CPU, or a half-precision model: one converted copy
                theta.grad = theta - mean.to(theta.device, theta.dtype)
        self.outer.step()
        for theta in self.global_params:
            theta.grad = None

    def _round(self) -> None:
        with torch.no_grad():
            if not self.overlap:
                super()._round()  # x_mean, in the buckets; normalisation statistics averaged
                self._outer_step(self.flat.buckets)
                for theta, bucket in zip(self.global_params, self.flat.buckets):
                    bucket.copy_(theta)
                return
            self._settle_in_flight()
            starts, means = self.state_buckets("round_start"), self.state_buckets("round_start_mean")
            self._outer_step(means)
            worked = in_state_precision(self.flat.buckets)
            for x, start, theta in zip(worked, starts, self.global_params):
                x.sub_(start).add_(theta.to(x.device, x.dtype))  # theta + this round's own progress
            write_back(self.flat.buckets, worked)
            self._start_round()  # normalisation statistics travel with it (late_buffers.py)

    def _start_round(self) -> None:
        """s_i <- x_i, and its all-reduce started; it lands during the next ``period`` inner steps."""
        self._settle_in_flight()
        for start, mean, x in zip(
            self.state_buckets("round_start"), self.state_buckets("round_start_mean"), self.flat.buckets
        ):
            start.copy_(x)
            mean.copy_(x)
        self._start_transfers(self.state_buckets("round_start_mean"))

    def _on_relayout(self, old: FlatParameters) -> None:
        raise ValueError(
            f"{self.label}: the set of trainable parameters changed during fit; DiLoCo's outer optimizer state is laid "
            "out for the set it started with. Freeze or unfreeze layers before `fit`, or start a new `fit`."
        )

    def _extra_state(self) -> dict[str, Any]:
        if self.outer is None:  # still in warm-up: theta does not exist yet
            return {}
        state: dict[str, Any] = {"outer_optimizer": self.outer.state_dict()}
        if not self._theta_is_the_replica():  # else the replica (or the checkpoint's weights) restores it
            state["global_params"] = [t.detach().cpu() for t in self.global_params]
        return state

    def _theta_is_the_replica(self) -> bool:
        """Right after a blocking round the replica is a copy of theta, bit for bit: stored once, not twice."""
        return not self.overlap and all(
            theta.device == bucket.device and theta.dtype == bucket.dtype and torch.equal(theta, bucket)
            for theta, bucket in zip(self.global_params, self.flat.buckets)
        )

    def _load_extra_state(self, state: dict[str, Any]) -> None:
        if "outer_optimizer" not in state:  # saved in warm-up
            return
        if self.outer is None:  # saved after warm-up, loaded into a run that is still set up for it
            self._begin_local_phase()
        saved = state.get("global_params")
        if saved is None:  # saved right after a blocking round: theta is the replica, restored before this
            saved = self.flat.buckets
        if len(saved) != len(self.global_params):
            raise ValueError("The saved DiLoCo state was laid out for another model: resume with the same model.")
        with torch.no_grad():
            for theta, value in zip(self.global_params, saved):
                theta.copy_(value)
        self.outer.load_state_dict(state["outer_optimizer"])
