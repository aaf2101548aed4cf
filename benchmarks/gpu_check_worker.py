"""One rank of the device check (started by ``gpu_check.py``, never by hand): runs every check of one set of
processes in turn and writes what it found to ``<out>/<fleet>-rank<R>.json``.

The processes are started like ``torchrun`` starts them (``LOCAL_RANK=0``, ``NODE_RANK=R``), each a "node" of one
device: two processes can then share one GPU (``devices=[0]`` on both), which ``Trainer(devices=2)`` cannot.
Every fit runs in the same processes, one after the other, over the process group the first one made.
"""

from __future__ import annotations

import argparse
import json
import os
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any, Optional

import lightning as L
import torch
import torch.distributed as dist
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.plugins.precision import MixedPrecision
from lightning.pytorch.strategies import DDPStrategy, StrategyRegistry

import lightning_localsgd  # noqa: F401 - registers the strategy names
from benchmarks.gpu_check_cases import (
    CHECKPOINT_STEP,
    FP16_INIT_SCALE,
    FP16_WARMUP_STEPS,
    OVERFLOW_STEP,
    STEPS,
    STRATEGIES,
    CheckModel,
    ReplicaAgreement,
    SkippedStepCheck,
    StepTimer,
    flat_parameters,
    gather_cpu,
    max_difference,
    median,
    parameters_only,
    synchronize,
)
from lightning_localsgd.compression import QSGD, ScaledSign, TopK
from lightning_localsgd.dropit import DropITCallback
from lightning_localsgd.hooks import CompressedHookState, ef_sign_hook

Check = dict[str, Any]  # one row of results: "ok" (bool), what was measured, and "error" if it raised


