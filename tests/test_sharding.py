"""Replica groups' pieces: knobs refused up front, the layout, the sharding policy's refusals, flat parameters kept
in place, the local-shard stand-ins (plain and over a real FSDP2 module in 4 gloo processes), and optimizer state
through a checkpoint shard."""

from __future__ import annotations

import copy

import pytest
import torch
from dist_utils import run_processes
from torch import nn

from lightning_localsgd import (
    DeTAGStrategy,
    DiLoCoStrategy,
    DPSGDStrategy,
    ErrorFeedbackStrategy,
    HierarchicalLocalSGDStrategy,
    LIECSGDStrategy,
    LocalSGDStrategy,
    VRLSGDStrategy,
)
from lightning_localsgd.comm import FlatParameters
from lightning_localsgd.comm.local_shards import LocalShards
from lightning_localsgd.strategies.sharding import check_layout, shard_module


@pytest.mark.parametrize(
    "strategy",
    [ErrorFeedbackStrategy, LIECSGDStrategy, DPSGDStrategy, DeTAGStrategy, HierarchicalLocalSGDStrategy],
)
def test_strategies_without_a_sharded_form_refuse_shard_size_saying_why(strategy: type) -> None:
    with pytest.raises(ValueError, match=r"cannot run with `shard_size` > 1: (it|its|replica groups)"):
        strategy(shard_size=2)
    strategy(shard_size=1)  # the default layout stays available


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"shard_size": 0}, "shard_size"),
        ({"shard_size": 2, "warmup_steps": 4}, "warmup_steps"),
        ({"shard_layers": ["Linear"]}, "need `shard_size` > 1"),
        ({"shard_param_dtype": "bf16"}, "need `shard_size` > 1"),
        ({"shard_size": 2, "shard_param_dtype": "int8"}, "shard_param_dtype"),
        ({"shard_size": 2, "shard_layers": [3]}, "module class names"),
        ({"shard_size": 2, "shard_activation_checkpointing": True}, "name the layers"),
        ({"shard_layers": ["Linear"], "shard_activation_checkpointing": True}, "need `shard_size` > 1"),
        (
            {"shard_size": 2, "shard_layers": ["Linear"], "shard_activation_checkpointing": "yes"},
            "must be True or False",
        ),
    ],
)
def test_bad_sharding_knobs_are_refused_before_any_process_starts(options: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        LocalSGDStrategy(**options)


def test_supported_strategies_take_the_knobs() -> None:
    for strategy in (LocalSGDStrategy, VRLSGDStrategy, DiLoCoStrategy):
        made = strategy(shard_size=4, shard_layers=["Linear", nn.Conv2d], shard_param_dtype="bf16")
        assert made.shard_size == 4 and made.restore_checkpoint_after_setup
    assert not LocalSGDStrategy().restore_checkpoint_after_setup  # unsharded: Lightning's order, unchanged


def test_layouts() -> None:
    assert check_layout(8, 4, 4, "S") == 2
    with pytest.raises(ValueError, match="cannot be split"):
        check_layout(6, 4, 2, "S")
    with pytest.raises(ValueError, match="no other group"):
        check_layout(4, 4, 4, "S")


class Root(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))
        self.scale = nn.Parameter(torch.ones(1))


def test_the_policy_refuses_what_fsdp2_cannot_shard_here() -> None:
    with pytest.raises(ValueError, match="sit on the LightningModule itself"):
        shard_module(Root(), None, (), None, "S")
    module = Root()
    del module.scale
    with pytest.raises(ValueError, match=r"names \['Block'\], but the module has no such layer"):
        shard_module(module, None, ("Block",), None, "S")


