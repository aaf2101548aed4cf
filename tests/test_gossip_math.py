"""D-PSGD and DeTAG against their update rules, with simulated workers (several buckets, two dtypes)."""

from __future__ import annotations

import math

import pytest
import torch
from sim_utils import (
    DTYPES,
    SMALL_BUCKET_MB,
    flat_params,
    loss_of,
    make_layered_model,
    mean_gradient_step,
    train_workers,
)
from torch import nn

from lightning_localsgd.algorithms import DPSGD, DeTAG
from lightning_localsgd.algorithms.detag import gossip_contraction
from lightning_localsgd.comm import run_simulated
from lightning_localsgd.comm.topology import exponential, fully_connected, make_topology, ring, torus
from lightning_localsgd.errors import NonFiniteError, OutOfStepError, PeerFailureError

LR = 0.05


# ---------------------------------------------------------------------------------------------- topologies
@pytest.mark.parametrize("n", [1, 2, 3, 4, 5, 8, 16])
@pytest.mark.parametrize("name", ["ring", "torus", "exponential", "fully_connected"])
def test_every_topology_is_symmetric_doubly_stochastic_and_its_neighbours_are_mutual(name, n):
    topology = make_topology(name, n)
    w = topology.weights
    assert torch.allclose(w, w.T, atol=0) and torch.allclose(w.sum(1), torch.ones(n, dtype=w.dtype))
    for i in range(n):
        peers = topology.neighbours(i)
        assert i not in peers and list(peers) == sorted(peers)
        assert topology.self_weight(i) + sum(peers.values()) == pytest.approx(1.0)
        for j in peers:
            assert i in topology.neighbours(j)
    # The exchange schedule: in each phase the rank a rank receives from sends to it, and every neighbour is met once.
    for i in range(n):
        for k, (send_to, receive_from) in enumerate(topology.phases(i)):
            assert topology.phases(send_to)[k][1] == i and topology.phases(receive_from)[k][0] == i
        assert sorted(source for _, source in topology.phases(i)) == sorted(topology.neighbours(i))
    expected = sorted(torch.linalg.eigvalsh(w).abs().tolist(), reverse=True)
    assert topology.lambda2 == pytest.approx(expected[1] if n > 1 else 0.0, abs=1e-12)


def test_ring_weights_and_lambda2_match_the_closed_form():
    for n in (4, 8, 16):
        topology = ring(n)
        assert topology.neighbours(0) == {1: pytest.approx(1 / 3), n - 1: pytest.approx(1 / 3)}
        assert topology.lambda2 == pytest.approx((1 + 2 * math.cos(2 * math.pi / n)) / 3, abs=1e-12)
    assert ring(2).neighbours(0) == {1: pytest.approx(2 / 3)}  # both ring neighbours are the one other rank


def test_torus_exponential_and_fully_connected_have_the_stated_neighbours():
    assert torus(8).name == "torus 2x4" and sorted(torus(16).neighbours(5)) == [1, 4, 6, 9]
    assert sorted(exponential(8).neighbours(0)) == [1, 2, 4, 6, 7]  # +-1, +-2, +-4
    assert exponential(16).lambda2 < ring(16).lambda2  # log-degree graphs mix faster than a ring
    assert fully_connected(4).lambda2 == pytest.approx(0.0, abs=1e-12)


def test_bad_topologies_are_refused():
    with pytest.raises(ValueError, match="`topology` must be one of"):
        make_topology("star", 4)
    with pytest.raises(ValueError, match="`rows` dividing 6"):
        torus(6, rows=4)
    with pytest.raises(ValueError, match="at least 1 rank"):
        ring(0)


# ---------------------------------------------------------------------------------------------- helpers
def circulant(n: int, offsets: set[int]) -> torch.Tensor:
    """W with rank i mixing itself and ranks i + d mod n (d in offsets) in equal shares (ALGORITHMS.md section 7)."""
    peers = {d % n for d in offsets} - {0}
    w = torch.zeros(n, n, dtype=torch.float64)
    for i in range(n):
        for j in {i} | {(i + d) % n for d in peers}:
            w[i, j] = 1 / (len(peers) + 1)
    return w


def torus_matrix(rows: int, cols: int) -> torch.Tensor:
    """The rows x cols torus: 1/5 to itself and to each of the 4 grid moves (two moves landing on one rank add up)."""
    n = rows * cols
    w = torch.zeros(n, n, dtype=torch.float64)
    for i in range(n):
        r, c = divmod(i, cols)
        for dr, dc in ((0, 0), (1, 0), (-1, 0), (0, 1), (0, -1)):
            w[i, ((r + dr) % rows) * cols + (c + dc) % cols] += 1 / 5
    return w


