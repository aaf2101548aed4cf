"""Parameters without a gradient, and parameters toggled off by ``toggle_optimizer``, in the per-step exchanges
(EF-SGD, LIEC-SGD) and the gossip steps (D-PSGD, DeTAG), with simulated workers.

A parameter that no rank gives a gradient must stay as plain training leaves it: bit for bit, ``grad=None``, no
error-feedback state; the others must train exactly as in a model without it. A parameter that some ranks give a
gradient counts as zero on the others, exactly as an explicit zero gradient would. A parameter set that changes only
because ``toggle_optimizer`` flips ``requires_grad`` keeps its buckets and its error buffers.
"""

from __future__ import annotations

import pytest
import torch
from sim_utils import loss_of
from torch import nn

from lightning_localsgd.algorithms import DPSGD, LIECSGD, DeTAG, ErrorFeedbackSGD
from lightning_localsgd.comm import run_simulated
from lightning_localsgd.compression import ScaledSign

BLOCK_MB = 64 / 2**20  # 16-element blocks: blocks straddle the parameters
LR = 0.05
STEPS = 8

ALGORITHMS = {
    "ef_sign": lambda: ErrorFeedbackSGD(ScaledSign(BLOCK_MB), period=3),
    "ef_sign_warmup": lambda: ErrorFeedbackSGD(ScaledSign(BLOCK_MB), period=3, warmup_steps=2),
    "liec_sgd": lambda: LIECSGD(full_sync_period=3, compressor=ScaledSign(BLOCK_MB)),
    "liec_sgd_vr": lambda: LIECSGD(full_sync_period=3, compressor=ScaledSign(BLOCK_MB), variance_reduction=True),
    "dpsgd": lambda: DPSGD("ring", check_every=3),
    "dpsgd_cta": lambda: DPSGD("ring", check_every=3, gossip_order="combine_then_adapt"),
    "detag": lambda: DeTAG("ring", gossip_rounds=2, check_every=3),
}
# Gossip over a ring of 4 (weights 1/3: mixing identical values is not exact in the naive order); 3 ranks for the
# others (a mean over 3 identical values is not exact either).
WORLD = {"dpsgd": 4, "dpsgd_cta": 4, "detag": 4}
STATE = {"ef_sign": ["error"], "ef_sign_warmup": ["error"], "liec_sgd": ["server_error"]}
STATE["liec_sgd_vr"] = ["server_error", "delta"]
STATE["detag"] = ["tracker", "last_gradient"]
OPTIMIZERS = {
    "sgd": lambda ps: torch.optim.SGD(ps, lr=LR, momentum=0.9, weight_decay=1e-2),
    "adam": lambda ps: torch.optim.Adam(ps, lr=LR, weight_decay=1e-2),
}


class WithUnused(nn.Module):
    """Linear(5, 8), tanh, Linear(8, 1); with ``extra``, a parameter between the two (in the middle of the flat
    layout) that the forward uses only where ``use_extra`` says so. The used weights do not depend on ``extra``."""

    def __init__(self, extra: bool) -> None:
        super().__init__()
        self.body = nn.Linear(5, 8)
        if extra:
            self.mid = nn.Module()
            self.mid.w = nn.Parameter(torch.empty(6))
        self.head = nn.Linear(8, 1)
        g = torch.Generator().manual_seed(0)
        with torch.no_grad():
            for p in [*self.body.parameters(), *self.head.parameters()]:
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)
            if extra:
                self.mid.w.copy_(torch.randn(6, generator=torch.Generator().manual_seed(1)) + 2)
        self.use_extra = 0.0  # 0: the extra parameter gets no gradient; else its weight in the loss

    def used(self) -> torch.Tensor:
        return torch.cat([p.detach().reshape(-1) for p in [*self.body.parameters(), *self.head.parameters()]])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.head(torch.tanh(self.body(x)))
        if self.use_extra:
            out = out + self.use_extra * self.mid.w.sum()
        return out


