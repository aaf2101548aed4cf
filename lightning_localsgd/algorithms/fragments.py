"""Streaming DiLoCo's fragments: the model cut into contiguous groups of layers of about equal size.

"Streaming DiLoCo with overlapping communication" (Douillard et al., arXiv 2501.18512) synchronises one fragment at
a time, so a fragment should be a few whole layers (a layer's weight and bias travel together) and the fragments
should be of similar size, so that the link carries about 1/F of the model at every synchronisation.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn


def layer_units(params: Sequence[nn.Parameter], names: dict[int, str]) -> list[list[nn.Parameter]]:
    """``params`` (in order) grouped into runs of consecutive parameters of the same module (``"enc.0.weight"`` and
    ``"enc.0.bias"`` are one unit); a parameter without a name is a unit of its own."""
    units: list[list[nn.Parameter]] = []
    last_owner: object = None
    for p in params:
        name = names.get(id(p))
        owner = name.rsplit(".", 1)[0] if name is not None and "." in name else (name, id(p))
        if units and owner == last_owner:
            units[-1].append(p)
        else:
            units.append([p])
        last_owner = owner
    return units


def split_into_fragments(params: Sequence[nn.Parameter], names: dict[int, str], fragments: int) -> dict[int, int]:
    """``id(parameter) -> fragment`` for ``fragments`` contiguous groups of whole layers of about equal size.

    Greedy from the first layer: a fragment closes once it holds at least its share of what is left (the remaining
    elements over the remaining fragments), so one huge layer (an embedding) makes a fragment of its own and the
    rest is shared evenly; every fragment gets at least one layer.
    """
    units = layer_units(params, names)
    if fragments > len(units):
        raise ValueError(
            f"`fragments={fragments}` is more than the {len(units)} layer(s) with trainable parameters: a fragment "
            f"is a group of whole layers. Use at most {len(units)} fragments."
        )
    sizes = [sum(p.numel() for p in unit) for unit in units]
    assignment: dict[int, int] = {}
    fragment, held, left = 0, 0, sum(sizes)
    for i, (unit, size) in enumerate(zip(units, sizes)):
        for p in unit:
            assignment[id(p)] = fragment
        held += size
        units_left, fragments_left = len(units) - i - 1, fragments - fragment - 1
        share = left / (fragments - fragment)
        if fragments_left and (held >= share or units_left == fragments_left):
            fragment, left, held = fragment + 1, left - held, 0
    return assignment


__all__ = ["layer_units", "split_into_fragments"]
