"""The C kernels' tests run wherever a C compiler is installed: there a kernel that was not built fails the test."""

from __future__ import annotations

import logging
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from types import ModuleType
from typing import Any, Optional, TypeVar

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


def fresh_load(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, reset: Callable[[], None]) -> Iterator[Path]:
    """For a fixture: a process that has not loaded a kernel library yet (``reset`` forgets it, before and after),
    building into an empty cache, whose path is yielded."""
    cache = empty_cache(monkeypatch, tmp_path)
    reset()
    yield cache
    reset()


def assert_refused(
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    module: ModuleType,
    wrong_source: str,
    load: Callable[[], Any],
) -> None:
    """A kernel library built from ``wrong_source`` (in place of ``module.SOURCE``) fails its load-time self-check:
    ``load`` gives None and says why."""
    mutated = tmp_path / Path(module.SOURCE).name
    mutated.write_text(wrong_source)
    monkeypatch.setattr(module, "SOURCE", mutated)
    module.reset()
    with caplog.at_level(logging.WARNING, logger=module.__name__):
        assert load() is None
    assert "do not give the reference's bits" in caplog.text