# The gossip matrices of the topologies under test, written here rather than taken from the package.
EXPECTED_W = {
    ("ring", 4): circulant(4, {1, -1}),  # 1/3 to itself and each neighbour
    ("torus", 8): torus_matrix(2, 4),  # 2 x 4: the two row moves both land on the other row (2/5)
    ("exponential", 8): circulant(8, {1, -1, 2, -2, 4, -4}),  # 5 peers at +-1, +-2, 4: 1/6 each
}


def spread_model(rank: int, dtype: torch.dtype) -> nn.Module:
    """The layered model, with a different replica on every rank (as after some local steps)."""
    model = make_layered_model(dtype)
    g = torch.Generator().manual_seed(rank + 17)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g).to(dtype))
    return model


def gossip_run(make_algorithm, world, steps, dtype=torch.float64, lr=LR, momentum=0.0, spread=True, record=None):
    """Each worker's parameters before and after every step, its gradients, and the algorithm (per rank)."""

    def worker(rank, comm):
        model = make_layered_model(dtype)
        algorithm = make_algorithm()
        opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum)
        algorithm.setup(model, comm, [opt])
        if spread:  # after set-up, which copies rank 0's model everywhere
            with torch.no_grad():
                for p, q in zip(model.parameters(), spread_model(rank, dtype).parameters()):
                    p.copy_(q)
        history = []
        for step in range(steps):
            before = flat_params(model).clone()
            opt.zero_grad()
            loss_of(model, rank, step).backward()
            grad = torch.cat([p.grad.reshape(-1) for p in model.parameters()]).clone()
            algorithm.before_optimizer_step(opt)
            opt.step()
            algorithm.after_optimizer_step(opt)
            algorithm.end_step()
            entry = {"before": before, "grad": grad, "after": flat_params(model).clone()}
            if record is not None:
                entry.update(record(algorithm))
            history.append(entry)
        return history, algorithm.comm.stats.state_dict()

    return run_simulated(world, worker)


def stacked(runs, key, step):
    return torch.stack([history[step][key] for history, _ in runs])


# ---------------------------------------------------------------------------------------------- D-PSGD
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("name", "world"), [("ring", 4), ("torus", 8), ("exponential", 8)])
def test_a_gossip_step_is_multiplication_by_w(name, world, dtype):
    # lr 0: the step is the mix alone, x <- W x, over every bucket of the several-bucket layout.
    make = lambda: DPSGD(name, bucket_cap_mb=SMALL_BUCKET_MB)  # noqa: E731
    runs = gossip_run(make, world, 2, dtype=dtype, lr=0.0)
    w = EXPECTED_W[name, world]
    for step in range(2):
        expected = (w @ stacked(runs, "before", step).double()).to(dtype)
        tolerance = 1e-12 if dtype == torch.float64 else 1e-6
        torch.testing.assert_close(stacked(runs, "after", step), expected, atol=tolerance, rtol=0)
    assert (stacked(runs, "after", 1) - stacked(runs, "after", 1).mean(0)).abs().max() > 1e-3  # still apart


def test_combine_then_adapt_follows_the_papers_rule_exactly():
    runs = gossip_run(lambda: DPSGD("ring", gossip_order="combine_then_adapt"), 4, 3)
    w = EXPECTED_W["ring", 4]
    for step in range(3):
        expected = w @ stacked(runs, "before", step) - LR * stacked(runs, "grad", step)
        torch.testing.assert_close(stacked(runs, "after", step), expected, atol=1e-12, rtol=0)


def test_adapt_then_combine_mixes_the_stepped_replicas():
    runs = gossip_run(lambda: DPSGD("ring"), 4, 3)
    w = EXPECTED_W["ring", 4]
    for step in range(3):
        expected = w @ (stacked(runs, "before", step) - LR * stacked(runs, "grad", step))
        torch.testing.assert_close(stacked(runs, "after", step), expected, atol=1e-12, rtol=0)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("algorithm", ["dpsgd", "detag"])
