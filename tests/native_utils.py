"""The C kernels' tests run wherever a C compiler is installed: there a kernel that was not built fails the test."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Optional, TypeVar

import pytest

from lightning_localsgd.native import build

Kernels = TypeVar("Kernels")


def required(kernels: Optional[Kernels], what: str) -> Kernels:
    """``kernels`` as loaded; where they are None, a failure if a C compiler is installed, else a skip."""
    if kernels is None:
        compiler = build.compiler()[0]
        assert shutil.which(compiler) is None, f"{compiler} is installed, yet {what} were not built or refused"
        pytest.skip(f"{what} cannot be built on this machine (no {compiler})")
    return kernels


def empty_cache(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """Kernels turned on and built into an empty cache (``tmp_path / "cache"``), which is returned."""
    monkeypatch.setenv(build.CACHE_VARIABLE, str(tmp_path / "cache"))
    monkeypatch.delenv(build.DISABLE_VARIABLE, raising=False)
    return tmp_path / "cache"
