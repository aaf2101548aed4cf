"""Each phase of a synchronisation shows in a profiler trace under its ``lightning_localsgd/...`` label."""

from __future__ import annotations

import torch
from dist_utils import run_processes
from sim_utils import loss_of, make_layered_model
from torch.profiler import ProfilerActivity, profile

from lightning_localsgd import DPSGD, LIECSGD, CoCoDSGD, LocalSGDOptimizer
from lightning_localsgd.algorithms.profiling import PREFIX


def _labels_seen(rank: int, algorithm_name: str) -> list[str]:
    model = make_layered_model()
    algorithm = {
        "cocod": lambda: CoCoDSGD(period=2, warmup_steps=1),
        "liec": lambda: LIECSGD(full_sync_period=3),
        "dpsgd": lambda: DPSGD(check_every=2),
    }
    optimizer = LocalSGDOptimizer(torch.optim.SGD(model.parameters(), lr=0.05), algorithm[algorithm_name](), model)
    with profile(activities=[ProfilerActivity.CPU]) as trace:
        for step in range(5):
            optimizer.zero_grad()
            loss_of(model, rank, step).backward()
            optimizer.step()
        with optimizer.consensus():
            pass
        optimizer.finalize()
    return sorted({event.name for event in trace.events() if event.name.startswith(PREFIX)})


def test_a_trace_names_every_phase_of_the_rounds_and_the_warm_up():
    labels = run_processes(2, _labels_seen, "cocod")[0]
    for phase in ("warmup/gradients", "warmup/buffers", "round/settle", "round/guard", "round/update", "consensus"):
        assert PREFIX + phase in labels, labels
    assert PREFIX + "final" in labels


def test_a_trace_names_the_per_step_exchanges():
    assert PREFIX + "exchange" in run_processes(2, _labels_seen, "liec")[0]
    assert PREFIX + "gossip" in run_processes(2, _labels_seen, "dpsgd")[0]