class Fleet:
    """This process's place: its device, backend and rank, and how to build a Trainer for one fit."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.world = int(os.environ["WORLD_SIZE"])
        self.rank = int(os.environ["NODE_RANK"])
        self.accelerator = args.device
        self.device_index = args.gpu_index
        self.device = torch.device(args.device, args.gpu_index) if args.device == "cuda" else torch.device("cpu")
        self.backend = args.backend
        self.out = Path(args.out)

    def strategy(self, label: str, **extra: Any) -> Any:
        name, options = STRATEGIES[label]
        cls = StrategyRegistry[name]["strategy"]
        return cls(**options, **extra, process_group_backend=self.backend, collective_timeout=120.0)

    def trainer(self, strategy: Any, root: Path, callbacks: list[Callback], **options: Any) -> L.Trainer:
        devices: Any = [self.device_index] if self.accelerator == "cuda" else 1
        settings: dict[str, Any] = {
            "max_steps": STEPS,
            "logger": False,
            "enable_progress_bar": False,
            "enable_model_summary": False,
            "enable_checkpointing": any(isinstance(c, ModelCheckpoint) for c in callbacks),
            "num_sanity_val_steps": 0,
            "limit_val_batches": 1,
            "use_distributed_sampler": False,
            "deterministic": "warn",  # exact resume needs it; ops without a deterministic kernel warn
        }
        settings.update(options)
        return L.Trainer(
            accelerator=self.accelerator,
            devices=devices,
            num_nodes=self.world,
            strategy=strategy,
            callbacks=callbacks,
            default_root_dir=root,
            **settings,
        )

    def fp16_plugin(self) -> MixedPrecision:
        scaler = torch.amp.GradScaler(self.accelerator, init_scale=FP16_INIT_SCALE)
        return MixedPrecision("16-mixed", self.accelerator, scaler=scaler)

    def barrier(self) -> None:
        if dist.is_initialized() and self.world > 1:
            dist.barrier()


def slug(label: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in label)


def guarded(fn: Callable[[], Check]) -> Check:
    """Run one check; an exception is a failed check with its message, and the next check still runs."""
    try:
        return fn()
    except Exception as error:  # every failure is reported; none stops the other checks
        return {"ok": False, "error": f"{type(error).__name__}: {error}", "trace": traceback.format_exc()[-2000:]}


# ---------------------------------------------------------------------- correctness, several ranks
def fit_and_resume(fleet: Fleet, label: str) -> dict[str, Check]:
    """Run to the end with a mid-period checkpoint, then resume from it; compare everything the strategy promises."""
    root = fleet.out / "runs" / slug(label)
    agreement, timer = ReplicaAgreement(), StepTimer()
    checkpoint = ModelCheckpoint(
        dirpath=root / "ckpt", every_n_train_steps=CHECKPOINT_STEP, save_top_k=-1, filename="{step}"
    )
    model = CheckModel()
    strategy = fleet.strategy(label)
    trainer = fleet.trainer(strategy, root, [agreement, timer, checkpoint], val_check_interval=CHECKPOINT_STEP)
    trainer.fit(model)
    final = flat_parameters(model)
    finals = gather_cpu(final)
    validated = dict(model.validated)
    at_checkpoint = validated.get(CHECKPOINT_STEP)
    results: dict[str, Check] = {
        "fit": {"ok": trainer.global_step == STEPS and bool(torch.isfinite(final).all()), "steps": trainer.global_step},
        "replicas_agree": {
            "ok": agreement.worst == 0.0,  # no step claimed (gossip, CoCoD, ...): nothing to disagree on
            "steps_in_sync": agreement.checked,
            "max_difference": agreement.worst,
        },
        "final_consensus": {"ok": max_difference(finals) == 0.0, "max_difference": max_difference(finals)},
    }
    if at_checkpoint is None:
        results["validation_consensus"] = {"ok": False, "error": f"no validation at step {CHECKPOINT_STEP}"}
    else:
        evaluated = gather_cpu(at_checkpoint)
        results["validation_consensus"] = {
            "ok": max_difference(evaluated) == 0.0,
            "max_difference": max_difference(evaluated),
        }
    path = root / "ckpt" / f"step={CHECKPOINT_STEP}.ckpt"
    fleet.barrier()
    saved = CheckModel()
    saved.load_state_dict(torch.load(path, map_location="cpu", weights_only=False)["state_dict"])
    difference = (
        float((flat_parameters(saved) - at_checkpoint).abs().max()) if at_checkpoint is not None else float("inf")
    )
    results["checkpoint_is_consensus"] = {"ok": difference == 0.0, "max_difference_to_validated": difference}
    algorithm = strategy.algorithm
    results["comm"] = {
        "ok": algorithm.comm.stats.rounds > 0 or algorithm.comm.stats.exchanges > 0,
        "rounds": algorithm.comm.stats.rounds,
        "mb_sent": algorithm.comm.stats.bytes_sent / 1e6,
        "round_seconds": median(timer.round_seconds),
    }

    def resume() -> Check:
        resumed = CheckModel()
        again = fleet.trainer(fleet.strategy(label), root / "resumed", [], val_check_interval=CHECKPOINT_STEP)
        again.fit(resumed, ckpt_path=path)
        differences = gather_cpu(torch.tensor([float((flat_parameters(resumed) - final).abs().max())]))
        worst = max(float(d) for d in differences)
        return {"ok": worst == 0.0, "max_difference_to_uninterrupted": worst}

    results["mid_period_resume"] = guarded(resume)
    return results


def fp16_overflow(fleet: Fleet, label: str) -> Check:
    """fp16 with a grad scaler; rank 1 overflows at a warm-up step: every rank must skip it and back off alike."""
    root = fleet.out / "runs" / (slug(label) + "_fp16")
    skipped = SkippedStepCheck(OVERFLOW_STEP)
    model = CheckModel(overflow_step=OVERFLOW_STEP if fleet.world > 1 else -1)
    strategy = fleet.strategy(label, warmup_steps=FP16_WARMUP_STEPS)
    trainer = fleet.trainer(strategy, root, [skipped], plugins=[fleet.fp16_plugin()], limit_val_batches=0)
    trainer.fit(model)
    scale = float(trainer.precision_plugin.scaler.get_scale())
    scales = [float(s) for s in gather_cpu(torch.tensor([scale]))]
    skips = [bool(s) for s in gather_cpu(torch.tensor([bool(skipped.unchanged)]))]
    final = flat_parameters(model)
    expected_scale = FP16_INIT_SCALE / 2 if fleet.world > 1 else FP16_INIT_SCALE
    ok = all(s == expected_scale for s in scales) and bool(torch.isfinite(final).all())
    if fleet.world > 1:
        ok = ok and all(skips)
    return {"ok": ok, "scales": scales, "skipped_on_every_rank": all(skips), "expected_scale": expected_scale}


def bf16_fit(fleet: Fleet, label: str) -> Check:
    root = fleet.out / "runs" / (slug(label) + "_bf16")
    model = CheckModel()
    trainer = fleet.trainer(fleet.strategy(label), root, [], precision="bf16-mixed", limit_val_batches=0)
    trainer.fit(model)
    finals = gather_cpu(flat_parameters(model))
    ok = all(bool(torch.isfinite(f).all()) for f in finals) and max_difference(finals) == 0.0
    return {"ok": ok, "final_difference": max_difference(finals)}


def dropit_fit(fleet: Fleet) -> Check:
    """DropIT's top-k on this device, under local SGD: trains through the swapped layers, ranks agree after fit."""
    root = fleet.out / "runs" / "dropit"
    callback = DropITCallback(gamma=0.7)
    seen = DropITLayers(callback)
    model = CheckModel(width=64)
    trainer = fleet.trainer(fleet.strategy("local_sgd"), root, [callback, seen], limit_val_batches=0)
    trainer.fit(model)
    finals = gather_cpu(flat_parameters(model))
    finite = all(bool(torch.isfinite(f).all()) for f in finals)
    ok = seen.count > 0 and max_difference(finals) == 0.0 and finite
    return {"ok": ok, "layers_swapped": seen.count, "final_difference": max_difference(finals)}