def train(name, optimizer, extra, world=None, extra_on=None):
    """Per rank: the used parameters after every step, the extra parameter after every step, whether its ``.grad``
    was None after every exchange, the extra parameter's slices of the algorithm's state at the end, and the number
    of collectives. ``extra_on(rank, step)``: the weight of the extra parameter in that rank's loss (a float; 0.0 no
    gradient; ``"zero"`` an explicit zero gradient)."""
    world = world or WORLD.get(name, 3)

    def worker(rank, comm):
        model = WithUnused(extra)
        opt = OPTIMIZERS[optimizer](model.parameters())
        algorithm = ALGORITHMS[name]()
        algorithm.setup(model, comm, [opt])
        used, extras, none = [], [], []
        for step in range(STEPS):
            weight = extra_on(rank, step) if extra_on else 0.0
            model.use_extra = 0.0 if weight == "zero" else weight
            opt.zero_grad()
            loss = loss_of(model, rank, step)
            if weight == "zero":
                loss = loss + 0.0 * model.mid.w.sum()  # an explicit gradient of zeros
            loss.backward()
            algorithm.before_optimizer_step(opt)
            if extra:
                none.append(model.mid.w.grad is None)
            opt.step()
            algorithm.after_optimizer_step(opt)
            algorithm.end_step()
            used.append(model.used().clone())
            if extra:
                extras.append(model.mid.w.detach().clone())
        state = {}
        if extra:
            index = algorithm.flat.index_of[id(model.mid.w)]
            state = {key: algorithm.state_views(key)[index].clone() for key in STATE.get(name, [])}
        return used, extras, none, state, comm.stats.collectives

    return run_simulated(world, worker)


@pytest.mark.parametrize("optimizer", sorted(OPTIMIZERS))
@pytest.mark.parametrize("name", sorted(ALGORITHMS))
def test_a_parameter_no_rank_uses_stays_untouched_and_the_others_train_as_without_it(name, optimizer):
    with_extra = train(name, optimizer, extra=True)
    without = train(name, optimizer, extra=False)
    start = WithUnused(True).mid.w.detach()
    for (used, extras, none, state, _), (reference, *_) in zip(with_extra, without):
        for got, want in zip(used, reference):
            assert torch.equal(got, want)  # bit for bit: the same blocks, the same error, the same steps
        assert all(torch.equal(e, start) for e in extras)
        assert all(none)  # the optimizer skipped it at every step: no weight decay, no momentum, no Adam state
        for key, value in state.items():
            assert torch.equal(value, torch.zeros_like(value)), key  # no error-feedback state polluted
    assert any((used[-1] - used[0]).abs().max() > 1e-3 for used, *_ in with_extra)  # the rest did train


@pytest.mark.parametrize("name", ["ef_sign", "liec_sgd", "liec_sgd_vr", "detag"])
def test_a_gradient_missing_on_some_ranks_counts_as_zero_there(name):
    """Rank 0 uses the parameter at every other step; the other ranks never do. The run equals the one in which the
    other ranks hold explicit zero gradients for it at those steps, and every rank steps on it then; at the steps
    between, no rank has a gradient and it is left alone everywhere."""

    def missing(rank, step):
        return 0.5 if rank == 0 and step % 2 == 0 else 0.0

    def explicit(rank, step):
        if step % 2:
            return 0.0
        return 0.5 if rank == 0 else "zero"

    got = train(name, "sgd", extra=True, extra_on=missing)
    want = train(name, "sgd", extra=True, extra_on=explicit)
    for (used, extras, none, state, _), (used_ref, extras_ref, *_rest, state_ref, _) in zip(got, want):
        assert all(torch.equal(a, b) for a, b in zip(used, used_ref))
        assert all(torch.equal(a, b) for a, b in zip(extras, extras_ref))
        assert all(torch.equal(state[k], state_ref[k]) for k in state)
        if name != "detag":  # an all-reduce: every rank knows; gossip knows what reached it
            assert none == [step % 2 == 1 for step in range(STEPS)]
    if name.startswith("ef_sign"):  # EF-SGD: replicas agree at every step, the extra parameter included
        assert all(torch.equal(a, b) for a, b in zip(got[0][1], got[1][1]))
    assert (got[1][1][-1] - WithUnused(True).mid.w.detach()).abs().max() > 1e-3  # it trained on every rank


def test_dpsgd_steps_each_rank_on_its_own_gradient_and_skips_a_missing_one():
    got = train("dpsgd", "sgd", extra=True, extra_on=lambda rank, step: 0.5 if rank == 0 else 0.0)
    assert not any(got[0][2]) and all(got[2][2])  # rank 0 always had one, rank 2 (not its neighbour) never


@pytest.mark.parametrize("name", ["ef_sign", "liec_sgd"])
def test_the_flag_collective_carries_the_need_for_per_parameter_flags(name):
    """Every gradient present on every rank: no collective beyond the usual; one missing: one more per exchange."""
    all_used = train(name, "sgd", extra=True, extra_on=lambda rank, step: 0.5)
    reference = train(name, "sgd", extra=False)
    one_missing = train(name, "sgd", extra=True, extra_on=lambda rank, step: 0.5 if rank else 0.0)
    assert all_used[0][4] == reference[0][4]
    assert one_missing[0][4] == reference[0][4] + STEPS