def test_flat_parameters_in_place_leave_parameters_in_their_own_memory() -> None:
    layers = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2))
    params = list(layers.parameters())
    pointers = [p.data_ptr() for p in params]
    stand_in = torch.empty(1)
    flat = FlatParameters(params, in_place=True, aliases={id(stand_in): id(params[2])})
    assert [p.data_ptr() for p in params] == pointers  # not re-homed
    assert [b.data_ptr() for b in flat.buckets] == pointers and len(flat.buckets) == len(params)
    assert flat.index_of[id(stand_in)] == 2
    flat.buckets[1].fill_(7.0)  # a round writing a bucket writes the parameter
    assert torch.equal(params[1].detach(), torch.full((4,), 7.0))
    for view, p in zip(flat.views_of(flat.buckets), params):
        assert view.shape == p.shape and view.data_ptr() == p.data_ptr()
    params[0].data = params[0].data.clone()  # memory replaced behind the algorithm's back
    with pytest.raises(RuntimeError, match="memory was replaced"):
        flat.ensure_views()


def test_local_shards_of_a_plain_module_alias_its_tensors_under_the_same_names() -> None:
    module = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 2))
    module[2].weight.requires_grad_(False)
    shards = LocalShards(module)
    assert [n for n, _ in shards.named_parameters()] == [n for n, _ in module.named_parameters()]
    assert dict(shards.named_buffers()).keys() == dict(module.named_buffers()).keys()
    for (_, a), (_, b) in zip(shards.named_buffers(), module.named_buffers()):
        assert a is b
    for (_, proxy), (_, real) in zip(shards.named_parameters(), module.named_parameters()):
        assert proxy is not real and proxy.data_ptr() == real.data_ptr()
        assert proxy.requires_grad == real.requires_grad
    module(torch.randn(5, 3)).sum().backward()
    reals = list(module.parameters())
    shards.pull_gradients()
    proxies = list(shards.parameters())
    assert proxies[0].grad is reals[0].grad and proxies[4].grad is None
    proxies[0].grad.mul_(2)  # in place: already the real gradient
    replaced = torch.zeros_like(reals[1])
    proxies[1].grad = replaced
    proxies[2].grad = None
    before = reals[0].grad.clone()
    shards.push_gradients()
    assert torch.equal(reals[0].grad, before)
    assert reals[1].grad is replaced and reals[2].grad is None
    assert all(p.grad is None for p in proxies)  # the stand-ins hold no gradient memory past the step