class DropITLayers(Callback):
    """How many layers DropIT had swapped while training ran (it restores them when the fit ends)."""

    def __init__(self, dropit: DropITCallback) -> None:
        self.dropit = dropit
        self.count = 0

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.count = len(self.dropit.swapped)


class RegisterHook(Callback):
    """Registers the compressed hook on the DDP-wrapped model where Lightning does not (it does on CUDA only)."""

    def __init__(self, state: CompressedHookState) -> None:
        self.state = state

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.state.module = pl_module
        if pl_module.device.type != "cuda":
            trainer.strategy.model.register_comm_hook(self.state, ef_sign_hook)


def ddp_hook_fit(fleet: Fleet) -> Check:
    """Lightning's DDP with the compressed ``ef_sign_hook`` (registered by Lightning on CUDA, by hand on CPU)."""
    root = fleet.out / "runs" / "ddp_hook"
    state = CompressedHookState("sign")
    on_cuda = fleet.accelerator == "cuda"
    strategy = DDPStrategy(
        process_group_backend=fleet.backend,
        ddp_comm_state=state if on_cuda else None,
        ddp_comm_hook=ef_sign_hook if on_cuda else None,
    )
    model = CheckModel()
    trainer = fleet.trainer(strategy, root, [RegisterHook(state)], limit_val_batches=0)
    trainer.fit(model)
    # Parameters only: DDP broadcasts buffers before each forward, so the last forward's BatchNorm statistics differ.
    finals = gather_cpu(parameters_only(model))
    ok = state.exchanges > 0 and state.skipped == 0 and max_difference(finals) == 0.0
    return {
        "ok": ok,
        "exchanges": state.exchanges,
        "mb_sent": state.bytes_sent / 1e6,
        "final_difference": max_difference(finals),
    }


def raw_all_reduce_seconds(fleet: Fleet, numel: int, repeats: int = 5) -> Optional[float]:
    """One float32 all-reduce of ``numel`` elements over the fits' process group (the bound a round is held to)."""
    if not dist.is_initialized() or fleet.world == 1:
        return None
    tensor = torch.ones(numel, device=fleet.device)
    times = []
    for _ in range(repeats + 1):
        synchronize(fleet.device)
        start = time.perf_counter()
        dist.all_reduce(tensor)
        synchronize(fleet.device)
        times.append(time.perf_counter() - start)
    return median(times[1:])


# ---------------------------------------------------------------------- performance
def perf_model(args: argparse.Namespace) -> CheckModel:
    return CheckModel(width=args.perf_width, depth=args.perf_depth, batch_size=args.perf_batch, steps=args.perf_steps)


