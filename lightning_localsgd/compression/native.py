"""The scaled sign's CPU kernels (``sign_kernels.c``), compiled on first use and called through ctypes.

Plain torch needs about a dozen passes over a block to encode it (a float64 copy, its absolute value and sum for the
scale, then a comparison and the packing for the signs): 0.18 ms per MiB of float32 on one thread here, more than
twice a memcpy of the same bytes. The C kernel reads the block once and writes the scale's sum and the sign bits
together (about 0.05 ms per MiB with AVX2); the decode writes ``+-scale`` straight from the bits, or adds it to
another vector. ``sign_format.py`` does the same arithmetic in the same order and stays the reference, and the
fallback wherever the kernel is not available.

The shared library is built with the C compiler of the platform (``$CC``, else the one Python was built with, else
``cc``), without Python or torch headers (a fraction of a second), into ``$LIGHTNING_LOCALSGD_CACHE`` (default
``~/.cache/lightning_localsgd``), named by a hash of the source, compiler and platform, and renamed into place
atomically so that ranks starting together do not trip over each other. Before first use it is checked against the
reference on vectors that exercise every branch; a build that fails, or does not give the same bits, is not used
(logged once), and training goes on with the fallback. ``LIGHTNING_LOCALSGD_NATIVE=0`` turns it off.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import shlex
import subprocess
import sysconfig
import tempfile
from pathlib import Path
from typing import Callable, Optional

import torch
from torch import Tensor

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("sign_kernels.c")
FLAGS = ["-O2", "-ffp-contract=off", "-fno-fast-math", "-shared", "-fPIC"]  # no FMA: the sum's bits are the format
DISABLE_VARIABLE = "LIGHTNING_LOCALSGD_NATIVE"
CACHE_VARIABLE = "LIGHTNING_LOCALSGD_CACHE"


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


_loaded: dict[str, Optional[SignKernels]] = {}


def sign_kernels(check: Optional[Callable[[SignKernels], bool]] = None) -> Optional[SignKernels]:
    """The kernels, built and loaded once per process; None where they are turned off, cannot be built here, or fail
    ``check`` (given by the first caller: the comparison with the reference in ``sign_format.py``)."""
    if "kernels" not in _loaded:
        _loaded["kernels"] = _load(check)
    return _loaded["kernels"]


def _load(check: Optional[Callable[[SignKernels], bool]]) -> Optional[SignKernels]:
    if os.environ.get(DISABLE_VARIABLE, "1").strip().lower() in ("0", "false", "no", "off"):
        return None
    try:
        kernels = SignKernels(ctypes.CDLL(str(_build())))
    except (OSError, subprocess.SubprocessError, AttributeError) as error:
        log.info("The scaled sign's C kernels are not available (%s); using the torch and NumPy path.", error)
        return None
    if check is not None and not check(kernels):
        log.warning(
            "The scaled sign's C kernels (%s) do not give the reference's bits on this machine; using the torch and "
            "NumPy path. Please report this with your compiler and CPU.",
            kernels.version,
        )
        return None
    return kernels


def _compiler() -> list[str]:
    command = os.environ.get("CC") or sysconfig.get_config_var("CC") or "cc"
    return shlex.split(command)[:1]  # the compiler alone: Python's own CC may carry flags for another toolchain


def _cache_dir() -> Path:
    configured = os.environ.get(CACHE_VARIABLE)
    if configured:
        return Path(configured)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "lightning_localsgd"


def _build() -> Path:
    """The shared library for this source, platform and compiler, built if it is not in the cache yet."""
    compiler = _compiler()
    source = SOURCE.read_bytes()
    key = hashlib.sha256(source + repr((compiler, FLAGS, platform.machine(), platform.system())).encode()).hexdigest()
    suffix = sysconfig.get_config_var("SHLIB_SUFFIX") or ".so"
    directory = _cache_dir()
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError:
        directory = Path(tempfile.gettempdir()) / "lightning_localsgd"
        directory.mkdir(parents=True, exist_ok=True)
    target = directory / f"sign_kernels-{key[:16]}{suffix}"
    if target.exists():
        return target
    partial = directory / f".{target.name}.{os.getpid()}.partial"
    try:
        subprocess.run(
            [*compiler, *FLAGS, str(SOURCE), "-o", str(partial)], check=True, capture_output=True, timeout=120
        )
        os.replace(partial, target)  # atomic: a rank that loses the race replaces it with the same bytes
    finally:
        partial.unlink(missing_ok=True)
    return target


def reset() -> None:
    """Forget the loaded kernels (tests: the next use builds or refuses them again)."""
    _loaded.clear()


def is_plain_cpu_float32(tensor: Tensor) -> bool:
    """Whether the kernels can take ``tensor`` as it is (they read raw memory)."""
    return tensor.device.type == "cpu" and tensor.dtype == torch.float32 and tensor.is_contiguous()
