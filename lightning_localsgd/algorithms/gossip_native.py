"""Gossip's CPU kernels (``gossip_kernels.c``), compiled on first use and called through ctypes.

A streamed gossip step in torch reads and writes each element a dozen times or more: the message is copied in,
checked for inf/NaN (twice), the differences ``x_j - x_i`` written, the weighted sum, and for DeTAG the
extrapolation's difference and sum and the tracker's update in two more passes each. On a 100 M-parameter model
those passes took three quarters of DeTAG's exchange here, the transfers one quarter. The kernels do each of
these in one pass: copying a chunk and checking it, a whole round's mix with its extrapolation, the tracker's
``(y + g) - g_old`` with its check and ``g_old <- g``. ``gossip.py`` keeps the torch expressions as the reference
and the fallback (CUDA, float64 and half-precision messages, strided tensors, or no C compiler); the library is
checked against them here before first use (see :mod:`lightning_localsgd.native.build`).
"""

from __future__ import annotations

import ctypes
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Optional

import torch
from torch import Tensor

from lightning_localsgd.native import build

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("gossip_kernels.c")
FLAGS = ["-O2", "-ffp-contract=off", "-fno-fast-math", "-shared", "-fPIC", "-lm"]
MAX_NEIGHBOURS = 64  # gossip_kernels.c


class GossipKernels:
    """The loaded library's entry points, on contiguous CPU float32 tensors (not checked per call)."""

    def __init__(self, library: ctypes.CDLL) -> None:
        self._all_finite = library.llsgd_all_finite
        self._all_finite.restype = ctypes.c_int
        self._all_finite.argtypes = [ctypes.c_void_p, ctypes.c_int64]
        self._copy_finite = library.llsgd_copy_finite
        self._copy_finite.restype = ctypes.c_int
        self._copy_finite.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64]
        self._track = library.llsgd_track
        self._track.restype = ctypes.c_int
        self._track.argtypes = [ctypes.c_void_p] * 5 + [ctypes.c_int64]
        self._mix = library.llsgd_gossip_mix
        self._mix.restype = None
        self._mix.argtypes = [ctypes.c_void_p] * 3 + [ctypes.c_int, ctypes.c_void_p, ctypes.c_float]
        self._mix.argtypes += [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64]
        version = library.llsgd_gossip_version
        version.restype = ctypes.c_int
        self.version = "avx2" if version() == 2 else "plain C"

    def all_finite(self, x: Tensor) -> bool:
        return bool(self._all_finite(x.data_ptr(), x.numel()))

    def copy_finite(self, source: Tensor, out: Tensor) -> bool:
        """``out`` = ``source``; whether it is all finite."""
        return bool(self._copy_finite(source.data_ptr(), out.data_ptr(), out.numel()))

    def track(self, y: Tensor, g: Tensor, old: Tensor, out: Tensor, last: Optional[Tensor]) -> bool:
        """``out`` = ``(y + g) - old`` and ``last`` = ``g`` (``out`` may be ``y``, ``last`` may be ``old``); whether
        ``out`` is all finite."""
        pointers = (y.data_ptr(), g.data_ptr(), old.data_ptr(), out.data_ptr())
        return bool(self._track(*pointers, None if last is None else last.data_ptr(), out.numel()))

    def mix(
        self,
        own: Tensor,
        received: Sequence[Tensor],
        weights: Sequence[float],
        previous: Optional[Tensor],
        eta: float,
        out: Tensor,
        copy: Optional[Tensor] = None,
    ) -> None:
        """``out`` = ``own + sum_j w_j (received_j - own)`` (each weighted term added in order, as torch's ``add``
        with ``alpha`` rounds it), then ``+ eta (that - previous)`` unless ``previous`` is None; the same into
        ``copy`` unless it is None. ``out`` may be ``own`` or ``previous``."""
        count = len(received)
        pointers = (ctypes.c_void_p * max(count, 1))(*[r.data_ptr() for r in received])
        floats = (ctypes.c_float * max(count, 1))(*weights)
        previous_pointer = None if previous is None else previous.data_ptr()
        copy_pointer = None if copy is None else copy.data_ptr()
        self._mix(
            own.data_ptr(), pointers, floats, count, previous_pointer, eta, out.data_ptr(), copy_pointer, out.numel()
        )


