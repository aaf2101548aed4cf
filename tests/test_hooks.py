"""The compressed DDP communication hooks, on plain PyTorch DDP with 2 gloo processes and uneven buckets."""

import copy
import pickle

import pytest
import torch
import torch.distributed as dist
from dist_utils import run_processes
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

from lightning_localsgd.hooks import CompressedHookState, ef_sign_hook

LR = 0.1
BUCKET_CAP_MB = 0.002  # about 500 floats: buckets of very different sizes (the first layer alone is 400 floats)
ONE_BUCKET_MB = 25.0


def make_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(10, 40), nn.Tanh(), nn.Linear(40, 30), nn.Tanh(), nn.Linear(30, 3))


def batch(rank: int, step: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(100 * rank + step)
    return torch.randn(16, 10, generator=g) + rank, torch.randn(16, 3, generator=g)


def params_of(module: nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1) for p in module.parameters()])


def train(ddp: DDP, opt: torch.optim.Optimizer, rank: int, steps: range, poison_step: int = -1) -> list[torch.Tensor]:
    trajectory = []
    for step in steps:
        opt.zero_grad()
        x, y = batch(rank, step)
        if step == poison_step and rank == 1:
            x = x.clone()
            x[0, 0] = float("nan")
        nn.functional.mse_loss(ddp(x), y).backward()
        if step == poison_step:
            trajectory.append(torch.cat([p.grad.reshape(-1) for p in ddp.parameters()]))
            continue  # the NaN step is not taken (a GradScaler would skip it)
        opt.step()
        trajectory.append(params_of(ddp.module))
    return trajectory


BUCKET_SIZES: set = set()  # sizes of the buckets the hook saw in this process


def recording_hook(state: CompressedHookState, bucket: dist.GradBucket) -> torch.futures.Future[torch.Tensor]:
    BUCKET_SIZES.add(bucket.buffer().numel())
    return ef_sign_hook(state, bucket)


def hooked(compressor: str, bucket_cap_mb: float = BUCKET_CAP_MB) -> tuple[DDP, CompressedHookState]:
    ddp = DDP(make_model(), bucket_cap_mb=bucket_cap_mb)
    state = CompressedHookState(compressor, module=ddp.module)
    ddp.register_comm_hook(state, recording_hook)
    return ddp, state


def uncompressed_equals_plain_ddp(rank: int) -> tuple[float, int]:
    plain = DDP(make_model(), bucket_cap_mb=BUCKET_CAP_MB)
    ddp, _ = hooked("none")
    a = train(plain, torch.optim.SGD(plain.parameters(), lr=LR), rank, range(5))
    b = train(ddp, torch.optim.SGD(ddp.parameters(), lr=LR), rank, range(5))
    return max((x - y).abs().max().item() for x, y in zip(a, b)), len(BUCKET_SIZES)


def test_without_compression_the_hook_is_plain_ddp_on_uneven_buckets():
    for gap, buckets in run_processes(2, uncompressed_equals_plain_ddp):
        assert gap < 1e-6
        assert buckets >= 3  # buckets of several sizes went through the hook


def sign_run(rank: int) -> dict:
    ddp, state = hooked("sign")
    opt = torch.optim.SGD(ddp.parameters(), lr=LR)
    twin = make_model()  # the same parameters, no DDP: this rank's own gradient at each step
    start = params_of(ddp.module)
    grad_sum = 0.0
    for step in range(6):
        twin.load_state_dict(ddp.module.state_dict())
        twin.zero_grad()
        x, y = batch(rank, step)
        nn.functional.mse_loss(twin(x), y).backward()
        local = torch.tensor(sum(p.grad.sum().item() for p in twin.parameters()), dtype=torch.float64)
        dist.all_reduce(local)
        grad_sum += local.item() / 2
        train(ddp, opt, rank, range(step, step + 1))
    error_sum = torch.tensor(sum(e.sum().item() for e in state.errors.values()), dtype=torch.float64)
    dist.all_reduce(error_sum)
    moved = (params_of(ddp.module) - start).sum().item()
    sizes = sorted(BUCKET_SIZES)
    return {
        "params": params_of(ddp.module),
        "moved": moved,
        "grads": grad_sum,
        "errors": error_sum.item() / 2,
        "sizes": sizes,
        "bytes": state.bytes_sent,
        "exchanges": state.exchanges,
    }


