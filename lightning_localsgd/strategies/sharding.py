"""Replica groups: FSDP2 inside a group of ``shard_size`` consecutive ranks, the local-update algorithm across groups.

The world is laid out ``groups x shard_size``, node-major (ranks ``g * shard_size ... g * shard_size + shard_size
- 1`` form group ``g``; normally one node). A :class:`~torch.distributed.device_mesh.DeviceMesh` with a
``"replicate"`` and a ``"shard"`` dimension describes it. Inside a group, PyTorch's ``fully_shard`` (FSDP2, over
the ``"shard"`` sub-mesh) shards parameters, gradients and optimizer state and reduce-scatters gradients every
step on the fast link. Across groups, the algorithm runs on each rank's local shards (``comm/local_shards.py``)
and averages shard ``k`` over the ranks that hold it (rank ``k`` of every group: the ``"replicate"`` process
group), so a group sends one model per round in total, split over its ranks.

This module holds what does not depend on Lightning: the layout's checks, the mesh, the sharding policy, the
per-shard process group, and the optimizer state converted to plain local tensors for the per-rank checkpoint
shards (a ``DTensor`` pickles its mesh, and every group's optimizer state differs, so it is written per rank).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from datetime import timedelta
from typing import Any, Optional, Union

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.optim import Optimizer

from lightning_localsgd._validation import check_bool, check_int
from lightning_localsgd.comm.local_shards import FSDPModule, LocalShards, is_sharded, like_sharded, sharded_parameters

ShardLayers = Union[Sequence[Union[str, type]], None]
_PARAM_DTYPES = {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp16": torch.float16, "float16": torch.float16}


def replica_groups(
    shard_size: int,
    shard_layers: ShardLayers,
    shard_param_dtype: Optional[str],
    activation_checkpointing: bool,
    algorithm: Any,
    strategy: str,
) -> Optional[ReplicaGroups]:
    """The sharding knobs, validated up front (before any process starts), as :class:`ReplicaGroups`; None for
    ``shard_size=1`` (a full replica per rank)."""
    check_int("shard_size", shard_size, 1)
    check_bool("shard_activation_checkpointing", activation_checkpointing)
    if activation_checkpointing and not shard_layers:
        raise ValueError(
            "`shard_activation_checkpointing=True` recomputes the activations of the `shard_layers` in backward; "
            "name the layers (e.g. shard_layers=['TransformerBlock'])."
        )
    layers = tuple(shard_layers or ())
    for layer in layers:
        if not (isinstance(layer, str) and layer) and not (isinstance(layer, type) and issubclass(layer, nn.Module)):
            raise ValueError(
                f"`shard_layers` holds module class names (e.g. ['TransformerBlock']) or `nn.Module` subclasses; got "
                f"{layer!r}."
            )
    if shard_param_dtype is not None and shard_param_dtype not in _PARAM_DTYPES:
        raise ValueError(
            f"`shard_param_dtype` must be one of {sorted(_PARAM_DTYPES)} or None (FSDP2 all-gathers parameters and "
            f"computes in that dtype, reduce-scatters in float32); got {shard_param_dtype!r}."
        )
    if shard_size == 1:
        if layers or shard_param_dtype is not None or activation_checkpointing:
            raise ValueError(
                "`shard_layers`, `shard_param_dtype` and `shard_activation_checkpointing` shape the FSDP2 sharding "
                f"inside a replica group; they need `shard_size` > 1, got shard_size={shard_size}."
            )
        return None
    if FSDPModule is None:
        raise ValueError(f"`shard_size` > 1 needs FSDP2 (`fully_shard`), torch >= 2.6; got {torch.__version__}.")
    reason = algorithm.sharding_refused_because
    if reason is not None:
        raise ValueError(f"{strategy} cannot run with `shard_size` > 1: {reason}.")
    if algorithm.warmup_steps > 0:
        raise ValueError(
            f"{strategy}: `warmup_steps` > 0 averages gradients over every rank at each warm-up step, which with "
            "`shard_size` > 1 would be a second gradient reduction on top of FSDP2's; set `warmup_steps=0` (the "
            "replica groups' rounds start at once)."
        )
    dtype = _PARAM_DTYPES[shard_param_dtype] if shard_param_dtype else None
    return ReplicaGroups(shard_size, layers, dtype, activation_checkpointing, strategy)


def check_layout(world_size: int, shard_size: int, num_processes: int, strategy: str) -> int:
    """The number of replica groups; refuses a world that ``shard_size`` does not divide."""
    if world_size % shard_size:
        raise ValueError(
            f"{strategy}: the world of {world_size} ranks cannot be split into replica groups of shard_size="
            f"{shard_size}; choose a `shard_size` that divides it (e.g. the devices per node, {num_processes})."
        )
    if world_size == shard_size:
        raise ValueError(
            f"{strategy}: shard_size={shard_size} puts all {world_size} ranks in one replica group, so there is no "
            "other group to average with: that is plain FSDP (Lightning's `ModelParallelStrategy`). Use a "
            f"`shard_size` that leaves at least two groups (e.g. {world_size // 2})."
        )
    return world_size // shard_size


def build_mesh(device_type: str, groups: int, shard_size: int) -> Any:
    """The 2-D mesh ``("replicate", "shard")``; collective over the world (it creates both dimensions' groups)."""
    from torch.distributed.device_mesh import init_device_mesh

    return init_device_mesh(device_type, (groups, shard_size), mesh_dim_names=("replicate", "shard"))


def replicate_groups(
    groups: int, shard_size: int, rank: int, timeout: timedelta
) -> tuple[dist.ProcessGroup, dist.ProcessGroup]:
    """The process group of the ranks holding the same shard as ``rank`` (one per group), with ``timeout``, and a
    second one of the same ranks for non-blocking transfers (see ``ProcessGroupCommunicator``).

    Collective over the world: every rank creates every shard index's groups, in the same order.
    """
    mine: Optional[tuple[dist.ProcessGroup, dist.ProcessGroup]] = None
    for k in range(shard_size):
        ranks = [g * shard_size + k for g in range(groups)]
        pair = (dist.new_group(ranks, timeout=timeout), dist.new_group(ranks, timeout=timeout))
        if rank % shard_size == k:
            mine = pair
    assert mine is not None
    return mine


def _matches(module: nn.Module, layers: tuple[Union[str, type], ...]) -> bool:
    return any(
        (isinstance(layer, str) and type(module).__name__ == layer)
        or (isinstance(layer, type) and isinstance(module, layer))
        for layer in layers
    )


def shard_module(
    module: nn.Module,
    mesh: Any,
    layers: tuple[Union[str, type], ...],
    param_dtype: Optional[torch.dtype],
    strategy: str,
    activation_checkpointing: bool = False,
) -> None:
    """``fully_shard`` every sub-module of a class in ``layers``, then every direct child that holds parameters,
    over the ``"shard"`` sub-mesh; with ``activation_checkpointing``, the ``layers`` recompute their activations in
    backward (torch's composable ``checkpoint``: parameter names unchanged). The LightningModule itself is not
    sharded: Lightning calls ``training_step``, not its ``forward``, so FSDP2's hooks on it would never run; each
    child is the root of its own sharded tree.

    A module the user sharded already (in ``configure_model``, over ``device_mesh["shard"]``) is left as it is.
    """
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    if sharded_parameters(module):
        check_user_sharding(module, mesh, strategy)
        return
    own = [name for name, _ in module.named_parameters(recurse=False)]
    if own:
        raise ValueError(
            f"{strategy}: parameters {own[:5]} sit on the LightningModule itself, which FSDP2 cannot shard here "
            "(Lightning calls `training_step`, not the module's `forward`). Move them into a sub-module, or shard the "
            "module yourself in `configure_model` over `self.device_mesh['shard']`."
        )
    missing = [layer for layer in layers if not any(_matches(sub, (layer,)) for sub in module.modules())]
    if missing:
        raise ValueError(
            f"{strategy}: `shard_layers` names {missing}, but the module has no such layer (its layer classes: "
            f"{sorted({type(sub).__name__ for sub in module.modules()})})."
        )
    options: dict[str, Any] = {"mesh": mesh["shard"]}
    if param_dtype is not None:
        options["mp_policy"] = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32)
    inner = [sub for sub in module.modules() if sub is not module and _matches(sub, layers)]
    roots = [child for child in module.children() if any(True for _ in child.parameters())]
    try:
        if activation_checkpointing:
            from torch.distributed._composable import checkpoint

            for sub in inner:
                checkpoint(sub)
        for sub in [*inner, *(child for child in roots if child not in inner)]:
            fully_shard(sub, **options)
    except Exception as error:
        raise ValueError(
            f"{strategy}: FSDP2 (`fully_shard`) could not shard the module with `shard_layers`={list(layers)}: "
            f"{type(error).__name__}: {error}"
        ) from error


