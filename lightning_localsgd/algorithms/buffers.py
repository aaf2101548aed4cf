"""Which of a module's buffers are averaged with the replicas.

Averaging every floating-point buffer is wrong for many models: a causal mask holds ``-inf`` (never finite, so
the non-finite guard would stop or roll back every round), a queue of negatives or a cache is per-rank data,
and a frozen random projection must not move at all. DDP broadcasts all buffers from rank 0 at every step,
which would be a collective per local step here. The default therefore averages what data parallelism needs
to agree on and nothing else: the running statistics of normalisation layers (BatchNorm, InstanceNorm with
``track_running_stats``). Everything else stays each rank's own and is stored per rank in checkpoints.
"""

from __future__ import annotations

import re
from typing import Callable, Union

from torch import Tensor, nn
from torch.nn.modules.batchnorm import _NormBase

BufferPredicate = Callable[[str, Tensor], bool]
# "norm" (default), "all" (every floating-point buffer), "none", a regular expression matched against the buffer's
# qualified name (``re.search``), or a predicate ``(qualified_name, buffer) -> bool``.
BufferSelection = Union[str, BufferPredicate, None]

_NAMED = ("norm", "all", "none")


def check_buffer_selection(selection: BufferSelection) -> BufferSelection:
    """Validate ``buffers=`` at construction, so a bad regular expression fails before any process starts."""
    if selection is None or callable(selection) or selection in _NAMED:
        return selection
    if not isinstance(selection, str):
        raise ValueError(
            f"`buffers` must be 'norm', 'all', 'none', a regular expression or a callable (name, buffer) -> bool; "
            f"got {selection!r} ({type(selection).__name__})."
        )
    try:
        re.compile(selection)
    except re.error as error:
        raise ValueError(f"`buffers` is not a valid regular expression ({error}): {selection!r}.") from error
    return selection


def _normalisation_buffer_names(module: nn.Module) -> set[str]:
    names = set()
    for prefix, sub in module.named_modules():
        if isinstance(sub, _NormBase) and sub.track_running_stats:
            for name in ("running_mean", "running_var"):
                if getattr(sub, name, None) is not None:
                    names.add(f"{prefix}.{name}" if prefix else name)
    return names


def averaged_buffers(module: nn.Module, selection: BufferSelection = None) -> list[tuple[str, Tensor]]:
    """The floating-point buffers to average, as (qualified name, buffer), in the module's deterministic order.

    Integer buffers (``num_batches_tracked``) are never averaged: they count identically on every rank.
    """
    named = [(name, b) for name, b in module.named_buffers() if b.is_floating_point()]
    if selection is None or selection == "norm":
        wanted = _normalisation_buffer_names(module)
        return [(name, b) for name, b in named if name in wanted]
    if selection == "all":
        return named
    if selection == "none":
        return []
    if isinstance(selection, str):
        pattern = re.compile(selection)
        return [(name, b) for name, b in named if pattern.search(name)]
    return [(name, b) for name, b in named if selection(name, b)]


def unshared_buffers(module: nn.Module, selection: BufferSelection = None) -> list[tuple[str, Tensor]]:
    """The buffers that stay each rank's own (every buffer not averaged, integer ones included)."""
    shared = {id(b) for _, b in averaged_buffers(module, selection)}
    return [(name, b) for name, b in module.named_buffers() if id(b) not in shared]