def test_sign_compression_keeps_replicas_identical_and_error_feedback_loses_nothing():
    ranks = run_processes(2, sign_run)
    assert torch.equal(ranks[0]["params"], ranks[1]["params"])
    for r in ranks:
        # Plain SGD: x_T - x_0 = -lr * (sum of mean gradients - mean of the final errors), summed over elements.
        assert abs(r["moved"] + LR * (r["grads"] - r["errors"])) < 1e-4
        assert len(r["sizes"]) >= 2  # uneven buckets
        numel_total = sum(p.numel() for p in make_model().parameters())
        assert r["bytes"] < r["exchanges"] * (4 + 5 * 4 + numel_total // 8 + 1) * 1.0 + 1  # packed: ~1/32 of fp32


def nan_and_resume(rank: int) -> dict:
    # A NaN on rank 1 at step 2: every rank's bucket is NaN, no error changes.
    ddp, state = hooked("sign")
    opt = torch.optim.SGD(ddp.parameters(), lr=LR)
    train(ddp, opt, rank, range(2))
    errors_before = {k: v.clone() for k, v in state.errors.items()}
    grads = train(ddp, opt, rank, range(2, 3), poison_step=2)[0]
    nan_everywhere = bool(torch.isnan(grads).all())
    errors_kept = all(torch.equal(errors_before[k], v) for k, v in state.errors.items())
    # Resume: state (pickled without its group) + model + optimizer after step 3 of 6, then 3 more steps. One
    # bucket, so that the layout DDP builds at its first step after the restart is the uninterrupted run's.
    full, _ = hooked("sign", ONE_BUCKET_MB)
    full_opt = torch.optim.SGD(full.parameters(), lr=LR, momentum=0.9)
    trajectory = train(full, full_opt, rank, range(6))
    first, first_state = hooked("sign", ONE_BUCKET_MB)
    first_opt = torch.optim.SGD(first.parameters(), lr=LR, momentum=0.9)
    train(first, first_opt, rank, range(3))
    first_state.process_group = dist.group.WORLD
    pickled = pickle.loads(pickle.dumps(first_state))
    saved = (copy.deepcopy(first.module.state_dict()), copy.deepcopy(first_opt.state_dict()), first_state.state_dict())
    again = DDP(make_model(), bucket_cap_mb=ONE_BUCKET_MB)
    again.module.load_state_dict(saved[0])
    again_opt = torch.optim.SGD(again.parameters(), lr=LR, momentum=0.9)
    again_opt.load_state_dict(saved[1])
    restored = CompressedHookState("sign", module=again.module)
    restored.load_state_dict(saved[2])
    again.register_comm_hook(restored, ef_sign_hook)
    resumed = train(again, again_opt, rank, range(3, 6))
    return {
        "nan_everywhere": nan_everywhere,
        "errors_kept": errors_kept,
        "skipped": state.skipped,
        "pickled_group": pickled.process_group,
        "pickled_errors": sorted(pickled.errors) == sorted(first_state.errors),
        "resumed_gap": max((a - b).abs().max().item() for a, b in zip(resumed, trajectory[3:])),
    }


def test_a_nan_on_one_rank_reaches_no_error_buffer_and_the_state_pickles_and_resumes_exactly():
    for r in run_processes(2, nan_and_resume):
        assert r["nan_everywhere"] and r["errors_kept"] and r["skipped"] >= 1
        assert r["pickled_group"] is None and r["pickled_errors"]
        assert r["resumed_gap"] == 0.0


class WithUnused(nn.Module):
    """Linear(10, 8), tanh, Linear(8, 3); ``unused`` (between them) is never used, ``rank0_only`` only on rank 0."""

    def __init__(self, rank: int) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.body = nn.Linear(10, 8)
        self.unused = nn.Parameter(torch.randn(5) + 2)
        self.rank0_only = nn.Parameter(torch.randn(3))
        self.head = nn.Linear(8, 3)
        self.rank = rank

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.head(torch.tanh(self.body(x)))
        return out + self.rank0_only if self.rank == 0 else out


def unused_run(rank: int, gradient_as_bucket_view: bool) -> dict:
    model = WithUnused(rank)
    ddp = DDP(model, find_unused_parameters=True, gradient_as_bucket_view=gradient_as_bucket_view)
    state = CompressedHookState("sign", module=model)
    ddp.register_comm_hook(state, ef_sign_hook)
    opt = torch.optim.SGD(ddp.parameters(), lr=LR, momentum=0.9, weight_decay=1e-2)
    start = model.unused.detach().clone()
    grad_none = []
    for step in range(4):
        opt.zero_grad()
        x, y = batch(rank, step)
        nn.functional.mse_loss(ddp(x), y).backward()
        grad_none.append(model.unused.grad is None)
        opt.step()
    return {
        "unused_kept": torch.equal(model.unused.detach(), start),
        "grad_none": grad_none,
        "errors": sorted(state._names()[key] for key in state.errors),
        "rank0_only_error": state.errors[id(model.rank0_only)].clone(),
        "params": params_of(model),
    }


@pytest.mark.parametrize("gradient_as_bucket_view", [False, True])
def test_a_parameter_no_rank_uses_keeps_no_error_and_one_used_on_some_ranks_counts_as_zero(gradient_as_bucket_view):
    """DDP (``find_unused_parameters=True``) leaves a parameter no rank used alone; the hook must not book an error
    for it either (a zero compressed by the sign compressor reads as +scale, which would be owed to it later)."""
    ranks = run_processes(2, unused_run, gradient_as_bucket_view)
    for r in ranks:
        assert r["unused_kept"] and r["grad_none"] == [True] * 4
        assert "unused" not in r["errors"] and "rank0_only" in r["errors"]
        assert r["rank0_only_error"].abs().max() > 0  # rank 1 compressed its zeros plus its error, as DDP counts them
    assert torch.equal(ranks[0]["params"], ranks[1]["params"])  # one decoded mean: the replicas agree


def scaled_sign(v: torch.Tensor) -> torch.Tensor:
    """The spec's C(v) = (||v||_1 / numel) * sign(v) over one block (a zero counts as +), in plain torch."""
    scale = (v.double().abs().sum() / v.numel()).float()
    return torch.where(v < 0, -scale, scale)


def hook_against_reference(rank: int) -> tuple[float, float]:
    """The hook with one bucket (one 5 MiB block: the whole model) against error-feedback SGD recomputed here from
    every rank's local gradients: p_i = g_i + e_i, e_i <- p_i - C(p_i), step on mean_j C(p_j)."""
    world = dist.get_world_size()
    ddp, _ = hooked("sign", ONE_BUCKET_MB)
    opt = torch.optim.SGD(ddp.parameters(), lr=LR)
    reference = make_model()
    errors = [torch.zeros_like(params_of(reference)) for _ in range(world)]
    twin = make_model()
    gap = 0.0
    for step in range(5):
        grads = []
        for r in range(world):  # every rank's local gradient at the reference's parameters
            twin.load_state_dict(reference.state_dict())
            twin.zero_grad()
            x, y = batch(r, step)
            nn.functional.mse_loss(twin(x), y).backward()
            grads.append(torch.cat([p.grad.reshape(-1) for p in twin.parameters()]))
        total = torch.zeros_like(grads[0])
        for r in range(world):
            compensated = grads[r] + errors[r]
            compressed = scaled_sign(compensated)
            errors[r] = compensated - compressed
            total += compressed
        with torch.no_grad():
            offset = 0
            for p in reference.parameters():
                p -= LR * (total / world)[offset : offset + p.numel()].view_as(p)
                offset += p.numel()
        train(ddp, opt, rank, range(step, step + 1))
        gap = max(gap, (params_of(ddp.module) - params_of(reference)).abs().max().item())
    return gap, (params_of(ddp.module) - params_of(make_model())).abs().max().item()


@pytest.mark.parametrize("world", [3, 4])
def test_the_hook_follows_error_feedback_sgd_at_three_and_four_ranks(world):
    for gap, moved in run_processes(world, hook_against_reference):
        assert moved > 1e-3  # it trained
        assert gap < 1e-6
