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

    From the first layer on, a fragment's share is what is left over the fragments left. The next layer joins the
    open fragment unless that would overshoot its share by more than the fragment now falls short of it; every
    fragment gets at least one layer. One huge layer (an embedding) thus makes a fragment of its own and the rest
    is shared evenly.
    """
    units = layer_units(params, names)
    if fragments > len(units):
        raise ValueError(
            f"`fragments={fragments}` is more than the {len(units)} layer(s) with trainable parameters: a fragment "
            f"is a group of whole layers. Use at most {len(units)} fragments."
        )
    assignment: dict[int, int] = {}
    fragment, held, left = 0, 0, sum(p.numel() for p in params)
    for i, unit in enumerate(units):
        size = sum(p.numel() for p in unit)
        later = fragments - fragment - 1  # fragments still to open after this one
        share = left / (fragments - fragment)
        must_close = len(units) - i == later  # each later fragment needs one of the layers left
        overshoots = held + size - share > share - held
        if held and later and (must_close or overshoots):
            fragment, left, held = fragment + 1, left - held, 0
        for p in unit:
            assignment[id(p)] = fragment
        held += size
    return assignment


__all__ = ["layer_units", "split_into_fragments"]