def test_with_a_fully_connected_topology_gossip_is_synchronous_sgd(algorithm, dtype):
    world, steps = 4, 5
    make = {
        "dpsgd": lambda: DPSGD("fully_connected", bucket_cap_mb=SMALL_BUCKET_MB),
        "detag": lambda: DeTAG("fully_connected", bucket_cap_mb=SMALL_BUCKET_MB),
    }[algorithm]
    runs = gossip_run(make, world, steps, dtype=dtype, momentum=0.9, spread=False)
    reference = make_layered_model(dtype)
    opt = torch.optim.SGD(reference.parameters(), lr=LR, momentum=0.9)
    tolerance = 1e-12 if dtype == torch.float64 else 2e-6
    for step in range(steps):
        mean_gradient_step(reference, opt, world, step)
        for history, _ in runs:
            torch.testing.assert_close(history[step]["after"], flat_params(reference), atol=tolerance, rtol=0)


def test_bytes_per_step_per_rank_do_not_grow_with_the_number_of_ranks_on_a_ring():
    per_step = {}
    for world in (4, 8):
        runs = gossip_run(lambda: DPSGD("ring"), world, 3, dtype=torch.float32)
        stats = runs[0][1]
        per_step[world] = stats["exchange_bytes_sent"] / stats["exchanges"]
    numel = sum(p.numel() for p in make_layered_model().parameters())
    assert per_step[4] == per_step[8] == 2 * (numel + 3) * 4  # two neighbours, float32 with a 3-float header


# ---------------------------------------------------------------------------------------------- DeTAG
def spec_eta(lambda2: float) -> float:
    """ALGORITHMS.md section 7: eta = (1 - sqrt(1 - lambda2^2)) / (1 + sqrt(1 - lambda2^2))."""
    root = math.sqrt(1 - lambda2**2)
    return (1 - root) / (1 + root)


def ring_lambda2(n: int) -> float:
    """The ring's eigenvalues are 1/3 + 2/3 cos(2 pi k / n); lambda2 the largest magnitude for k != 0."""
    return max(abs(1 / 3 + 2 / 3 * math.cos(2 * math.pi * k / n)) for k in range(1, n))


def ring_polynomial(n: int, k: int, rounds: int, eta: float) -> float:
    """p_R of the ring's k-th eigenvalue 1/3 + 2/3 cos(2 pi k / n): what R accelerated rounds do along that mode."""
    eigenvalue = 1 / 3 + 2 / 3 * math.cos(2 * math.pi * k / n)
    previous, current = 1.0, 1.0
    for _ in range(rounds):
        previous, current = current, (1 + eta) * eigenvalue * current - eta * previous
    return current


def accelerated_reference(w: torch.Tensor, z: torch.Tensor, rounds: int, eta: float) -> torch.Tensor:
    previous, current = z, z
    for _ in range(rounds):
        previous, current = current, (1 + eta) * (w @ current) - eta * previous
    return current


def test_detag_follows_its_update_rule_and_the_tracker_keeps_the_mean_gradient():
    world, rounds, steps = 4, 2, 4
    w = EXPECTED_W["ring", world]
    eta = spec_eta(ring_lambda2(world))  # 0.02944
    record = lambda algorithm: {"tracker": torch.cat([t.reshape(-1) for t in algorithm.tracker]).clone()}  # noqa: E731
    runs = gossip_run(lambda: DeTAG("ring", gossip_rounds=rounds), world, steps, record=record)
    assert runs[0][1]["exchanges"] == steps
    y = torch.zeros_like(stacked(runs, "grad", 0))
    last = torch.zeros_like(y)
    for step in range(steps):
        grads = stacked(runs, "grad", step)
        y = y + grads - last
        last = grads
        x_mixed = accelerated_reference(w, stacked(runs, "before", step), rounds, eta)
        y = accelerated_reference(w, y, rounds, eta)
        torch.testing.assert_close(stacked(runs, "tracker", step), y, atol=1e-12, rtol=0)
        torch.testing.assert_close(stacked(runs, "after", step), x_mixed - LR * y, atol=1e-12, rtol=0)
        # gradient tracking: the mean of the trackers is the mean of the newest gradients
        torch.testing.assert_close(stacked(runs, "tracker", step).mean(0), grads.mean(0), atol=1e-12, rtol=0)


