"""Each rank's algorithm state: declared bucket buffers, and its ``state_dict`` / ``load_state_dict``.

An algorithm declares its per-rank state buffers once (Delta for VRL-SGD, anchor and anchor momentum for
Overlap Local-SGD, ...) with how a new parameter's slice starts (zeros, or the parameter's value). The base
then allocates them in the flat bucket layout (float32 for half-precision parameters), stores and restores them
with every checkpoint, and carries them over when the managed parameter set changes (a layer unfrozen mid-fit).
"""

from __future__ import annotations

from collections.abc import Callable
from copy import deepcopy
from typing import TYPE_CHECKING, Any, Literal

import torch
from torch import Tensor

from lightning_localsgd.algorithms.buffers import unshared_buffers
from lightning_localsgd.algorithms.precision import state_copy, state_zeros_like
from lightning_localsgd.comm import FlatParameters

if TYPE_CHECKING:
    from lightning_localsgd.algorithms.periodic import PeriodicAlgorithm

StateInit = Literal["zeros", "params"]


def allocate(flat: FlatParameters, init: StateInit) -> list[Tensor]:
    if init == "zeros":
        return [state_zeros_like(b) for b in flat.buckets]
    return [state_copy(b) for b in flat.buckets]


def relayout(old: FlatParameters, new: FlatParameters, buckets: list[Tensor], init: StateInit) -> list[Tensor]:
    """``buckets`` (laid out like ``old``) re-laid like ``new``: kept parameters keep their slice's values."""
    fresh = allocate(new, init)
    old_views, new_views = old.views_of(buckets), new.views_of(fresh)
    with torch.no_grad():
        for j, p in enumerate(new.params):
            i = old.index_of.get(id(p))
            if i is not None:
                new_views[j].copy_(old_views[i])
    return fresh


def copy_checked(what: str, targets: list[Tensor], sources: list[Tensor]) -> None:
    if len(targets) != len(sources) or any(t.shape != s.shape for t, s in zip(targets, sources)):
        raise ValueError(
            f"The saved {what}s ({[tuple(s.shape) for s in sources]}) do not fit this model's "
            f"({[tuple(t.shape) for t in targets]}): the checkpoint comes from a different model."
        )
    with torch.no_grad():
        for target, source in zip(targets, sources):
            target.copy_(source)


