"""DropIT's linear and 2-D convolution: exact forward, only the input kept for backward is sparsified.

DropIT (Chen et al., "DropIT: Dropping Intermediate Tensors for Memory-Efficient DNN Training", ICLR 2023,
arXiv 2202.13808) keeps, of a layer's input, only the ``(1 - gamma) * numel`` entries largest in magnitude
(over the whole tensor, with their flat positions as int32) for the backward pass. The weight gradient is
computed from that input with the dropped entries set to zero, so it is approximate; the output, the input
gradient (it needs the weight, not the input) and the bias gradient (it needs the output gradient only) are
exact.
"""

from __future__ import annotations

import warnings
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["densify", "dropit_conv2d", "dropit_linear", "keep_count", "saves_memory", "sparsify"]

_INT32_MAX = torch.iinfo(torch.int32).max
_WARNED: set[tuple[float, torch.dtype]] = set()


def keep_count(numel: int, gamma: float) -> int:
    """How many entries of a ``numel``-entry input are kept: ``(1 - gamma) * numel`` rounded, at least one."""
    if numel == 0:
        return 0
    # Rounded, not truncated: (1 - 0.9) * 10 is 0.999..., and one entry is what is meant.
    return min(numel, max(1, round((1.0 - gamma) * numel)))


def index_bytes(numel: int) -> int:
    """Bytes per kept position: int32, or int64 for inputs with more than 2**31 - 1 entries."""
    return 4 if numel <= _INT32_MAX else 8


def saves_memory(gamma: float, dtype: torch.dtype, numel: int = 0) -> bool:
    """Whether values plus positions take fewer bytes than the dense input: ``(1 - gamma) (v + 4) < v``."""
    value_bytes = dtype.itemsize
    return (1.0 - gamma) * (value_bytes + index_bytes(numel)) < value_bytes


def warn_if_no_saving(gamma: float, dtype: torch.dtype) -> None:
    """Warn once per (gamma, dtype) whose sparse copy is not smaller than the dense one."""
    if (gamma, dtype) in _WARNED or saves_memory(gamma, dtype):
        return
    _WARNED.add((gamma, dtype))
    value_bytes = dtype.itemsize
    warnings.warn(
        f"DropIT with gamma={gamma} on {dtype} inputs saves no memory: each kept entry costs {value_bytes} bytes of"
        f" value plus 4 of position, so the kept {1 - gamma:.0%} take at least as much as the dense input, and the"
        f" weight gradient is approximated for nothing. Use gamma > {4 / (value_bytes + 4):.3g} for {dtype}.",
        stacklevel=3,
    )


def sparsify(x: Tensor, gamma: float) -> tuple[Tensor, Tensor]:
    """The kept entries of ``x`` (the largest ``keep_count`` by magnitude, over the whole tensor) and their flat
    positions (int32 unless the tensor is too large for it)."""
    flat = x.reshape(-1)
    k = keep_count(flat.numel(), gamma)
    positions = flat.abs().topk(k, sorted=False).indices
    values = flat[positions]
    if flat.numel() <= _INT32_MAX:
        positions = positions.to(torch.int32)
    return values, positions


def densify(values: Tensor, positions: Tensor, shape: torch.Size) -> Tensor:
    """The sparsified input: ``values`` at ``positions`` of a zero tensor of ``shape``."""
    dense = values.new_zeros(shape.numel())
    dense[positions] = values  # int32 positions index directly: no int64 copy
    return dense.view(shape)


def _needs_autograd(*tensors: Optional[Tensor]) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def _autocast_args(device_type: str, *tensors: Optional[Tensor]) -> Optional[list[Optional[Tensor]]]:
    """The tensors cast as autocast would cast them for linear/conv2d (both run in the lower precision on CPU
    and CUDA), or None when autocast is off. The casts happen outside the autograd function, so autograd
    itself casts the gradients back, as it does for the plain layers."""
    if not torch.is_autocast_enabled(device_type):
        return None
    dtype = torch.get_autocast_dtype(device_type)

    def cast(t: Optional[Tensor]) -> Optional[Tensor]:
        eligible = t is not None and t.is_floating_point() and t.dtype != torch.float64
        return t.to(dtype) if eligible else t

    return [cast(t) for t in tensors]


