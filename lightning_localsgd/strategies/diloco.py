"""``Trainer(strategy="diloco")``: DiLoCo, Local SGD whose rounds are steps of an outer optimizer."""

from __future__ import annotations

from typing import Any, Optional

from lightning_localsgd.algorithms import DiLoCo
from lightning_localsgd.algorithms.buffers import BufferSelection
from lightning_localsgd.algorithms.diloco import DEFAULT_OUTER_OPTIMIZER
from lightning_localsgd.comm.flat import DEFAULT_BUCKET_CAP_MB
from lightning_localsgd.strategies.base import LocalUpdateStrategy


class DiLoCoStrategy(LocalUpdateStrategy):
    """DiLoCo (Douillard et al., arXiv 2311.08455): every ``period`` steps the replicas' average becomes a
    pseudo-gradient ``theta - mean_j x_j`` for an outer optimizer on global parameters kept apart (on the CPU by
    default), and every replica restarts from the new global model.

    Use it for long periods (hundreds of steps) on slow links: the outer Nesterov momentum recovers much of what
    Local SGD loses at such periods. Your LightningModule's optimizer is the inner optimizer.

    Args:
        period: inner steps between outer steps (H; the paper: 500 for language models).
        outer_optimizer: a ``torch.optim`` class name (default ``"SGD"``).
        outer_optimizer_options: its keyword arguments (default for SGD: ``{lr: 0.7, momentum: 0.9, nesterov:
            true}``; ``{lr: 1.0}`` with SGD is Local SGD).
        global_device: ``"cpu"`` (default) or ``"device"``: where theta and the outer optimizer's state live.
        overlap: the delayed outer step: each round's all-reduce runs behind the next ``period`` inner steps and
            its outer step is applied one round late (each replica keeps its own progress); the transfer never
            blocks training. Not Streaming DiLoCo's schedule (below); the two do not combine.
        warmup_steps, bucket_cap_mb, buffers: as for :class:`LocalSGDStrategy`.
        fragments: Streaming DiLoCo (Douillard et al., arXiv 2501.18512): F fragments of whole layers, synchronised
            in turn every ``period / F`` steps (each every ``period`` steps), so the link carries 1/F of the model
            at a time. ``period`` must be a multiple of F.
        sync_delay: tau, steps by which a fragment's transfer starts before its outer step (0 <= tau <
            ``period / F``): the transfer overlaps those inner steps.
        merge_alpha: alpha in [0, 1): at its outer step a fragment becomes ``(1 - alpha) theta + alpha x`` (0: the
            global model; the last tau local steps of that fragment are then dropped).
        compressor: send compressed pseudo-gradients ``theta - x`` instead of full-precision replicas: ``"int8"`` or
            ``"int4"`` (per-block scales), ``"sparse_topk"`` (SparseLoCo, arXiv 2508.15706: chunked top-k, 2-bit
            values, error feedback), or another deterministic compressor. Payloads are all-gathered.
        compressor_options: its keyword arguments (e.g. ``{k: 64, chunk_numel: 4096}``).
        error_feedback: keep what compression dropped and send it at the fragment's next round (default: on for
            ``sparse_topk``, off otherwise).
        error_decay: the kept error's decay per round, in (0, 1] (SparseLoCo uses it instead of outer momentum).
        **kwargs: :class:`LocalUpdateStrategy` / :class:`~lightning.pytorch.strategies.DDPStrategy` arguments.
    """

    strategy_names = ("diloco",)

    def __init__(
        self,
        period: int = 100,
        outer_optimizer: str = DEFAULT_OUTER_OPTIMIZER,
        outer_optimizer_options: Optional[dict[str, Any]] = None,
        global_device: str = "cpu",
        overlap: bool = False,
        warmup_steps: int = 0,
        bucket_cap_mb: float = DEFAULT_BUCKET_CAP_MB,
        buffers: BufferSelection = None,
        fragments: int = 1,
        sync_delay: int = 0,
        merge_alpha: float = 0.0,
        compressor: Optional[str] = None,
        compressor_options: Optional[dict[str, Any]] = None,
        error_feedback: Optional[bool] = None,
        error_decay: float = 1.0,
        **kwargs: Any,
    ) -> None:
        algorithm = DiLoCo(
            period,
            outer_optimizer,
            outer_optimizer_options,
            global_device,
            overlap,
            warmup_steps,
            bucket_cap_mb,
            buffers,
            fragments=fragments,
            sync_delay=sync_delay,
            merge_alpha=merge_alpha,
            compressor=compressor,
            compressor_options=compressor_options,
            error_feedback=error_feedback,
            error_decay=error_decay,
        )
        super().__init__(algorithm, **kwargs)
