"""Gossip topologies: who talks to whom, and with what weight.

A topology over ``n`` ranks is a symmetric, doubly stochastic gossip matrix ``W`` (rows and columns sum to 1, so
mixing with it keeps the mean of the replicas) whose nonzero off-diagonal entries are the edges a rank exchanges
over. One gossip round is ``x_i <- sum_j W_ij x_j``: rank ``i`` sends its vector to its neighbours and receives
theirs. How fast repeated rounds bring the replicas together is set by ``lambda2``, the second-largest absolute
eigenvalue of ``W``: disagreement shrinks by about ``lambda2`` per round.

* :func:`ring`: ``W_ii = W_{i,i+1} = W_{i,i-1} = 1/3`` (two neighbours; ``lambda2 = (1 + 2 cos(2 pi / n)) / 3``, close
  to 1 for large ``n``). With 2 ranks both neighbours are the same rank (weight 2/3).
* :func:`torus`: a 2-D torus of ``rows x cols`` ranks, four neighbours at ``1/5`` each. A side of 1 or 2 makes moves
  land on the rank itself or twice on one neighbour. From ``2 x 3`` up it mixes better than the ring of the same
  size; with a prime ``n`` (the grid is ``1 x n``) or ``n = 4`` (``2 x 2``) it keeps only two neighbours, as the
  ring does, and ``lambda2`` is larger than the ring's (``n = 5``: 0.724 against 0.539; ``n = 4``: 0.6 against
  1/3). Built by name it then falls back to the ring, with a warning.
* :func:`exponential`: neighbours at distances ``+-1, +-2, +-4, ...`` (a circulant graph, ``O(log n)`` neighbours,
  ``lambda2`` far from 1 at every size), uniform weights.
* :func:`fully_connected`: ``W = 1/n``: one gossip round is an exact average (the check that D-PSGD on it is
  synchronous SGD).
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field

import torch
from torch import Tensor

TOPOLOGIES = ("ring", "torus", "exponential", "fully_connected")


@dataclass(frozen=True)
class Topology:
    """A gossip matrix over ``n`` ranks (see the module docstring).

    Attributes:
        name: how it was built (``"ring"``, ``"torus 2x4"``, ...).
        weights: the ``n x n`` float64 gossip matrix ``W``.
    """

    name: str
    weights: Tensor
    shifts: tuple[tuple[int, ...], ...] = ()
    _lambda2: float = field(init=False, repr=False, compare=False, default=0.0)
    # Each rank's neighbours and weights, read from W once: gossip asks for them several times per step.
    _rows: tuple[dict[int, float], ...] = field(init=False, repr=False, compare=False, default=())

    def __post_init__(self) -> None:
        w = self.weights
        n = w.shape[0]
        if w.dim() != 2 or w.shape[1] != n or n < 1:
            raise ValueError(f"A gossip matrix is square, got shape {tuple(w.shape)}.")
        ones = torch.ones(n, dtype=w.dtype)
        if not (torch.allclose(w, w.T, atol=1e-12) and torch.allclose(w @ ones, ones, atol=1e-12)):
            raise ValueError(f"The gossip matrix of {self.name!r} must be symmetric with rows summing to 1.")
        if bool((w < 0).any()):
            raise ValueError(f"The gossip matrix of {self.name!r} has negative weights.")
        eigenvalues = torch.linalg.eigvalsh(w).abs().sort(descending=True).values
        object.__setattr__(self, "_lambda2", float(eigenvalues[1]) if n > 1 else 0.0)
        if n > 1 and self._lambda2 >= 1 - 1e-9:
            raise ValueError(f"The topology {self.name!r} is not connected (lambda2 = 1): replicas would never agree.")
        rows = w.tolist()
        neighbours = tuple({j: v for j, v in enumerate(row) if j != i and v > 0} for i, row in enumerate(rows))
        object.__setattr__(self, "_rows", neighbours)
        for shift in self.shifts:
            if sorted(shift) != list(range(n)) or any(shift[i] == i for i in range(n)):
                raise ValueError(f"A shift of {self.name!r} must move every rank to another: {shift}.")
        for i in range(n):
            if sorted(shift[i] for shift in self.shifts) != sorted(self.neighbours(i)):
                raise ValueError(f"The shifts of {self.name!r} must reach each neighbour of rank {i} exactly once.")

    @property
    def size(self) -> int:
        return int(self.weights.shape[0])

    @property
    def lambda2(self) -> float:
        """Second-largest absolute eigenvalue of ``W``: the per-round contraction of disagreement."""
        return self._lambda2

    def eigenvalues(self) -> Tensor:
        """The eigenvalues of ``W`` (float64, ascending)."""
        return torch.linalg.eigvalsh(self.weights)

    def self_weight(self, rank: int) -> float:
        return float(self.weights[rank, rank])

    def neighbours(self, rank: int) -> dict[int, float]:
        """The other ranks ``rank`` exchanges with, in ascending order, with their weights ``W[rank, peer]``."""
        return dict(self._rows[rank])  # a copy: callers may change it

    def degree(self, rank: int) -> int:
        return len(self.neighbours(rank))

    def phases(self, rank: int) -> list[tuple[int, int]]:
        """The exchange schedule of ``rank``: one ``(send_to, receive_from)`` pair per phase.

        Every rank runs phase k at once: rank i sends to ``shift_k(i)`` while ``shift_k^-1(i)`` sends to it, so each
        link carries one message at a time. Sending to every neighbour at once measured 62 % of the wire rate on the
        lab's 200 Mbit/s links at 4 ranks (TCP flows competing for one link), the phases 99 %
        (``python -m benchmarks.neighbour_probe``).
        """
        return [(shift[rank], shift.index(rank)) for shift in self.shifts]


def _from_offsets(name: str, n: int, offsets: set[int]) -> Topology:
    """The circulant topology in which rank ``i`` talks to ``i + d mod n`` for every ``d`` in ``offsets``, uniformly."""
    peers = sorted({d % n for d in offsets} - {0})
    w = torch.zeros(n, n, dtype=torch.float64)
    share = 1.0 / (len(peers) + 1)
    for i in range(n):
        w[i, i] = share
        for d in peers:
            w[i, (i + d) % n] = share
    return Topology(name, w, _offset_shifts(n, peers))


def _offset_shifts(n: int, offsets: list[int]) -> tuple[tuple[int, ...], ...]:
    """``i -> i + d mod n`` for each distinct nonzero ``d``."""
    distinct = sorted({d % n for d in offsets} - {0})
    return tuple(tuple((i + d) % n for i in range(n)) for d in distinct)


def ring(n: int) -> Topology:
    """Each rank with its two neighbours on a ring, weights 1/3 (with 2 ranks: 1/3 self, 2/3 the other)."""
    _check_size(n)
    if n == 1:
        return fully_connected(n)
    if n == 2:
        return Topology("ring", torch.tensor([[1, 2], [2, 1]], dtype=torch.float64) / 3, _offset_shifts(2, [1]))
    w = torch.zeros(n, n, dtype=torch.float64)
    for i in range(n):
        for j in (i - 1, i, i + 1):
            w[i, j % n] += 1 / 3
    return Topology("ring", w, _offset_shifts(n, [1, -1]))


def torus_shape(n: int) -> tuple[int, int]:
    """The most square ``rows x cols = n`` (a prime ``n`` gives ``1 x n``, which mixes worse than a ring)."""
    rows = max(r for r in range(1, math.isqrt(n) + 1) if n % r == 0)
    return rows, n // rows


def torus(n: int, rows: int | None = None) -> Topology:
    """A 2-D torus of ``rows x (n / rows)`` ranks, each rank with its 4 neighbours at 1/5 (a side of 1 or 2 makes
    moves land on the rank itself or twice on one neighbour, and their weights add up).

    With ``rows=None``, the most square grid; where that grid mixes no better than :func:`ring` (``lambda2`` not
    smaller: a prime ``n`` of at least 3, or ``n = 4``), the ring instead, with a warning. Such a grid has the
    ring's two neighbours, so it sends the same bytes per round, only with weights that agree more slowly. An
    explicit ``rows`` is built as asked.
    """
    _check_size(n)
    if rows is None:
        grid = torus(n, torus_shape(n)[0])
        fallback = ring(n)
        if n > 1 and grid.lambda2 >= fallback.lambda2:
            warnings.warn(
                f"A {grid.name.split()[-1]} torus of {n} ranks mixes no better than a ring (lambda2 "
                f"{grid.lambda2:.3f} against {fallback.lambda2:.3f}) and talks to the same 2 neighbours; gossiping "
                "over the ring instead. A torus pays off from 2 x 3 grids up (6, 8, 9, 10, 12, ... ranks).",
                stacklevel=2,
            )
            return fallback
        return grid
    else:
        if rows < 1 or n % rows:
            raise ValueError(f"A torus of {n} ranks needs `rows` dividing {n}, got {rows}.")
        cols = n // rows
    w = torch.zeros(n, n, dtype=torch.float64)
    moves = [(0, 0), (1, 0), (-1, 0), (0, 1), (0, -1)]
    for i in range(n):
        r, c = divmod(i, cols)
        for dr, dc in moves:
            w[i, ((r + dr) % rows) * cols + (c + dc) % cols] += 1 / 5
    distinct = sorted({(dr % rows, dc % cols) for dr, dc in moves} - {(0, 0)})
    shifts = tuple(
        tuple(((i // cols + dr) % rows) * cols + (i % cols + dc) % cols for i in range(n)) for dr, dc in distinct
    )
    return Topology(f"torus {rows}x{cols}", w, shifts)


def exponential(n: int) -> Topology:
    """Neighbours at distances ``+-2**k`` for ``2**k < n``: ``O(log n)`` neighbours, uniform weights."""
    _check_size(n)
    offsets: set[int] = set()
    d = 1
    while d < n:
        offsets.update({d, -d})
        d *= 2
    return _from_offsets("exponential", n, offsets)


def fully_connected(n: int) -> Topology:
    """Every rank with every other, ``W = 1/n``: a gossip round is the exact average."""
    _check_size(n)
    weights = torch.full((n, n), 1.0 / n, dtype=torch.float64)
    return Topology("fully_connected", weights, _offset_shifts(n, list(range(n))))


def make_topology(name: str, n: int) -> Topology:
    """The topology called ``name`` (one of :data:`TOPOLOGIES`) over ``n`` ranks."""
    builders = {"ring": ring, "torus": torus, "exponential": exponential, "fully_connected": fully_connected}
    return builders[check_topology_name(name)](n)


def check_topology_name(name: object) -> str:
    if not isinstance(name, str) or name not in TOPOLOGIES:
        raise ValueError(f"`topology` must be one of {list(TOPOLOGIES)}, got {name!r}.")
    return name


def _check_size(n: int) -> None:
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"A topology needs at least 1 rank, got {n!r}.")
