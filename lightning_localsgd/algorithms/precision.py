"""Algorithm state in a precision that survives ``bf16-true`` / ``16-true`` training.

With half-precision parameters, an update like ``x += lr * Delta`` or a control variate
``Delta += (x_hat - x) / sum(lr)`` computed and stored in half precision rounds away: bf16 keeps 8 bits of
mantissa, so a correction smaller than 1/256 of the weight vanishes, and a sum-then-divide all-reduce of N
bf16 replicas loses the low bits of the mean. Every per-rank state buffer (Delta, anchors, momenta, error
buffers) is therefore kept in float32 when the parameters are float16/bfloat16, and averages of half-precision
tensors are computed in float32 and rounded once at the end.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from lightning_localsgd.comm.flat import LOW_PRECISION


def state_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype algorithm state is kept in for parameters of ``dtype``."""
    return torch.float32 if dtype in LOW_PRECISION else dtype


def state_copy(tensor: Tensor) -> Tensor:
    """A copy of ``tensor`` in its state dtype (float32 for half-precision tensors)."""
    return tensor.detach().to(state_dtype(tensor.dtype), copy=True)


def state_zeros_like(tensor: Tensor) -> Tensor:
    return torch.zeros(tensor.shape, dtype=state_dtype(tensor.dtype), device=tensor.device)


def in_state_precision(tensors: Sequence[Tensor]) -> list[Tensor]:
    """``tensors`` themselves if already in their state dtype, else float32 copies (write back with
    :func:`write_back`)."""
    return [t if t.dtype == state_dtype(t.dtype) else state_copy(t) for t in tensors]


def write_back(targets: Sequence[Tensor], worked: Sequence[Tensor]) -> None:
    """Round the float32 working copies made by :func:`in_state_precision` into their targets (once)."""
    for target, work in zip(targets, worked):
        if work is not target:
            target.copy_(work)