def test_accelerated_gossip_contracts_disagreement_on_a_ring_as_the_theory_says():
    # The worst disagreement mode of a 16-rank ring, mixed by R = 3 accelerated rounds (gradients off: lr 0).
    world, rounds = 16, 3
    eta = spec_eta(ring_lambda2(world))
    # The ring's eigenvectors are Fourier modes: cos(2 pi k i / n) has eigenvalue 1/3 + 2/3 cos(2 pi k / n). Along
    # one, R accelerated rounds multiply by p_R(l): p_-1 = p_0 = 1, p_{r+1} = (1 + eta) l p_r - eta p_{r-1} (the
    # recursion of the spec's z(r+1) = (1 + eta) W z(r) - eta z(r-1)).
    factors = {k: abs(ring_polynomial(world, k, rounds, eta)) for k in range(1, world)}
    worst = max(factors, key=factors.get)
    mode = torch.tensor([math.cos(2 * math.pi * worst * i / world) for i in range(world)], dtype=torch.float64)

    def worker(rank, comm):
        model = nn.Linear(1, 1, bias=False).double()
        algorithm = DeTAG("ring", gossip_rounds=rounds)
        opt = torch.optim.SGD(model.parameters(), lr=0.0)
        algorithm.setup(model, comm, [opt])
        with torch.no_grad():
            model.weight.fill_(float(mode[rank]))
        opt.zero_grad()
        model.weight.grad = torch.zeros_like(model.weight)
        algorithm.before_optimizer_step(opt)
        opt.step()
        algorithm.end_step()
        return float(model.weight.detach())

    after = torch.tensor(run_simulated(world, worker), dtype=torch.float64)
    measured = float(after.norm() / mode.norm())
    assert measured == pytest.approx(factors[worst], rel=1e-9)
    assert gossip_contraction(ring(world), rounds, eta) == pytest.approx(factors[worst], rel=1e-9)  # its estimate
    assert measured < ring_lambda2(world) ** rounds  # faster than 3 plain gossip rounds (0.69 against 0.86)


def test_one_accelerated_round_on_a_16_rank_ring_would_expand_and_is_corrected_to_plain_gossip():
    eta = spec_eta(ring_lambda2(16))
    # k = 8: eigenvalue 1/3 + 2/3 cos(pi) = -1/3, and one round gives (1 + eta)(-1/3) - eta = -1.029 (the spec's)
    assert max(abs(ring_polynomial(16, k, 1, eta)) for k in range(1, 16)) == pytest.approx(1.029, abs=5e-4)
    assert max(abs(ring_polynomial(16, k, 2, eta)) for k in range(1, 16)) < 1

    def worker(rank, comm):
        algorithm = DeTAG("ring", gossip_rounds=1)
        algorithm.setup(nn.Linear(2, 1), comm)
        return algorithm.eta

    with pytest.warns(UserWarning, match="using plain gossip instead"):
        assert run_simulated(16, worker) == [0.0] * 16

    def explicit(rank, comm):
        DeTAG("ring", gossip_rounds=1, acceleration=eta).setup(nn.Linear(2, 1), comm)

    with pytest.raises(ValueError, match="not contractive"):
        run_simulated(16, explicit)


def least_squares_gap(make_algorithm, world=4, steps=300, lr=0.1):
    """Label-sorted least squares with exact local gradients: each rank's own optimum differs. Returns the
    distance of the mean model from the global optimum after ``steps``, and the replicas' spread around it."""
    g = torch.Generator().manual_seed(3)
    features = [torch.randn(32, 4, generator=g, dtype=torch.float64) for _ in range(world)]
    truth = torch.tensor([1.0, -2.0, 0.5, 3.0], dtype=torch.float64)
    targets = [f @ truth + 2 * r * f[:, r % 4] + (r - 1.5) for r, f in enumerate(features)]
    optimum = torch.linalg.lstsq(torch.cat(features), torch.cat(targets).unsqueeze(1)).solution.reshape(-1)

    def worker(rank, comm):
        model = nn.Linear(4, 1, bias=False).double()
        algorithm = make_algorithm()
        opt = torch.optim.SGD(model.parameters(), lr=lr)
        algorithm.setup(model, comm, [opt])
        for _ in range(steps):
            opt.zero_grad()
            (model(features[rank]).squeeze(1) - targets[rank]).pow(2).mean().backward()
            algorithm.before_optimizer_step(opt)
            opt.step()
            algorithm.after_optimizer_step(opt)
            algorithm.end_step()
        return model.weight.detach().reshape(-1)

    weights = torch.stack(run_simulated(world, worker))
    return float((weights.mean(0) - optimum).norm()), float((weights - weights.mean(0)).norm())


def test_on_label_sorted_data_detag_reaches_the_optimum_where_dpsgd_stalls_at_a_bias():
    detag_gap, detag_spread = least_squares_gap(lambda: DeTAG("ring", check_every=1000))
    dpsgd_gap, _ = least_squares_gap(lambda: DPSGD("ring", check_every=1000))
    assert detag_gap < 1e-10 and detag_spread < 1e-10  # 300 steps: to machine precision
    assert dpsgd_gap > 1e-2  # 0.05: the bias of label-sorted data


