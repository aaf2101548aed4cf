"""The scaled sign's scale on CPU: the float64 sum of ``|x|`` over a block, in an order that is part of the format.

Every rank computes LIEC-SGD's server scale itself, so the sum must give the same bits on every rank, whatever its
thread count and whichever implementation runs: the C kernel (``sign_kernels.c``, one pass) or this module (the
reference, and the fallback). Format 2 fixes the order: element ``i`` of a block adds into lane ``i % LANES``, each
lane in the order of its elements starting from 0; then the lanes are folded in halves (lane ``k`` += lane
``k + half``) until one is left.

Format 1 (before 2026-12-06) summed with torch's ``sum()``, whose order belongs to torch (its vector width and
cascade). Both are accurate to about 1e-15 relative, so the float32 scales differ only where the float64 sums
straddle a float32 rounding boundary (about one block in 10^8); a checkpoint says which format its run used. CUDA
keeps its own reduction order (its scales agree with the CPU's to the same degree); one run uses one device type.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from lightning_localsgd.compression import native
from lightning_localsgd.compression.packing import pack_bits

try:  # NumPy reduces along a first axis one row after the other, vectorised along the row: the format's lanes
    import numpy as _numpy
except ImportError:  # torch alone: its cumsum is sequential too, at about twice the cost
    _numpy = None

FORMAT_VERSION = 2
LANES = 1024  # sign_kernels.c


def ordered_abs_sum_(magnitudes: Tensor) -> Tensor:
    """The format's float64 sum of ``magnitudes`` (1-D, float64, contiguous, ``|x|``, on CPU), as a 0-dim tensor.
    ``magnitudes`` may be overwritten (with torch alone it holds running sums afterwards)."""
    runs, tail = divmod(magnitudes.numel(), LANES)
    whole = magnitudes[: runs * LANES].view(runs, LANES)
    if not runs:
        lanes = magnitudes.new_zeros(LANES)
    elif _numpy is not None:
        lanes = torch.from_numpy(_numpy.add.reduce(whole.numpy(), axis=0))
    else:  # a lane's sum is the last of its running sums: torch's CPU cumsum adds one row after the other
        lanes = whole.cumsum_(0)[-1].clone()
    lanes[:tail] += magnitudes[runs * LANES :]  # the last elements, each the last addition to its lane
    half = LANES // 2
    while half:
        lanes[:half] += lanes[half : 2 * half]
        half //= 2
    return lanes[0]


def mixed_magnitudes(numel: int, seed: int) -> Tensor:
    """A vector whose float64 sums round at almost every addition (every third element about 2^42 times the others,
    full mantissas), so that summing in another order gives other bits; with -0.0 and zeros."""
    generator = torch.Generator().manual_seed(seed)
    exponents = torch.where(torch.arange(numel) % 3 == 0, 20.0, -22.0)
    exponents += torch.randint(-3, 4, (numel,), generator=generator).float()
    x = torch.randn(numel, generator=generator) * torch.pow(2.0, exponents)
    x[::11] = -0.0
    x[::13] = 0.0
    return x


def _matches_reference(kernels: native.SignKernels) -> bool:
    """Whether the kernels give the reference's bits on vectors that take every branch (lanes visited twice or three
    times, a last group of fewer than 8 elements) and whose sums show their order."""
    for seed in range(64):  # a sum in another order differs on some 10 % of them: every such build is caught
        x = mixed_magnitudes(2 * LANES + 5 * 8 + 3, seed)
        bits = torch.zeros((x.numel() + 7) // 8, dtype=torch.uint8)
        if kernels.abs_sum_signs(x, bits) != ordered_abs_sum_(x.double().abs()).item():
            return False
        if not torch.equal(bits, pack_bits(x < 0)):  # torch's packing (packing.py)
            return False
        signed, decoded = torch.where(x < 0, -0.375, 0.375), torch.empty(x.numel())
        kernels.decode(bits, 0.375, decoded)
        if not torch.equal(decoded, signed):
            return False
        kernels.decode_add(bits, 0.375, x, decoded)
        if not torch.equal(decoded, torch.add(x, signed)):
            return False
        residual = torch.empty_like(x)
        kernels.residual(bits, 0.375, x, residual, x.flip(0), decoded)
        if not (torch.equal(residual, x - signed) and torch.equal(decoded, signed + x.flip(0))):
            return False
    return True


def kernels() -> Optional[native.SignKernels]:
    """The C kernels where they are built and agree with the reference here, else None (see ``native.py``)."""
    return native.sign_kernels(check=_matches_reference)