def check_user_sharding(module: nn.Module, mesh: Any, strategy: str) -> None:
    """A module sharded in ``configure_model`` must be sharded whole, over this strategy's ``"shard"`` sub-mesh."""
    shard_mesh = mesh["shard"]
    loose = [name for name, p in module.named_parameters() if not is_sharded(p)]
    if loose:
        raise ValueError(
            f"{strategy}: `configure_model` sharded some parameters but not {loose[:5]}; apply `fully_shard` to the "
            "root module as well, so every parameter is sharded."
        )
    for name, p in sharded_parameters(module):
        if p.device_mesh != shard_mesh:
            raise ValueError(
                f"{strategy}: parameter {name!r} is sharded over {p.device_mesh}, not over this strategy's "
                "`self.device_mesh['shard']`: in `configure_model`, call `fully_shard(layer, mesh=self.device_mesh"
                "['shard'])` (the replicate dimension is the algorithm's, not FSDP2's)."
            )


def check_no_averaged_buffers(module: nn.Module, selection: Any, strategy: str) -> None:
    """Refuse buffers the algorithm would average (BatchNorm statistics): FSDP2 leaves them each rank's own inside
    a group, so a round over the groups would still leave the ranks of one group evaluating different models."""
    from lightning_localsgd.algorithms.buffers import averaged_buffers

    names = [name for name, _ in averaged_buffers(module, selection)]
    if names:
        raise ValueError(
            f"{strategy}: with `shard_size` > 1 the buffers {names[:4]} would differ between the ranks of a replica "
            "group (FSDP2 does not synchronise buffers), so evaluation and checkpoints would not be one consensus. "
            "Use normalisation without running statistics (LayerNorm, GroupNorm, RMSNorm), or pass `buffers='none'` "
            "to keep them each rank's own knowingly."
        )


