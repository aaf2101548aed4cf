"""The project's C kernels on CPU: built on first use with the platform's C compiler, loaded through ctypes.

Each kernel library has a torch implementation of the same arithmetic beside it (the reference, and the fallback
wherever the library cannot be built, is turned off, or disagrees with the reference here). See :mod:`.build`.
"""

from lightning_localsgd.native.build import CACHE_VARIABLE, DISABLE_VARIABLE, is_plain_cpu_float32

__all__ = ["CACHE_VARIABLE", "DISABLE_VARIABLE", "is_plain_cpu_float32"]
