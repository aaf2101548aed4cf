"""This rank's shards of a ``fully_shard`` (FSDP2) module, as plain parameters the algorithms can work on.

Inside a replica group FSDP2 owns the parameters: each is a ``DTensor`` whose local tensor is this rank's shard,
stored in memory FSDP2 all-gathers from at the next forward. A local-update algorithm needs nothing more than
those shards: a round averages shard ``k`` of every group over the ranks that hold shard ``k``. So the algorithm
is given a :class:`LocalShards` module instead of the real one. It has the same parameter and buffer names. Each
parameter is a plain tensor that *aliases* the ``DTensor``'s local shard: an in-place write to it (a round, a
correction, the consensus for evaluation) is what FSDP2 gathers next. Nothing is copied, and the buffers are
the module's own tensors. The real parameters' ids are kept as aliases, so optimizer parameter groups (which
hold the ``DTensor`` parameters) map onto the same indices.

Gradients: FSDP2 leaves each ``DTensor`` parameter a ``DTensor`` gradient, already averaged over the group's
ranks. :meth:`LocalShards.pull_gradients` shows their local tensors (aliases, no copy) as the proxies'
``.grad`` before the algorithm's before-step moment, and :meth:`LocalShards.push_gradients` hands back any
gradient the algorithm replaced or dropped.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import Tensor, nn

try:  # torch >= 2.6; older versions have no public FSDP2 and nothing here is used there
    from torch.distributed.fsdp import FSDPModule
    from torch.distributed.tensor import DTensor
except ImportError:  # pragma: no cover - older torch
    DTensor = FSDPModule = None  # type: ignore[assignment,misc]


def is_sharded(tensor: Tensor) -> bool:
    """Whether ``tensor`` is a ``DTensor`` (a parameter FSDP2 shards)."""
    return DTensor is not None and isinstance(tensor, DTensor)


def sharded_parameters(module: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """The ``(name, parameter)`` pairs of ``module`` that are ``DTensor`` s."""
    return [(name, p) for name, p in module.named_parameters() if is_sharded(p)]


def like_sharded(value: Tensor, sharded: Tensor) -> Tensor:
    """``value`` (this rank's shard) as a ``DTensor`` placed as ``sharded`` is (for state dicts and optimizers)."""
    return DTensor.from_local(
        value, sharded.device_mesh, sharded.placements, run_check=False, shape=sharded.shape, stride=sharded.stride()
    )


def _local(tensor: Tensor) -> Tensor:
    return tensor.to_local() if is_sharded(tensor) else tensor


class LocalShards(nn.Module):
    """A stand-in for ``module`` whose parameters alias this rank's local shards (see the module docstring).

    It is never called; it only holds tensors under the real module's names.
    """

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self._proxies: dict[int, nn.Parameter] = {}  # id(real parameter) -> its proxy (tied parameters share one)
        self._pairs: list[tuple[nn.Parameter, nn.Parameter]] = []  # (real, proxy), each real parameter once
        for name, real in module.named_parameters(remove_duplicate=False):
            proxy = self._proxies.get(id(real))
            if proxy is None:
                with torch.no_grad():
                    local = _local(real.detach())
                if not local.is_contiguous():
                    raise ValueError(
                        f"The local shard of parameter {name!r} is not contiguous (strides {local.stride()}); "
                        "FSDP2's shards always are, so this module was sharded by something else."
                    )
                proxy = nn.Parameter(local, requires_grad=real.requires_grad)  # shares the shard's storage
                self._proxies[id(real)] = proxy
                self._pairs.append((real, proxy))
            self._place(name, proxy, as_buffer=False)
        persistent = {name for name, _ in module.state_dict(keep_vars=True).items()}
        for name, buffer in module.named_buffers(remove_duplicate=False):
            self._place(name, buffer, as_buffer=True, persistent=name in persistent)
        self._pulled: dict[int, Tensor | None] = {}
        self._fsdp_modules = [sub for sub in module.modules() if FSDPModule is not None and isinstance(sub, FSDPModule)]

    def reshard(self) -> None:
        """Free every gathered (unsharded) parameter, so the next forward gathers the shards anew.

        FSDP2 keeps a root module's gathered parameters after a forward without backward (evaluation): a later
        forward would reuse them and miss what was written into the shards since (the consensus swapped in or out).
        """
        for sub in self._fsdp_modules:
            sub.reshard()

    def _place(self, name: str, tensor: Tensor, as_buffer: bool, persistent: bool = True) -> None:
        *path, leaf = name.split(".")
        owner: nn.Module = self
        for part in path:
            child = owner._modules.get(part)
            if child is None:
                child = nn.Module()
                owner.add_module(part, child)
            owner = child
        if as_buffer:
            owner.register_buffer(leaf, tensor, persistent=persistent)
        else:
            owner.register_parameter(leaf, tensor)

    @property
    def aliases(self) -> dict[int, int]:
        """``id(real parameter) -> id(proxy)``: the optimizers hold the real ones."""
        return {real_id: id(proxy) for real_id, proxy in self._proxies.items()}

    def pairs(self) -> Iterator[tuple[nn.Parameter, nn.Parameter]]:
        """``(real, proxy)`` for each real parameter (tied ones once)."""
        return iter(self._pairs)

    def as_sharded(self, values: dict[int, Tensor]) -> dict[int, Tensor]:
        """``values`` (by ``id(proxy)``: e.g. the consensus of the shards) keyed by ``id(real parameter)`` too, each
        placed as its real parameter is, for a state dict of the real module."""
        placed = {id(real): like_sharded(values[id(proxy)], real) for real, proxy in self._pairs if id(proxy) in values}
        return {**values, **placed}

    def follow_requires_grad(self) -> None:
        """A layer frozen or unfrozen on the real module is frozen or unfrozen here too."""
        for real, proxy in self._pairs:
            proxy.requires_grad_(real.requires_grad)

    def pull_gradients(self) -> None:
        """Show each real parameter's gradient (its local shard, no copy) as its proxy's ``.grad``."""
        self._pulled = {}
        for real, proxy in self._pairs:
            grad = None if real.grad is None else _local(real.grad)
            proxy.grad = grad
            self._pulled[id(proxy)] = grad

    def push_gradients(self) -> None:
        """Give back the gradients the algorithm replaced (a new tensor) or dropped (``None``) since the pull;
        in-place changes are in the real gradient already."""
        for real, proxy in self._pairs:
            if proxy.grad is self._pulled.get(id(proxy)):
                continue
            if proxy.grad is None:
                real.grad = None
            else:
                real.grad = like_sharded(proxy.grad, real) if is_sharded(real) else proxy.grad
        self._pulled = {}
        for _, proxy in self._pairs:
            proxy.grad = None  # nothing else holds the gradient's memory past the step

    def check_still_aliased(self) -> None:
        """FSDP2 keeps each shard in the same memory for the module's life; the algorithm relies on it."""
        for real, proxy in self._pairs:
            local = _local(real.detach())
            if local.numel() and local.data_ptr() != proxy.data_ptr():
                raise RuntimeError(
                    "FSDP2 moved a parameter's local shard to new memory (was the module moved with `.to()` or its "
                    "parameters replaced after set-up?); the algorithm's state no longer matches the model."
                )