def intra_group_bytes_per_batch(module: nn.Module, shard_size: int, param_dtype: Optional[torch.dtype]) -> int:
    """What FSDP2 sends inside a replica group per training batch, per rank, from the layout (an estimate: FSDP2
    counts nothing itself). Each sharded unit's own parameters are all-gathered for forward and, unless the unit is
    a root (kept gathered after forward), again for backward; their gradients are reduce-scattered. A ring
    all-gather or reduce-scatter sends ``(S - 1) / S`` of the full tensor per rank."""
    units = [sub for sub in module.modules() if FSDPModule is not None and isinstance(sub, FSDPModule)]
    owned: dict[int, nn.Module] = {}
    for unit in units:  # outer units first: an inner unit takes its parameters over
        for p in unit.parameters():
            owned[id(p)] = unit
    inner = {id(sub) for unit in units for sub in unit.modules() if sub is not unit}
    total = 0.0
    for unit in units:
        params = [p for p in unit.parameters() if owned[id(p)] is unit]
        # FSDP2 pads dim 0 to a multiple of the shard count, and the padding travels too.
        numel = sum(math.ceil(p.shape[0] / shard_size) * shard_size * p[0].numel() for p in params if p.dim())
        if not numel:
            continue
        gathered = torch.empty(0, dtype=param_dtype or params[0].dtype).element_size()
        reduced = 4 if param_dtype is not None else params[0].element_size()
        gathers = 2 if id(unit) in inner else 1
        total += (shard_size - 1) / shard_size * numel * (gathers * gathered + reduced)
    return int(total)


def _each_state_tensor(optimizer_state: dict[str, Any], optimizer: Optimizer, convert: Any) -> dict[str, Any]:
    params = [p for group in optimizer.param_groups for p in group["params"]]
    state = {}
    for index, entries in optimizer_state["state"].items():
        param = params[index] if isinstance(index, int) and index < len(params) else None
        state[index] = {key: convert(value, param) for key, value in entries.items()}
    return {**optimizer_state, "state": state}


def local_optimizer_state(optimizer: Optimizer) -> dict[str, Any]:
    """``optimizer.state_dict()`` with every ``DTensor`` as its local tensor (no copy)."""

    def to_local(value: Any, param: Optional[Tensor]) -> Any:
        return value.to_local() if is_sharded(value) else value

    return _each_state_tensor(optimizer.state_dict(), optimizer, to_local)