def timed_fit(fleet: Fleet, label: Optional[str], args: argparse.Namespace) -> Check:
    """A timing fit on the larger model: median step (round steps apart) and the device's peak memory."""
    root = fleet.out / "runs" / f"{'plain' if label is None else slug(label)}_timed_{fleet.world}"
    timer = StepTimer()
    model = perf_model(args)
    if fleet.device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(fleet.device)
    strategy = "auto" if label is None else fleet.strategy(label)
    trainer = fleet.trainer(strategy, root, [timer], max_steps=args.perf_steps, limit_val_batches=0)
    trainer.fit(model)
    settle = max(2, args.perf_steps // 5)  # the first steps build buckets, caches and kernels
    local = [t for t, r in zip(timer.times[settle:], timer.round_steps[settle:]) if not r]
    rounds = [t for t, r in zip(timer.times[settle:], timer.round_steps[settle:]) if r]
    peak = torch.cuda.max_memory_allocated(fleet.device) if fleet.device.type == "cuda" else None
    return {
        "ok": trainer.global_step == args.perf_steps,
        "local_step_s": median(local),
        "round_step_s": median(rounds),
        "round_comm_s": median(timer.round_seconds),
        "peak_bytes": peak,
        "parameters": sum(p.numel() for p in model.parameters()),
    }


def codec_speed(fleet: Fleet, mib: float, repeats: int = 5) -> dict[str, Check]:
    """Encode + decode of each compressor against a device-to-device copy of the same float32 bytes."""
    numel = int(mib * 2**20) // 4
    source = torch.randn(numel, generator=torch.Generator().manual_seed(0)).to(fleet.device)
    target = torch.empty_like(source)

    def seconds(fn: Callable[[], object]) -> float:
        fn()
        times = []
        for _ in range(repeats):
            synchronize(fleet.device)
            start = time.perf_counter()
            fn()
            synchronize(fleet.device)
            times.append(time.perf_counter() - start)
        return float(median(times) or 0.0)

    copy = seconds(lambda: target.copy_(source))
    results: dict[str, Check] = {}
    for name, compressor in {"sign": ScaledSign(), "topk 1%": TopK(0.01), "qsgd": QSGD()}.items():
        payload = compressor.encode(source)
        both = seconds(lambda c=compressor: c.decode_into(c.encode(source), target))
        exact = torch.equal(compressor.encode(source).cpu(), compressor.encode(source.cpu()))
        results[name] = {
            "ok": payload.device == source.device,
            "payload_same_bits_as_cpu": exact,
            "encode_decode_s": both,
            "copy_s": copy,
            "ratio_to_copy": both / copy if copy else None,
            "gb_per_s": 4 * numel / both / 1e9 if both else None,
        }
    return results


# ---------------------------------------------------------------------- main
def run_several(fleet: Fleet, labels: list[str], args: argparse.Namespace) -> dict[str, Any]:
    results: dict[str, Any] = {"strategies": {}}
    for label in labels:
        entry: dict[str, Any] = {}
        fitted = guarded(lambda label=label: {"ok": True, "checks": fit_and_resume(fleet, label)})
        entry.update(fitted.get("checks", {"fit": fitted}))
        entry["fp16_overflow"] = guarded(lambda label=label: fp16_overflow(fleet, label))
        entry["bf16"] = guarded(lambda label=label: bf16_fit(fleet, label))
        results["strategies"][label] = entry
        fleet.barrier()
    results["dropit"] = guarded(lambda: dropit_fit(fleet))
    results["ddp_hook"] = guarded(lambda: ddp_hook_fit(fleet))
    # Rounds of the larger model, against one raw all-reduce of its bytes over the same process group.
    for label in labels:
        results["strategies"][label]["timed"] = guarded(lambda label=label: timed_fit(fleet, label, args))
    numel = sum(p.numel() for p in perf_model(args).parameters())
    results["raw_all_reduce_s"] = raw_all_reduce_seconds(fleet, numel)
    return results


def run_one(fleet: Fleet, labels: list[str], args: argparse.Namespace) -> dict[str, Any]:
    results: dict[str, Any] = {"plain": guarded(lambda: timed_fit(fleet, None, args)), "strategies": {}}
    for label in labels:
        results["strategies"][label] = {"timed": guarded(lambda label=label: timed_fit(fleet, label, args))}
    results["codecs"] = guarded(lambda: {"ok": True, "by_compressor": codec_speed(fleet, args.codec_mib)})
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--fleet", choices=["one", "several"], required=True)
    parser.add_argument("--device", choices=["cpu", "cuda"], required=True)
    parser.add_argument("--gpu-index", type=int, default=0)
    parser.add_argument("--backend", choices=["gloo", "nccl"], required=True)
    parser.add_argument("--strategies", nargs="+", required=True)
    parser.add_argument("--perf-width", type=int, default=64)
    parser.add_argument("--perf-depth", type=int, default=2)
    parser.add_argument("--perf-batch", type=int, default=16)
    parser.add_argument("--perf-steps", type=int, default=12)
    parser.add_argument("--codec-mib", type=float, default=1.0)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    if args.device == "cpu":
        torch.set_num_threads(1)
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # deterministic cuBLAS for the exact resume
    fleet = Fleet(args)
    started = time.perf_counter()
    if args.fleet == "one":
        results = run_one(fleet, args.strategies, args)
    else:
        results = run_several(fleet, args.strategies, args)
    results["seconds"] = time.perf_counter() - started
    results["world"] = fleet.world
    path = fleet.out / f"{args.fleet}-rank{fleet.rank}.json"
    path.write_text(json.dumps(results, indent=1, default=str))


if __name__ == "__main__":
    main()
