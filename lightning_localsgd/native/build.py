"""Building, caching and loading the C kernel libraries (``*.c`` beside the modules that wrap them).

A library is built with the C compiler of the platform (``$CC``, else the one Python was built with, else ``cc``),
without Python or torch headers (a fraction of a second), into ``$LIGHTNING_LOCALSGD_CACHE`` (default
``~/.cache/lightning_localsgd``), named by a hash of its source, compiler, flags and platform, and renamed into place
atomically so that ranks starting together do not trip over each other. Before first use the caller checks it
against its reference; a build that fails, or does not give the reference's bits, is not used (logged once), and
training goes on with the torch path. ``LIGHTNING_LOCALSGD_NATIVE=0`` turns every library off.
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
import threading
from pathlib import Path
from typing import Any, Callable, Optional, TypeVar

import torch
from torch import Tensor

DISABLE_VARIABLE = "LIGHTNING_LOCALSGD_NATIVE"
CACHE_VARIABLE = "LIGHTNING_LOCALSGD_CACHE"

Wrapper = TypeVar("Wrapper")


def disabled() -> bool:
    """Whether the environment turns the kernels off."""
    return os.environ.get(DISABLE_VARIABLE, "1").strip().lower() in ("0", "false", "no", "off")


def compiler() -> list[str]:
    command = os.environ.get("CC") or sysconfig.get_config_var("CC") or "cc"
    return shlex.split(command)[:1]  # the compiler alone: Python's own CC may carry flags for another toolchain


def cache_dir() -> Path:
    configured = os.environ.get(CACHE_VARIABLE)
    if configured:
        return Path(configured)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "lightning_localsgd"


def build(source: Path, flags: list[str]) -> Path:
    """The shared library for ``source``, this platform, compiler and ``flags``, built if not in the cache yet.
    Flags that name libraries (``-l...``) go after the source, where the linker looks for what it needs."""
    command = compiler()
    text = source.read_bytes()
    key = hashlib.sha256(text + repr((command, flags, platform.machine(), platform.system())).encode()).hexdigest()
    suffix = sysconfig.get_config_var("SHLIB_SUFFIX") or ".so"
    directory = cache_dir()
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError:
        directory = Path(tempfile.gettempdir()) / "lightning_localsgd"
        directory.mkdir(parents=True, exist_ok=True)
    target = directory / f"{source.stem}-{key[:16]}{suffix}"
    if target.exists():
        return target
    # Named per process and thread: simulated ranks are threads of one process, and may build at the same moment.
    partial = directory / f".{target.name}.{os.getpid()}.{threading.get_ident()}.partial"
    try:
        libraries = [flag for flag in flags if flag.startswith("-l")]
        options = [flag for flag in flags if not flag.startswith("-l")]
        arguments = [*command, *options, str(source), *libraries, "-o", str(partial)]
        subprocess.run(arguments, check=True, capture_output=True, timeout=120)
        os.replace(partial, target)  # atomic: a rank that loses the race replaces it with the same bytes
    finally:
        partial.unlink(missing_ok=True)
    return target


def load(
    what: str,
    source: Path,
    flags: list[str],
    wrap: Callable[[ctypes.CDLL], Wrapper],
    check: Optional[Callable[[Wrapper], bool]],
    log: logging.Logger,
) -> Optional[Wrapper]:
    """``wrap`` of the library built from ``source``, or None where the kernels are turned off, cannot be built or
    loaded here (logged at INFO), or fail ``check`` (the comparison with the reference; logged as a warning).
    ``what`` names the kernels in those messages."""
    if disabled():
        return None
    try:
        kernels = wrap(ctypes.CDLL(str(build(source, flags))))
    except (OSError, subprocess.SubprocessError, AttributeError) as error:
        log.info("%s are not available (%s); using the torch path.", what, error)
        return None
    if check is not None and not check(kernels):
        log.warning(
            "%s (%s) do not give the reference's bits on this machine; using the torch path. Please report this "
            "with your compiler and CPU.",
            what,
            getattr(kernels, "version", "?"),
        )
        return None
    return kernels


class Loaded:
    """A library's kernels, loaded once per process by the first caller; later callers (other threads included: the
    simulated ranks are threads) wait for that load and share its result."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._done = False
        self._kernels: Any = None

    def get(self, load: Callable[[], Optional[Wrapper]]) -> Optional[Wrapper]:
        """The kernels, from ``load()`` on the first call."""
        if not self._done:
            with self._lock:
                if not self._done:
                    self._kernels = load()
                    self._done = True
        return self._kernels

    def reset(self) -> None:
        """Forget the loaded kernels: the next :meth:`get` builds or refuses them again."""
        with self._lock:
            self._kernels, self._done = None, False


def is_plain_cpu_float32(tensor: Tensor) -> bool:
    """Whether the kernels can take ``tensor`` as it is (they read raw memory)."""
    return tensor.device.type == "cpu" and tensor.dtype == torch.float32 and tensor.is_contiguous()