def sharded_optimizer_state(saved: dict[str, Any], optimizer: Optimizer) -> dict[str, Any]:
    """Undo :func:`local_optimizer_state` for ``optimizer``: a local tensor of a sharded parameter's shape becomes a
    ``DTensor`` placed as that parameter is (scalars such as Adam's ``step`` stay plain tensors)."""

    def to_sharded(value: Any, param: Optional[Tensor]) -> Any:
        plain = isinstance(value, Tensor) and not is_sharded(value) and value.dim() > 0
        if plain and param is not None and is_sharded(param) and value.shape == param.to_local().shape:
            return like_sharded(value.to(param.device), param)
        return value

    return _each_state_tensor(saved, optimizer, to_sharded)


class ReplicaGroups:
    """One strategy's replica groups (the Trainer's or Fabric's): the knobs, the mesh, the communicators and the
    local shards the algorithm runs on. Built from the checked knobs of :func:`check_shard_options`."""

    def __init__(
        self,
        shard_size: int,
        layers: tuple[Union[str, type], ...],
        param_dtype: Optional[torch.dtype],
        activation_checkpointing: bool,
        strategy: str,
    ) -> None:
        self.shard_size = shard_size
        self.layers = layers
        self.param_dtype = param_dtype
        self.activation_checkpointing = activation_checkpointing
        self.strategy = strategy
        self.mesh: Optional[Any] = None
        self.shards: Optional[LocalShards] = None
        self.world: Optional[Any] = None  # the communicator over every rank: the guard's and the checkpoints'
        self._intra_bytes_per_batch: Optional[int] = None

    def build_mesh(self, world_size: int, num_processes: int, device_type: str) -> Any:
        """Collective, once the process group exists: the ``("replicate", "shard")`` mesh."""
        if self.mesh is None:
            groups = check_layout(world_size, self.shard_size, num_processes, self.strategy)
            self.mesh = build_mesh(device_type, groups, self.shard_size)
        return self.mesh

    def communicator(self, world: Any, rank: int, timeout: timedelta) -> Any:
        """Collective: the algorithm's communicator, over the ranks that hold this rank's shard; ``world`` (over
        every rank) becomes the guard's, so a non-finite shard or a stop request reaches every group alike."""
        from lightning_localsgd.comm import ProcessGroupCommunicator

        self.world = world
        groups = world.world_size // self.shard_size
        replicas, background = replicate_groups(groups, self.shard_size, rank, timeout)
        return ProcessGroupCommunicator(replicas, timeout, background)

    def shard(self, module: nn.Module, buffers: Any) -> LocalShards:
        """Shard ``module`` inside the groups (unless ``configure_model`` did) and return its local shards."""
        if self.shards is not None:  # a second `fit`: the shards must still be where the algorithm's state is
            self.shards.check_still_aliased()
        if self.shards is None:
            assert self.mesh is not None, "build the mesh first"
            check_no_averaged_buffers(module, buffers, self.strategy)
            shard_module(module, self.mesh, self.layers, self.param_dtype, self.strategy, self.activation_checkpointing)
            self.shards = LocalShards(module)
        return self.shards

    def reshard(self) -> None:
        if self.shards is not None:
            self.shards.reshard()

    def before_optimizer_step(self, algorithm: Any, optimizer: Optimizer) -> None:
        """The algorithm's before-step moment on the local shards. The trainable set follows the real module's; the
        gradients are shown to the algorithm (and handed back) only at steps where it reads them: a local step of
        Local SGD, VRL-SGD, DiLoCo... touches none, and stays as cheap as FSDP2's own step."""
        shards = self.shards
        if shards is None:
            algorithm.before_optimizer_step(optimizer)
            return
        shards.follow_requires_grad()
        if not algorithm.reads_gradients_before_step():
            algorithm.before_optimizer_step(optimizer)
            return
        shards.pull_gradients()
        try:
            algorithm.before_optimizer_step(optimizer)
        finally:
            shards.push_gradients()

    def intra_group_megabytes(self, module: nn.Module, batches: int) -> float:
        """FSDP2's traffic inside the group over ``batches`` training batches (:func:`intra_group_bytes_per_batch`)."""
        if self._intra_bytes_per_batch is None:
            self._intra_bytes_per_batch = intra_group_bytes_per_batch(module, self.shard_size, self.param_dtype)
        return batches * self._intra_bytes_per_batch / 1e6