def test_liec_averages_a_parameter_stepped_since_the_last_full_round_that_lacks_a_gradient_at_it():
    """LIEC-SGD's replicas drift apart between full rounds; the full round after step 2 (steps 0 to 2, period 3)
    finds the parameter without a gradient anywhere and still brings its replicas together."""
    got = train("liec_sgd", "sgd", extra=True, extra_on=lambda rank, step: 0.5 if step == 0 else 0.0)
    extras = [r[1] for r in got]
    assert (extras[0][1] - extras[1][1]).abs().max() > 0  # apart after step 0's update (local immediate errors)
    assert all(torch.equal(extras[0][2], other[2]) for other in extras)  # together after the full round
    torch.testing.assert_close(extras[0][2], torch.stack([e[1] for e in extras]).mean(0))  # their mean
    assert all(r[2][1:] == [True] * (STEPS - 1) for r in got)  # never a gradient after step 0


# ---------------------------------------------------------------------------------------------- toggle_optimizer
class TwoPart(nn.Module):
    """A generator-like part and a discriminator-like part, each with its own optimizer."""

    def __init__(self) -> None:
        super().__init__()
        self.gen = nn.Linear(5, 5)
        self.disc = nn.Linear(5, 1)
        g = torch.Generator().manual_seed(0)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)


def toggle(optimizers, optimizer):
    """What ``LightningModule.toggle_optimizer`` does: every optimizer's parameters off, then ``optimizer``'s back
    as they were. Returns the states to restore (``untoggle_optimizer``)."""
    state = {}
    for opt in optimizers:
        for group in opt.param_groups:
            for p in group["params"]:
                if p not in state:
                    state[p] = p.requires_grad
                    p.requires_grad = False
    for group in optimizer.param_groups:
        for p in group["params"]:
            p.requires_grad = state[p]
    return state


def untoggle(state):
    for p, flag in state.items():
        p.requires_grad = flag


def two_part_loss(model: TwoPart, rank: int, step: int, generator_step: bool) -> torch.Tensor:
    x = torch.randn(8, 5, generator=torch.Generator().manual_seed(100 * rank + step)) + rank
    fake = torch.tanh(model.gen(x))
    if generator_step:
        return -model.disc(fake).mean()
    return (model.disc(fake.detach()) - x[:, :1].sin()).pow(2).mean()


def train_two_part(name, toggled, world=2):
    def worker(rank, comm):
        model = TwoPart()
        opt_g = torch.optim.SGD(model.gen.parameters(), lr=LR, momentum=0.9)
        opt_d = torch.optim.SGD(model.disc.parameters(), lr=LR, momentum=0.9)
        algorithm = ALGORITHMS[name]()
        algorithm.setup(model, comm, [opt_g, opt_d])
        flat = algorithm.flat
        same_layout = []
        for step in range(STEPS):
            for opt in (opt_g, opt_d):
                state = toggle([opt_g, opt_d], opt) if toggled else None
                opt.zero_grad()
                two_part_loss(model, rank, step, generator_step=opt is opt_g).backward()
                algorithm.before_optimizer_step(opt)
                opt.step()
                algorithm.after_optimizer_step(opt)
                if state is not None:
                    untoggle(state)
            algorithm.end_step()
            same_layout.append(algorithm.flat is flat)
        errors = [torch.cat([v.reshape(-1) for v in algorithm.state_views(k)]) for k in STATE[name]]
        params = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
        return params, errors, same_layout

    return run_simulated(world, worker)


@pytest.mark.parametrize("name", ["ef_sign", "ef_sign_warmup", "liec_sgd"])
def test_toggling_requires_grad_between_steps_keeps_the_error_buffers_and_the_buckets(name):
    toggled = train_two_part(name, toggled=True)
    plain = train_two_part(name, toggled=False)  # both parts trainable all along: the reference
    for (params, errors, same_layout), (params_ref, errors_ref, _) in zip(toggled, plain):
        assert all(same_layout)  # no re-bucketing, not even for one exchange
        assert torch.equal(params, params_ref)
        for error, error_ref in zip(errors, errors_ref):
            assert error.abs().max() > 0  # the errors of both parts are carried over
            assert torch.equal(error, error_ref)


def test_a_layer_really_frozen_while_its_optimizer_holds_it_leaves_at_the_next_round():
    """Toggling aside, freezing still re-buckets: at the next round (EF-SGD, period 3), not at the exchange."""

    def worker(rank, comm):
        model = WithUnused(False)
        opt = torch.optim.SGD(model.parameters(), lr=LR)
        algorithm = ALGORITHMS["ef_sign"]()
        algorithm.setup(model, comm, [opt])
        sizes = []
        for step in range(5):
            if step == 1:
                model.body.requires_grad_(False)
            opt.zero_grad()
            loss_of(model, rank, step).backward()
            algorithm.before_optimizer_step(opt)
            opt.step()
            algorithm.after_optimizer_step(opt)
            algorithm.end_step()
            sizes.append(len(algorithm.flat.params))
        return sizes

    # Frozen before step 1: its exchange keeps the layer (no gradient anywhere: left alone); the round after step 2
    # (period 3) lets it go.
    assert run_simulated(2, worker) == [[4, 4, 2, 2, 2]] * 2