class RankState:
    """The state half of :class:`~lightning_localsgd.algorithms.periodic.PeriodicAlgorithm` (a mixin)."""

    def _init_rank_state(self) -> None:
        self._state_init: dict[str, StateInit] = {}  # declared in _declare_state_buffers
        self._state: dict[str, list[Tensor]] = {}
        self._state_views: dict[str, list[Tensor]] = {}

    def _declare_state_buffers(self) -> dict[str, StateInit]:
        """Per-rank bucket buffers of the algorithm, by checkpoint key, with how a new parameter's slice starts."""
        return {}

    def _allocate_state(self: PeriodicAlgorithm) -> None:
        self._state_init = dict(self._declare_state_buffers())
        self._state = {name: allocate(self.flat, init) for name, init in self._state_init.items()}
        self._state_views = {}

    def _relayout_state(self: PeriodicAlgorithm, old: FlatParameters) -> None:
        self._state = {
            name: relayout(old, self.flat, self._state[name], init) for name, init in self._state_init.items()
        }
        self._state_views = {}

    def state_buckets(self, name: str) -> list[Tensor]:
        """A declared state buffer, in the bucket layout of the parameters."""
        return self._state[name]

    def state_views(self: PeriodicAlgorithm, name: str) -> list[Tensor]:
        """Per-parameter views of a declared state buffer (index i is ``flat.params[i]``)."""
        views = self._state_views.get(name)
        if views is None:
            views = self._state_views[name] = self.flat.views_of(self._state[name])
        return views

    def state_dict(self: PeriodicAlgorithm, copy: bool = True) -> dict[str, Any]:
        """This rank's state: counters, its own replica (even while the consensus is swapped in), algorithm state.

        A collective still in flight is finished first, so that its result is part of the state. The replica is
        under ``param_buckets`` / ``float_buffers``; a checkpoint may drop them when ``in_sync`` is True (the
        replica is then the consensus, stored once in the checkpoint's weights). ``copy=False``: the tensors are
        the live ones, for a caller that writes them before training goes on (a checkpoint), with no copy of
        the model; ``copy=True`` (a rollback point, a state kept for later): clones.
        """
        keep: Callable[[Tensor], Tensor] = (lambda t: t.detach().clone()) if copy else (lambda t: t.detach())
        self._settle_in_flight()
        if self._local_backup is not None:
            buckets, buffers = self._local_backup
        else:
            buckets, buffers = self.flat.buckets, self.averaged_buffers()
        names = {id(p): n for n, p in self.module.named_parameters()}
        return {
            "algorithm": type(self).__name__,
            **self.schedule.state_dict(),
            "in_sync": self.in_sync,
            "managed": [names.get(id(p), "?") for p in self.flat.params],
            # Buckets hold each parameter in its memory order (e.g. channels_last): a model in another format
            # would read them scrambled.
            "layouts": [[list(shape), list(stride)] for shape, stride in self.flat.layouts],
            "param_buckets": [keep(b) for b in buckets],
            "float_buffers": [keep(b) for b in buffers],
            "unshared_buffers": {n: keep(b) for n, b in unshared_buffers(self.module, self.buffers)},
            "comm_stats": self.comm.stats.state_dict(),
            "late_buffers": self._late_buffers.state_dict(),  # an average of buffers not applied yet
            **{name: [keep(b) for b in bufs] for name, bufs in self._state.items()},
            # The algorithm's own extra state may hold live tensors (an optimizer's state_dict does): a state kept
            # for later must not change as training goes on.
            **(deepcopy(self._extra_state()) if copy else self._extra_state()),
        }

    def load_state_dict(self: PeriodicAlgorithm, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`'s output. Without ``param_buckets`` / ``float_buffers`` the module's current
        values are kept (the checkpoint's consensus weights, loaded before)."""
        if state.get("algorithm") != type(self).__name__:
            raise ValueError(
                f"This state was saved by {state.get('algorithm')!r}, not {type(self).__name__!r}: "
                "resume with the same strategy that wrote the checkpoint."
            )
        self.exit_consensus()
        self._settle_in_flight()  # e.g. a transfer started at set-up: every rank started it, every rank ends it
        self.flat.ensure_views()
        self._adopt_saved_managed_set(state.get("managed"))
        self._check_saved_layouts(state.get("layouts"))
        if "param_buckets" in state:
            copy_checked("parameter bucket", self.flat.buckets, state["param_buckets"])
        if "float_buffers" in state:
            copy_checked("averaged buffer", self.averaged_buffers(), state["float_buffers"])
        own = dict(unshared_buffers(self.module, self.buffers))
        with torch.no_grad():
            for name, saved in state.get("unshared_buffers", {}).items():
                if name in own and own[name].shape == saved.shape:
                    own[name].copy_(saved)
        self.schedule.load_state_dict(state)
        self.in_sync = bool(state["in_sync"])
        self.comm.stats.load_state_dict(state["comm_stats"])
        for name in self._state:
            copy_checked(f"{name} bucket", self._state[name], state[name])
        self._late_buffers.load_state_dict(state.get("late_buffers"))
        self._load_extra_state(state)

    def _adopt_saved_managed_set(self: PeriodicAlgorithm, saved: list[str] | None) -> None:
        """Match the managed set the state was saved with (e.g. saved after a layer was unfrozen)."""
        if saved is None:
            return
        names = {id(p): n for n, p in self.module.named_parameters()}
        if [names.get(id(p), "?") for p in self.flat.params] == saved:
            return
        by_name = dict(self.module.named_parameters())
        missing = [n for n in saved if n not in by_name]
        if missing:
            raise ValueError(
                f"The saved state manages parameters this model does not have ({missing[:5]}): the checkpoint comes "
                "from a different model."
            )
        self._rebucket([by_name[n] for n in saved], average_leaving=False)

    def _check_saved_layouts(self: PeriodicAlgorithm, saved: list[Any] | None) -> None:
        mine = [[list(shape), list(stride)] for shape, stride in self.flat.layouts]
        if saved is None or len(saved) != len(mine):
            return  # an older checkpoint, or a different model (the bucket copy says which)
        if [[list(a), list(b)] for a, b in saved] != mine:
            names = {id(p): n for n, p in self.module.named_parameters()}
            bad = next(i for i, (a, b) in enumerate(zip(saved, mine)) if [list(a[0]), list(a[1])] != b)
            raise ValueError(
                f"The saved state lays out parameter {names.get(id(self.flat.params[bad]), bad)!r} as shape/strides "
                f"{saved[bad]}, this model as {mine[bad]}: resume with the model in the memory format it was saved "
                "in (e.g. call `.to(memory_format=torch.channels_last)` before `fit` as the first run did)."
            )

    def _extra_state(self) -> dict[str, Any]:
        return {}

    def _load_extra_state(self, state: dict[str, Any]) -> None:
        pass