# ---------------------------------------------------------------------------------------------- state and faults
@pytest.mark.parametrize("algorithm", ["dpsgd", "detag"])
def test_resuming_from_a_saved_state_matches_the_uninterrupted_run(algorithm):
    make = {"dpsgd": lambda: DPSGD("ring"), "detag": lambda: DeTAG("ring", gossip_rounds=2)}[algorithm]
    straight = train_workers(make, 4, 6)
    resumed = train_workers(make, 4, 6, cut=3)
    for (a, _), (b, _) in zip(straight, resumed):
        assert all(torch.equal(x["params"], y["params"]) for x, y in zip(a, b, strict=True))
    assert (straight[0][0][-1]["params"] - straight[1][0][-1]["params"]).abs().max() > 1e-4


def test_a_nan_on_one_rank_stops_it_and_its_neighbours_and_nothing_is_mixed_into_any_model():
    world, poisoned_rank, poisoned_step = 4, 1, 2

    def worker(rank, comm):
        model = make_layered_model(torch.float64)
        opt = torch.optim.SGD(model.parameters(), lr=LR)
        algorithm = DeTAG("ring")
        algorithm.setup(model, comm, [opt])
        try:
            for step in range(5):
                opt.zero_grad()
                loss_of(model, rank, step).backward()
                if (rank, step) == (poisoned_rank, poisoned_step):
                    with torch.no_grad():
                        next(model.parameters()).view(-1)[0] = float("nan")
                algorithm.before_optimizer_step(opt)
                opt.step()
                algorithm.end_step()
        except (NonFiniteError, OutOfStepError, PeerFailureError) as error:
            return type(error).__name__, str(error), flat_params(model), algorithm.tracker
        return "finished", "", flat_params(model), algorithm.tracker

    outcomes = run_simulated(world, worker, timeout=3.0)
    assert outcomes[1][0] == "NonFiniteError" and "rank 1 held inf/NaN parameters" in outcomes[1][1]
    for neighbour in (0, 2):
        assert outcomes[neighbour][0] == "NonFiniteError"
        assert "neighbour rank 1 sent inf/NaN" in outcomes[neighbour][1]
    assert outcomes[3][0] == "PeerFailureError"  # not a neighbour of rank 1: its neighbours stopped
    for rank in (0, 2, 3):
        params, tracker = outcomes[rank][2], outcomes[rank][3]
        assert torch.isfinite(params).all() and all(torch.isfinite(t).all() for t in tracker)


def test_a_neighbour_at_another_step_is_an_out_of_step_error_before_anything_is_mixed():
    def worker(rank, comm):
        model = make_layered_model(torch.float64)
        opt = torch.optim.SGD(model.parameters(), lr=LR)
        algorithm = DPSGD("ring")
        algorithm.setup(model, comm, [opt])
        if rank == 1:
            algorithm.end_step()  # rank 1 counts a step the others never took
        opt.zero_grad()
        loss_of(model, rank, 0).backward()
        opt.step()
        stepped = flat_params(model)
        try:
            algorithm.after_optimizer_step(opt)
        except OutOfStepError as error:
            return str(error), torch.equal(flat_params(model), stepped)
        return "", False

    (message0, unmixed0), (message1, unmixed1) = run_simulated(2, worker)
    assert "rank 0 is at step 0, gossip round 0 and its neighbour rank 1 at step 1" in message0
    assert "Nothing was mixed" in message1 and unmixed0 and unmixed1


def test_gossip_refuses_bad_arguments_up_front():
    with pytest.raises(ValueError, match="skip_round"):
        DPSGD().set_nonfinite_policy("skip_round")
    with pytest.raises(ValueError, match="`gossip_rounds` must be at most 64"):
        DeTAG(gossip_rounds=65)
    with pytest.raises(ValueError, match="gossip_rounds"):
        DeTAG(gossip_rounds=0)
    with pytest.raises(ValueError, match="`acceleration` must be 'auto' or a number in"):
        DeTAG(acceleration=1.5)
    with pytest.raises(ValueError, match="`topology` must be one of"):
        DPSGD("star")
    with pytest.raises(ValueError, match="check_every"):
        DPSGD(check_every=0)
    with pytest.raises(ValueError, match="gossip_order"):
        DPSGD(gossip_order="sideways")