def scaled_sign(v: torch.Tensor, block: int = 16) -> torch.Tensor:
    """The spec's C(v) = (||b||_1 / numel(b)) * sign(b) per block b, in plain torch (a zero gets +scale)."""
    out = torch.empty_like(v)
    for start in range(0, v.numel(), block):
        part = v[start : start + block]
        scale = (part.double().abs().sum() / part.numel()).float()
        out[start : start + block] = torch.where(part < 0, -scale, scale)
    return out


def reference_two_part(name: str, world: int = 2):
    """EF-SGD (period 3) or LIEC-SGD (p = 3) on the two-part model from ALGORITHMS.md, in plain torch: the ranks in
    lockstep, one error per optimizer's parameters, blocks of 16 from the start of each optimizer's vector. Returns
    each rank's parameters and error(s) in the module's order, as ``train_two_part`` does."""
    models = [TwoPart() for _ in range(world)]
    opts = [
        (
            torch.optim.SGD(m.gen.parameters(), lr=LR, momentum=0.9),
            torch.optim.SGD(m.disc.parameters(), lr=LR, momentum=0.9),
        )
        for m in models
    ]
    parts = [lambda m: list(m.gen.parameters()), lambda m: list(m.disc.parameters())]
    sizes = [sum(p.numel() for p in part(models[0])) for part in parts]
    # EF: e_i per rank and part; LIEC: one server error per part (every rank's the same), local errors not kept.
    errors = [[torch.zeros(n) for n in sizes] for _ in range(world)]
    server = [torch.zeros(n) for n in sizes]
    for step in range(STEPS):
        full = name == "liec_sgd" and (step + 1) % 3 == 0
        for which, part in enumerate(parts):
            grads = []
            for rank, model in enumerate(models):
                opts[rank][which].zero_grad()
                two_part_loss(model, rank, step, generator_step=which == 0).backward()
                grads.append(torch.cat([p.grad.reshape(-1) for p in part(model)]))
            if name == "ef_sign":
                sent = []
                for rank in range(world):
                    compensated = grads[rank] + errors[rank][which]
                    sent.append(scaled_sign(compensated))
                    errors[rank][which] = compensated - sent[rank]
                directions = [sum(sent) / world] * world
            elif full:  # x_i <- mean_j x_j; the step is on mean_j g_j + e; e <- 0
                with torch.no_grad():
                    for tensors in zip(*(part(m) for m in models)):
                        mean = sum(t.detach().clone() for t in tensors) / world
                        for t in tensors:
                            t.copy_(mean)
                directions = [sum(grads) / world + server[which]] * world
                server[which] = torch.zeros(sizes[which])
            else:  # u = mean_j C(g_j) + e; c_hat = C(u); e <- u - c_hat; dir_i = c_hat + g_i - C(g_i)
                compressed = [scaled_sign(g) for g in grads]
                u = sum(compressed) / world + server[which]
                c_hat = scaled_sign(u)
                server[which] = u - c_hat
                directions = [c_hat + (g - c) for g, c in zip(grads, compressed)]
            for rank, model in enumerate(models):
                offset = 0
                for p in part(model):
                    p.grad = directions[rank][offset : offset + p.numel()].view_as(p).clone()
                    offset += p.numel()
                opts[rank][which].step()
    results = []
    for rank, model in enumerate(models):
        params = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
        results.append((params, torch.cat(errors[rank]) if name == "ef_sign" else torch.cat(server)))
    return results


@pytest.mark.parametrize("name", ["ef_sign", "liec_sgd"])
def test_toggling_keeps_the_error_buffers_the_spec_gives_them(name):
    """The toggled run's errors and parameters against the update rules in plain torch (the toggling does not
    change the mathematics: each optimizer's exchange sees the same gradients either way). An exchange that reset
    the other part's error at each toggle would leave it at its value of one step instead of its running sum."""
    got = train_two_part(name, toggled=True)
    want = reference_two_part(name)
    for (params, errors, same_layout), (params_ref, error_ref) in zip(got, want):
        assert all(same_layout)
        torch.testing.assert_close(errors[0], error_ref, rtol=0, atol=1e-6)
        torch.testing.assert_close(params, params_ref, rtol=0, atol=1e-6)
        assert error_ref[:30].abs().max() > 0 and error_ref[30:].abs().max() > 0  # both parts carry an error
