"""The torus by name: the ring instead wherever the torus would mix no better (closed-form eigenvalues here)."""

from __future__ import annotations

import math

import pytest
import torch

from lightning_localsgd.comm.topology import make_topology, torus


def circulant_lambda2(n: int, self_weight: float, side_weight: float) -> float:
    """lambda2 of W = s I + t (shift + shift^-1) on n ranks: eigenvalues s + 2 t cos(2 pi k / n)."""
    return max(abs(self_weight + 2 * side_weight * math.cos(2 * math.pi * k / n)) for k in range(1, n))


def grid_lambda2(rows: int, cols: int) -> float:
    """lambda2 of the rows x cols torus (weights 1/5; a move along a side of 1 lands on the rank itself):
    eigenvalues (1 + 2 cos(2 pi a / rows) + 2 cos(2 pi b / cols)) / 5."""
    values = [
        abs(1 + 2 * math.cos(2 * math.pi * a / rows) + 2 * math.cos(2 * math.pi * b / cols)) / 5
        for a in range(rows)
        for b in range(cols)
        if (a, b) != (0, 0)
    ]
    return max(values)


@pytest.mark.parametrize(("n", "rows", "cols"), [(3, 1, 3), (4, 2, 2), (5, 1, 5), (7, 1, 7), (13, 1, 13)])
def test_a_torus_that_would_mix_worse_than_the_ring_falls_back_to_the_ring_with_a_warning(n, rows, cols):
    ring_lambda2 = circulant_lambda2(n, 1 / 3, 1 / 3)
    assert grid_lambda2(rows, cols) >= ring_lambda2  # e.g. n = 5: 0.724 against 0.539; n = 4: 0.6 against 1/3
    with pytest.warns(UserWarning, match=rf"{rows}x{cols} torus of {n} ranks mixes no better than a ring"):
        topology = make_topology("torus", n)
    assert topology.name == "ring"
    assert topology.lambda2 == pytest.approx(ring_lambda2, abs=1e-12)
    assert sorted(topology.neighbours(0)) == sorted({1, n - 1})
    # The degenerate grid talks to 2 neighbours too (1 x n: i +- 1; 2 x 2: the other column and the other row), so
    # the ring costs no more bytes per round.
    assert sorted(torus(n, rows=rows).neighbours(0)) == ([1, 2] if rows == 2 else sorted({1, n - 1}))


@pytest.mark.parametrize(("n", "rows", "cols"), [(2, 1, 2), (6, 2, 3), (8, 2, 4), (9, 3, 3), (12, 3, 4), (16, 4, 4)])
def test_a_torus_that_mixes_better_than_the_ring_is_kept(n, rows, cols, recwarn):
    topology = torus(n)
    assert topology.name == f"torus {rows}x{cols}"
    expected = grid_lambda2(rows, cols)  # 1 x 2: 0.2 against the 2-ring's 1/3
    assert topology.lambda2 == pytest.approx(expected, abs=1e-12)
    assert expected < circulant_lambda2(n, 1 / 3, 1 / 3)
    assert not [w for w in recwarn.list if "torus" in str(w.message)]


def test_an_explicit_shape_is_built_as_asked_even_where_it_mixes_worse():
    topology = torus(5, rows=1)
    assert topology.name == "torus 1x5"
    assert topology.lambda2 == pytest.approx(circulant_lambda2(5, 3 / 5, 1 / 5), abs=1e-12)  # 0.7236
    w = topology.weights
    assert torch.allclose(w.sum(1), torch.ones(5, dtype=w.dtype))
