"""Set-ups that cannot work are refused with a message that says what to do (no training is started)."""

from __future__ import annotations

from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.fsdp import FullyShardedDataParallel
from torch.distributed.optim import ZeroRedundancyOptimizer
from torch.nn.parallel import DistributedDataParallel

from lightning_localsgd import LocalSGD, LocalSGDStrategy
from lightning_localsgd.comm import FlatParameters, run_simulated
from lightning_localsgd.strategies.safety import (
    check_supported_device,
    check_supported_model,
    check_supported_optimizers,
)


@pytest.fixture
def one_rank_group(tmp_path):
    dist.init_process_group("gloo", store=dist.FileStore(str(tmp_path / "store"), 1), rank=0, world_size=1)
    yield
    dist.destroy_process_group()


class ShardedBlock(FullyShardedDataParallel):
    """An FSDP-wrapped block as a user's model would contain it (construction of a real one needs a mesh)."""

    def __init__(self) -> None:
        nn.Module.__init__(self)
        self.inner = nn.Linear(2, 2)


def test_a_model_with_an_fsdp_block_is_refused():
    model = nn.Sequential(nn.Linear(2, 2), ShardedBlock())
    with pytest.raises(
        ValueError, match=r"`1` is sharded with FSDP.*Shard inside replica groups instead: set `shard_size`"
    ):
        check_supported_model(model, "LocalSGDStrategy")


def test_a_model_already_in_ddp_is_refused(one_rank_group):
    with pytest.raises(ValueError, match=r"DistributedDataParallel.*Pass the bare module"):
        check_supported_model(DistributedDataParallel(nn.Linear(2, 2)), "LocalSGDStrategy")


def test_zero_redundancy_optimizer_is_refused_naming_the_plain_one(one_rank_group):
    model = nn.Linear(2, 2)
    zero = ZeroRedundancyOptimizer(model.parameters(), optimizer_class=torch.optim.AdamW, lr=0.1)
    with pytest.raises(ValueError, match=r"ZeroRedundancyOptimizer.*`AdamW`"):
        check_supported_optimizers([zero], "LocalSGDStrategy")


def test_plain_model_and_optimizer_pass():
    model = nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2))
    check_supported_model(model, "LocalSGDStrategy")
    check_supported_optimizers([torch.optim.SGD(model.parameters(), lr=0.1)], "LocalSGDStrategy")


@pytest.mark.parametrize("device", ["meta", "mps", "xla"])
def test_devices_without_a_supported_backend_are_refused(device):
    with pytest.raises(ValueError, match="accelerator='cpu'"):
        check_supported_device(torch.device(device), "VRLSGDStrategy")


def test_timeouts_accept_seconds_or_timedelta():
    strategy = LocalSGDStrategy(timeout=90, collective_timeout=30)
    assert strategy._timeout == timedelta(seconds=90)
    assert strategy.collective_timeout == timedelta(seconds=30)
    assert LocalSGDStrategy(timeout=timedelta(minutes=2))._timeout == timedelta(minutes=2)


def test_a_deepspeed_engine_is_refused_by_its_package():
    # DeepSpeed is not installed here: a module class that lives in the `deepspeed` package stands in for it.
    engine_class = type("DeepSpeedEngine", (nn.Module,), {"__module__": "deepspeed.runtime.engine"})
    with pytest.raises(ValueError, match="DeepSpeed engine"):
        check_supported_model(engine_class(), "VRLSGDStrategy")


def test_parameters_on_several_devices_are_refused_naming_the_devices():
    model = nn.Sequential(nn.Linear(2, 3), nn.Linear(3, 1, device="meta"))  # e.g. model parallel within a rank
    with pytest.raises(
        ValueError, match=r"several devices: cpu \(first: parameter 0.*meta \(first: parameter 2, shape \(1, 3\)\)"
    ):
        FlatParameters(model.parameters())


def test_the_algorithm_refuses_parameters_on_several_devices_at_set_up_not_later():
    def worker(rank, comm):
        model = nn.Sequential(nn.Linear(2, 3), nn.Linear(3, 1, device="meta"))
        LocalSGD(period=2).setup(model, comm)

    with pytest.raises(ValueError, match=r"single device.*Move the whole module to one device"):
        run_simulated(2, worker)


def test_parameters_on_the_meta_device_are_refused():
    with pytest.raises(ValueError, match=r"`meta` device.*to_empty"):
        FlatParameters(nn.Linear(2, 2, device="meta").parameters())


@pytest.mark.parametrize(
    "tensor",
    [torch.zeros(4, 6)[:, ::2], torch.zeros(3).expand(2, 3), torch.zeros(2, 5)[:, 1:4]],
    ids=["strided", "expanded", "sliced"],
)
def test_parameters_that_are_not_dense_in_memory_are_refused(tensor):
    with pytest.raises(ValueError, match=r"Parameter 1 \(shape .*, strides .*\) is not dense.*contiguous\(\)"):
        FlatParameters([nn.Parameter(torch.zeros(2)), nn.Parameter(tensor)])
