"""LIEC-SGD's server, sharded over the ranks: rank k serves the k-th part of every chunk.

The replicated server all-gathers every rank's packed ``C(g_j)``, and every rank computes the whole server step
itself: ``(N - 1) * b`` bytes per rank for a payload of ``b`` bytes, which is 1/32 of a float32 ring all-reduce only
at two ranks (1/8 at eight, nothing saved at 64). Sharded, per chunk:

1. each rank compresses its gradient shard by shard and sends shard k's payload to rank k (an all-to-all);
2. rank k decodes the N payloads of its shard, forms ``u = mean_j C(g_j) + e`` on it, compresses it and keeps
   ``e <- u - C(u)`` for that shard only;
3. the packed ``C(u)`` shards are all-gathered, so every rank steps on the whole server result.

Each rank sends ``2 (N - 1) / N * b`` bytes, about 1/32 of the all-reduce at any N; the server step's work and its
error are split over the ranks. Shards are cut where the compressor's blocks end, so every element is compressed in
the block it would be in on one server: the results are the same bits as the replicated server's.

Where ``e`` lives: rank k holds the server error of the shards it serves and zeros elsewhere, in the usual state
buffer (so a checkpoint keeps each rank's part). The shards follow the exchange's parameters; when those change
(a parameter without a gradient on every rank joins or leaves, or the parameters are re-bucketed) the parts are
brought back together by one all-reduce of that optimizer's error and re-split, rank 0 keeping the error of the
parameters left out of the step: :class:`ServerLayouts` keeps track. At a full-precision step ``e`` is summed over
the ranks (each element is non-zero on one rank at most, so the sum is exact) and reset.
"""

from __future__ import annotations

from typing import Any, Optional, Union

SERVER_CHOICES = ("auto", "sharded", "replicated")

# What one optimizer's server error looks like on the ranks: zero everywhere (fresh, or after a full-precision
# step), the same on every rank (a replicated server, or a checkpoint from one), or split by a sharded layout.
ZERO = "zero"
REPLICATED = "replicated"
Layout = Union[str, tuple[int, ...]]  # ZERO, REPLICATED, or the exchange's parameter indices it was split by


def shard_bounds(numel: int, unit: int, world: int) -> list[tuple[int, int]]:
    """``(start, numel)`` of each rank's shard of a chunk of ``numel`` elements: whole units of ``unit`` elements
    (the compressor's blocks), as evenly as they go, lower ranks taking the extra unit; a shard may be empty."""
    units = -(-numel // unit)
    bounds, start = [], 0
    for rank in range(world):
        count = units // world + (1 if rank < units % world else 0)
        length = min(count * unit, numel - start)
        bounds.append((start, max(length, 0)))
        start += max(length, 0)
    return bounds


class ServerLayouts:
    """Per optimizer index: how its server error is split over the ranks (see the module docstring)."""

    def __init__(self) -> None:
        self._layouts: dict[int, Layout] = {}
        self._default: Layout = ZERO

    def reset_zero(self) -> None:
        """Every optimizer's server error is zero (a fresh set-up)."""
        self._layouts, self._default = {}, ZERO

    def get(self, index: int) -> Layout:
        return self._layouts.get(index, self._default)

    def set(self, index: int, layout: Layout) -> None:
        self._layouts[index] = layout

    def state_dict(self) -> dict[str, Any]:
        return {str(i): (list(v) if isinstance(v, tuple) else v) for i, v in self._layouts.items()}

    def load_state_dict(self, state: Optional[dict[str, Any]]) -> None:
        """Restore :meth:`state_dict`; ``None`` (a checkpoint of a replicated server) reads as replicated."""
        if state is None:
            self._layouts, self._default = {}, REPLICATED
            return
        self._layouts = {int(i): (tuple(v) if isinstance(v, list) else v) for i, v in state.items()}
        self._default = ZERO
