"""The scaled sign's CPU kernels (``sign_kernels.c``), compiled on first use and called through ctypes.

Plain torch needs about a dozen passes over a block to encode it (a float64 copy, its absolute value and sum for the
scale, then a comparison and the packing for the signs): 0.18 ms per MiB of float32 on one thread here, more than
twice a memcpy of the same bytes. The C kernel reads the block once and writes the scale's sum and the sign bits
together (about 0.05 ms per MiB with AVX2); the decode writes ``+-scale`` straight from the bits, or adds it to
another vector. ``sign_format.py`` does the same arithmetic in the same order and stays the reference, and the
fallback wherever the kernel is not available.

The library is built and cached on first use (:mod:`lightning_localsgd.native.build`). Before first use it is checked
against the reference on vectors that exercise every branch; a build that fails, or does not give the same bits, is
not used (logged once), and training goes on with the fallback. ``LIGHTNING_LOCALSGD_NATIVE=0`` turns it off.
"""

from __future__ import annotations

import ctypes
import logging
from pathlib import Path
from typing import Callable, Optional

from torch import Tensor

from lightning_localsgd.native import build
from lightning_localsgd.native.build import CACHE_VARIABLE, DISABLE_VARIABLE, is_plain_cpu_float32

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("sign_kernels.c")
FLAGS = ["-O2", "-ffp-contract=off", "-fno-fast-math", "-shared", "-fPIC"]  # no FMA: the sum's bits are the format
__all__ = ["CACHE_VARIABLE", "DISABLE_VARIABLE", "SignKernels", "is_plain_cpu_float32", "reset", "sign_kernels"]


class SignKernels:
    """The loaded library's entry points, on CPU float32 / uint8 tensors (contiguous; not checked per call)."""

    def __init__(self, library: ctypes.CDLL) -> None:
        self._abs_sum_signs = library.llsgd_abs_sum_signs
        self._abs_sum_signs.restype = ctypes.c_double
        self._abs_sum_signs.argtypes = [ctypes.c_void_p, ctypes.c_int64, ctypes.c_void_p]
        self._decode = library.llsgd_sign_decode
        self._decode.restype = None
        self._decode.argtypes = [ctypes.c_void_p, ctypes.c_int64, ctypes.c_float, ctypes.c_void_p]
        self._decode_add = library.llsgd_sign_decode_add
        self._decode_add.restype = None
        self._decode_add.argtypes = [ctypes.c_void_p, ctypes.c_int64, ctypes.c_float, ctypes.c_void_p, ctypes.c_void_p]
        self._residual = library.llsgd_sign_residual
        self._residual.restype = None
        self._residual.argtypes = [ctypes.c_void_p, ctypes.c_int64, ctypes.c_float] + [ctypes.c_void_p] * 4
        version = library.llsgd_sign_version
        version.restype = ctypes.c_int
        self.version = "avx2" if version() == 2 else "plain C"

    def abs_sum_signs(self, block: Tensor, bits: Optional[Tensor]) -> float:
        """The float64 sum of ``|block|`` in the format's order; the sign bits into ``bits`` (``ceil(n / 8)`` bytes)
        unless it is None."""
        return self._abs_sum_signs(block.data_ptr(), block.numel(), None if bits is None else bits.data_ptr())

    def decode(self, bits: Tensor, scale: float, out: Tensor) -> None:
        """``out`` = ``-scale`` where a bit of ``bits`` is set, ``+scale`` elsewhere."""
        self._decode(bits.data_ptr(), out.numel(), scale, out.data_ptr())

    def residual(
        self, bits: Tensor, scale: float, x: Tensor, residual: Tensor, addend: Optional[Tensor], decoded: Tensor
    ) -> None:
        """``residual`` = ``x`` - what :meth:`decode` would write, ``decoded`` = that (+ ``addend``), in one pass
        (``residual`` may be ``x``)."""
        self._residual(
            bits.data_ptr(),
            x.numel(),
            scale,
            x.data_ptr(),
            residual.data_ptr(),
            None if addend is None else addend.data_ptr(),
            decoded.data_ptr(),
        )

    def decode_add(self, bits: Tensor, scale: float, addend: Tensor, out: Tensor) -> None:
        """``out`` = ``addend`` + what :meth:`decode` would write (``out`` may be ``addend``)."""
        self._decode_add(bits.data_ptr(), out.numel(), scale, addend.data_ptr(), out.data_ptr())


_loaded = build.Loaded()


def sign_kernels(check: Optional[Callable[[SignKernels], bool]] = None) -> Optional[SignKernels]:
    """The kernels, built and loaded once per process; None where they are turned off, cannot be built here, or fail
    ``check`` (given by the first caller: the comparison with the reference in ``sign_format.py``)."""
    return _loaded.get(lambda: _load(check))


def _load(check: Optional[Callable[[SignKernels], bool]]) -> Optional[SignKernels]:
    return build.load("The scaled sign's C kernels", SOURCE, FLAGS, SignKernels, check, log)


def reset() -> None:
    """Forget the loaded kernels (tests: the next use builds or refuses them again)."""
    _loaded.reset()
