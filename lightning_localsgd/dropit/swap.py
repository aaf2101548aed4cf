"""Turn a model's ``nn.Linear`` / ``nn.Conv2d`` layers into DropIT layers in place, and back.

Only the class of each layer changes: its Parameter objects (so an optimizer's references), buffers, hooks and
``state_dict`` keys stay as they are, and :func:`remove_dropit` restores the original classes exactly.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Optional

from torch import nn

from lightning_localsgd.dropit.functional import warn_if_no_saving
from lightning_localsgd.dropit.modules import DropITConv2d, DropITLinear
from lightning_localsgd.dropit.validation import check_gamma, check_skip

__all__ = ["apply_dropit", "dropit_layers", "remove_dropit"]

# Exact classes only: a subclass may compute differently (nn.MultiheadAttention's out_proj is an nn.Linear
# subclass whose forward is never called), so swapping its class would change or miss what it does.
_TO_DROPIT: dict[type[nn.Module], type[nn.Module]] = {nn.Linear: DropITLinear, nn.Conv2d: DropITConv2d}
_TO_PLAIN = {dropit: plain for plain, dropit in _TO_DROPIT.items()}


def _skipped(name: str, skip: Sequence[str]) -> bool:
    return any(name == entry or name.startswith(entry + ".") for entry in skip)


def dropit_layers(module: nn.Module) -> list[str]:
    """Qualified names of the DropIT layers in ``module``."""
    return [name for name, m in module.named_modules() if type(m) in _TO_PLAIN]


def apply_dropit(module: nn.Module, gamma: float, skip: Sequence[str] = ()) -> list[str]:
    """Make every ``nn.Linear`` and ``nn.Conv2d`` in ``module`` a DropIT layer, except those under ``skip``.

    Args:
        module: the model, changed in place (call before or after creating its optimizer: parameters are kept).
        gamma: the fraction of each layer input dropped for the weight gradient, in (0, 1); 0.5 to 0.7 from
            scratch, 0.9 for fine-tuning (the paper's advice).
        skip: qualified module names (as in ``named_modules()``) left alone, with everything under them:
            ``"head"`` skips ``head``, ``head.0``, ``head.fc``, ... . A name matching no module is an error.

    Returns:
        the qualified names of the layers swapped.
    """
    gamma, skip = check_gamma(gamma), check_skip(skip)
    names = [name for name, _ in module.named_modules()]
    unmatched = [entry for entry in skip if not any(_skipped(name, [entry]) for name in names)]
    if unmatched:
        raise ValueError(f"`skip` names no module of {type(module).__name__}: {unmatched}.")
    if already := dropit_layers(module):
        raise ValueError(f"DropIT is already applied to {already}; call remove_dropit first to change gamma.")
    swapped = []
    for name, layer in module.named_modules():
        target = _TO_DROPIT.get(type(layer))
        if target is None or _skipped(name, skip):
            continue
        layer.__class__ = target
        layer.dropit_gamma = gamma
        warn_if_no_saving(gamma, layer.weight.dtype)
        swapped.append(name)
    return swapped


def remove_dropit(module: nn.Module, names: Optional[Iterable[str]] = None) -> list[str]:
    """Turn the DropIT layers in ``module`` (all, or those of ``names``) back into their plain classes; returns
    their qualified names."""
    wanted = None if names is None else set(names)
    restored = []
    for name, layer in module.named_modules():
        plain = _TO_PLAIN.get(type(layer))
        if plain is None or (wanted is not None and name not in wanted):
            continue
        layer.__class__ = plain
        del layer.dropit_gamma
        restored.append(name)
    return restored