def _save(ctx, x: Tensor, weight: Tensor, gamma: float) -> None:
    """Save what backward needs and nothing more: the sparse input only for the weight gradient, the weight
    only for the input gradient."""
    need_x, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
    values = positions = None
    if need_w:
        warn_if_no_saving(gamma, x.dtype)
        values, positions = sparsify(x, gamma)
    ctx.save_for_backward(values, positions, weight if need_x else None)
    ctx.x_shape, ctx.w_shape = x.shape, weight.shape


class _DropITLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, bias: Optional[Tensor], gamma: float) -> Tensor:
        _save(ctx, x, weight, gamma)
        return F.linear(x, weight, bias)

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        values, positions, weight = ctx.saved_tensors
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        grad_2d = grad_out.reshape(-1, grad_out.shape[-1])
        grad_x = grad_w = grad_b = None
        if need_x:  # what the plain layer's backward computes: grad_out @ W
            grad_x = grad_2d.mm(weight).view(ctx.x_shape)
        if need_w:  # as the plain layer's (grad_out^T x), with x the sparsified input
            x_2d = densify(values, positions, ctx.x_shape).reshape(-1, ctx.x_shape[-1])
            grad_w = grad_2d.t().mm(x_2d)
        if need_b:
            grad_b = grad_2d.sum(0)
        return grad_x, grad_w, grad_b, None


class _DropITConv2d(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, stride, padding, dilation, groups, gamma):
        _save(ctx, x, weight, gamma)
        ctx.conv = (list(stride), list(padding), list(dilation), groups)
        ctx.has_bias = bias is not None
        return F.conv2d(x, weight, bias, stride, padding, dilation, groups)

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        values, positions, weight = ctx.saved_tensors
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        need_b = need_b and ctx.has_bias
        # The kernel the plain layer's backward runs, with the sparsified input; tensors a requested gradient
        # does not read are only shapes (as in torch.nn.grad).
        x = densify(values, positions, ctx.x_shape) if need_w else grad_out.new_empty(1).expand(ctx.x_shape)
        w = weight if need_x else grad_out.new_empty(1).expand(ctx.w_shape)
        stride, padding, dilation, groups = ctx.conv
        grad_x, grad_w, grad_b = torch.ops.aten.convolution_backward(
            grad_out,
            x,
            w,
            [ctx.w_shape[0]] if ctx.has_bias else None,
            stride,
            padding,
            dilation,
            False,
            [0, 0],
            groups,
            [need_x, need_w, need_b],
        )
        return grad_x, grad_w, grad_b, None, None, None, None, None


def dropit_linear(x: Tensor, weight: Tensor, bias: Optional[Tensor], gamma: float) -> Tensor:
    """``F.linear`` whose backward keeps only the top ``1 - gamma`` of ``x`` for the weight gradient."""
    cast = _autocast_args(x.device.type, x, weight, bias)
    if cast is not None and _needs_autograd(x, weight, bias):
        with torch.autocast(x.device.type, enabled=False):
            return dropit_linear(*cast, gamma)  # type: ignore[arg-type]
    if not _needs_autograd(x, weight, bias):
        return F.linear(x, weight, bias)
    return _DropITLinear.apply(x, weight, bias, gamma)


def dropit_conv2d(
    x: Tensor,
    weight: Tensor,
    bias: Optional[Tensor],
    stride: tuple[int, int],
    padding: tuple[int, int],
    dilation: tuple[int, int],
    groups: int,
    gamma: float,
) -> Tensor:
    """``F.conv2d`` (numeric, symmetric padding) whose backward keeps only the top ``1 - gamma`` of ``x`` for the
    weight gradient."""
    cast = _autocast_args(x.device.type, x, weight, bias)
    if cast is not None and _needs_autograd(x, weight, bias):
        with torch.autocast(x.device.type, enabled=False):
            return dropit_conv2d(*cast, stride, padding, dilation, groups, gamma)  # type: ignore[arg-type]
    if not _needs_autograd(x, weight, bias):
        return F.conv2d(x, weight, bias, stride, padding, dilation, groups)
    if x.dim() == 3:  # unbatched (C, H, W), as F.conv2d accepts: one batch of one
        return _DropITConv2d.apply(x.unsqueeze(0), weight, bias, stride, padding, dilation, groups, gamma).squeeze(0)
    return _DropITConv2d.apply(x, weight, bias, stride, padding, dilation, groups, gamma)