def reference_mix(
    own: Tensor, received: Sequence[Tensor], weights: Sequence[float], previous: Optional[Tensor], eta: float
) -> Tensor:
    """What :meth:`GossipKernels.mix` computes, in the torch operations the gossip's torch path uses."""
    mixed = own.clone()
    for theirs, weight in zip([r - own for r in received], weights):
        mixed.add_(theirs, alpha=weight)
    if previous is None:
        return mixed
    return torch.add(mixed, torch.sub(mixed, previous), alpha=eta)


def awkward_floats(numel: int, seed: int) -> Tensor:
    """Full mantissas over 40 binades, with zeros and -0.0: roundings show in the bits."""
    generator = torch.Generator().manual_seed(seed)
    exponents = torch.randint(-20, 20, (numel,), generator=generator).float()
    x = torch.randn(numel, generator=generator) * torch.pow(2.0, exponents)
    x[::17] = -0.0
    x[::19] = 0.0
    return x


def _matches_reference(kernels: GossipKernels) -> bool:
    """Whether the kernels give the torch expressions' bits here, on lengths that take the vector loops and their
    tails, one to three neighbours, with and without the extrapolation, in place and not."""
    for seed, numel in enumerate((1, 7, 8, 13, 64, 1000, 4099)):
        own, previous = awkward_floats(numel, seed), awkward_floats(numel, seed + 100)
        received = [awkward_floats(numel, seed + 200 + j) for j in range(3)]
        for count, weights in ((1, [2 / 3]), (2, [1 / 3, 1 / 3]), (3, [0.3, 0.1, 0.45])):
            for eta, before in ((0.0, None), (0.0294, previous), (0.41, own)):
                out, copy = torch.empty(numel), torch.empty(numel)
                kernels.mix(own, received[:count], weights, before, eta, out, copy)
                expected = reference_mix(own, received[:count], weights, before, eta)
                if not (torch.equal(out, expected) and torch.equal(copy, expected)):
                    return False
        in_place = previous.clone()
        kernels.mix(own, received[:2], [0.25, 0.5], in_place, 0.3, in_place)
        if not torch.equal(in_place, reference_mix(own, received[:2], [0.25, 0.5], previous, 0.3)):
            return False
        y, g, old = own.clone(), received[0], received[1].clone()
        expected = torch.sub(torch.add(own, g), received[1])
        if not kernels.track(y, g, old, y, old) or not (torch.equal(y, expected) and torch.equal(old, g)):
            return False
        copied = torch.empty(numel)
        if not kernels.copy_finite(own, copied) or not torch.equal(copied, own) or not kernels.all_finite(own):
            return False
        for bad in (float("inf"), float("-inf"), float("nan")):
            spoiled = own.clone()
            spoiled[-1] = bad
            if kernels.all_finite(spoiled) or kernels.copy_finite(spoiled, copied):
                return False
            if kernels.track(spoiled, g, received[1].clone(), torch.empty(numel), None):
                return False
    return True


_loaded = build.Loaded()


def gossip_kernels() -> Optional[GossipKernels]:
    """The kernels, built, checked and loaded once per process; None where they are turned off, cannot be built
    here, or do not give the torch expressions' bits."""
    return _loaded.get(lambda: build.load("Gossip's C kernels", SOURCE, FLAGS, GossipKernels, _matches_reference, log))


def kernels_for(*tensors: Tensor) -> Optional[GossipKernels]:
    """The kernels where every tensor is contiguous CPU float32 (what they read and write), else None."""
    if not all(build.is_plain_cpu_float32(t) for t in tensors):
        return None
    return gossip_kernels()


def reset() -> None:
    """Forget the loaded kernels (tests: the next use builds or refuses them again)."""
    _loaded.reset()
