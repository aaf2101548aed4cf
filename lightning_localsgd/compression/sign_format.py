"""The scaled sign's scale on CPU: the float64 sum of ``|x|`` over a block, in an order that is part of the format.

Every rank computes LIEC-SGD's server scale itself, so the sum must give the same bits on every rank, whatever its
thread count and whichever implementation runs: the C kernel (``sign_kernels.c``, one pass) or torch (here, the
reference and the fallback). Format 2 fixes the order (the C source says it in full): runs of ``RUN`` elements;
inside a run, ``LANES`` lanes each summing every ``LANES``-th element in order; the lanes combined as a fixed tree;
the run's last few elements one by one; the runs in order.

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

FORMAT_VERSION = 2
RUN = 1024  # elements per run (sign_kernels.c)
LANES = 8  # lanes per run


def _combine_lanes(lanes: Tensor) -> Tensor:
    """``(runs, LANES)`` lane sums to one value per run: ((0+1)+(2+3))+((4+5)+(6+7)), as the kernel combines them."""
    return ((lanes[:, 0] + lanes[:, 1]) + (lanes[:, 2] + lanes[:, 3])) + (
        (lanes[:, 4] + lanes[:, 5]) + (lanes[:, 6] + lanes[:, 7])
    )


def ordered_abs_sum_(magnitudes: Tensor) -> Tensor:
    """The format's float64 sum of ``magnitudes`` (1-D, float64, ``|x|``, on CPU), as a 0-dim tensor. Overwrites
    ``magnitudes`` with partial sums: a lane's sum is the last of its running sums, and torch's CPU ``cumsum`` adds
    one element after the other (where ``sum()`` picks its own order)."""
    n = magnitudes.numel()
    runs = n // RUN
    per_run: list[Tensor] = []
    if runs:
        lanes = magnitudes[: runs * RUN].view(runs, RUN // LANES, LANES).cumsum_(1)[:, -1]
        per_run.append(_combine_lanes(lanes))
    rest = magnitudes[runs * RUN :]
    if rest.numel():
        groups = rest.numel() // LANES
        whole = rest[: groups * LANES].view(1, groups, LANES)
        lanes = whole.cumsum_(1)[:, -1] if groups else rest.new_zeros(1, LANES)
        last = _combine_lanes(lanes)
        for value in rest[groups * LANES :]:  # fewer than LANES, one by one, as the kernel adds them
            last = last + value
        per_run.append(last)
    if not per_run:
        return magnitudes.new_zeros(())
    return torch.cat(per_run).cumsum_(0)[-1]  # 0 + r_0 + r_1 + ..., in order


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
    """Whether the kernels give the torch reference's bits on vectors that take every branch (whole runs, a run cut
    short, a tail of fewer than ``LANES`` elements) and whose sums show their order."""
    for seed in range(64):  # a sum in another order differs on some 10 % of them: every such build is caught
        x = mixed_magnitudes(2 * RUN + 5 * LANES + 3, seed)
        bits = torch.zeros((x.numel() + 7) // 8, dtype=torch.uint8)
        if kernels.abs_sum_signs(x, bits) != ordered_abs_sum_(x.double().abs()).item():
            return False
        if not torch.equal(bits, pack_bits(x < 0)):  # torch's packing (packing.py)
            return False
        decoded = torch.empty(x.numel())
        kernels.decode(bits, 0.375, decoded)
        if not torch.equal(decoded, torch.where(x < 0, -0.375, 0.375)):
            return False
        kernels.decode_add(bits, 0.375, x, decoded)
        if not torch.equal(decoded, torch.add(x, torch.where(x < 0, -0.375, 0.375))):
            return False
    return True


def kernels() -> Optional[native.SignKernels]:
    """The C kernels where they are built and agree with the reference here, else None (see ``native.py``)."""
    return native.sign_kernels(check=_matches_reference)