def _fsdp_worker(rank: int) -> dict:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    from lightning_localsgd.strategies.sharding import local_optimizer_state, sharded_optimizer_state

    mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("replicate", "shard"))
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 1))
    reference = copy.deepcopy(net)
    fully_shard(net, mesh=mesh["shard"])  # one root holding every parameter: kept gathered after a forward
    shards = LocalShards(net)
    names = [n for n, _ in shards.named_parameters()]
    inputs = [torch.randn(4, 3, generator=torch.Generator().manual_seed(r)) for r in range(4)]
    x = inputs[rank]
    out: dict = {"names": names, "shapes": [tuple(p.shape) for p in shards.parameters()]}

    # Gradients: the proxies see this rank's shard of the mean of its group's two ranks' gradients.
    net(x).square().mean().backward()
    shards.pull_gradients()
    group = rank // 2
    expected = []
    for r in (2 * group, 2 * group + 1):
        twin = copy.deepcopy(reference)
        twin(inputs[r]).square().mean().backward()
        expected.append([p.grad for p in twin.parameters()])
    means = [(a + b) / 2 for a, b in zip(*expected)]
    out["grad_error"] = max(
        (p.grad - torch.chunk(mean, 2)[rank % 2] if len(torch.chunk(mean, 2)) > rank % 2 else p.grad).abs().max().item()
        if p.grad.numel()
        else 0.0
        for p, mean in zip(shards.parameters(), means)
    )
    shards.push_gradients()

    # A write into the stand-ins is what the next forward computes with.
    with torch.no_grad():
        for p in shards.parameters():
            p.mul_(0.5)
        for p in reference.parameters():
            p.mul_(0.5)
        out["forward_after_write"] = (net(x) - reference(x)).abs().max().item()
        # Evaluation leaves the root's gathered parameters in place; a later write is seen after `reshard` only.
        net(x)
        for p in shards.parameters():
            p.mul_(2.0)
        for p in reference.parameters():
            p.mul_(2.0)
        out["stale_without_reshard"] = (net(x) - reference(x)).abs().max().item()
        shards.reshard()
        out["fresh_after_reshard"] = (net(x) - reference(x)).abs().max().item()

    # Optimizer state through a checkpoint shard: plain local tensors out, DTensors back, the same next step.
    shards.reshard()  # FSDP2 registers the gathered parameters while gathered: the optimizer must hold the shards
    optimizer = torch.optim.Adam(net.parameters(), lr=0.1)
    net(x).square().mean().backward()
    optimizer.step()
    saved = copy.deepcopy(local_optimizer_state(optimizer))
    kinds = {type(v).__name__ for entry in saved["state"].values() for v in entry.values()}
    twin = torch.optim.Adam(net.parameters(), lr=0.1)
    twin.load_state_dict(sharded_optimizer_state(saved, twin))
    out["saved_kinds"] = sorted(kinds)
    out["restored"] = all(
        torch.equal(a.to_local() if hasattr(a, "to_local") else a, b.to_local() if hasattr(b, "to_local") else b)
        and type(a) is type(b)
        for sa, sb in zip(optimizer.state.values(), twin.state.values())
        for a, b in zip(sa.values(), sb.values())
    )

    # A module sharded in `configure_model` must be sharded whole, over the strategy's "shard" dimension.
    from lightning_localsgd.strategies.sharding import check_user_sharding

    partly = nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 2))
    fully_shard(partly[0], mesh=mesh["shard"])
    elsewhere = nn.Linear(2, 2)
    fully_shard(elsewhere, mesh=mesh["replicate"])
    for name, module in (("partly", partly), ("elsewhere", elsewhere)):
        try:
            check_user_sharding(module, mesh, "S")
            out[name] = "accepted"
        except ValueError as error:
            out[name] = str(error)
    return out


def test_local_shards_of_an_fsdp2_module_are_its_shards() -> None:
    results = run_processes(4, _fsdp_worker)
    full_rows = {"0.weight": 5, "0.bias": 5, "2.weight": 1, "2.bias": 1}
    for rank, out in enumerate(results):
        k = rank % 2
        for name, shape in zip(out["names"], out["shapes"]):
            rows = full_rows[name]
            per = -(-rows // 2)
            assert shape[0] == max(0, min(rows, (k + 1) * per) - k * per), (rank, name, shape)
        assert out["forward_after_write"] < 1e-6
        assert out["stale_without_reshard"] > 1e-3  # the trap `reshard` exists for
        assert out["fresh_after_reshard"] < 1e-6
        assert out["saved_kinds"] == ["Tensor"] and out["restored"]
        assert out["grad_error"] < 1e-6  # averaged over the group (not summed: the gloo trap), then sharded
        assert "sharded some parameters but not ['1.weight', '1.bias']" in out["partly"]
        assert "not over this strategy's `self.device_mesh['shard']`" in out["elsewhere"]


def test_buffers_fsdp2_leaves_per_rank_are_refused_unless_kept_per_rank_knowingly() -> None:
    from lightning_localsgd.strategies.sharding import check_no_averaged_buffers

    module = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))
    with pytest.raises(ValueError, match=r"buffers \['1.running_mean', '1.running_var'\] would differ"):
        check_no_averaged_buffers(module, None, "S")
    check_no_averaged_buffers(module, "none", "S")
    check_no_averaged_buffers(nn.Sequential(nn.Linear(3, 4), nn.LayerNorm(4)), None, "S")


def test_local_shards_notice_memory_replaced_behind_them() -> None:
    module = nn.Linear(3, 2)
    shards = LocalShards(module)
    shards.check_still_aliased()
    module.weight.data = module.weight.data.clone()  # e.g. `module.to(...)` between two fits
    with pytest.raises(RuntimeError, match="moved a parameter's local shard to new memory"):
        shards.check_still_aliased()
