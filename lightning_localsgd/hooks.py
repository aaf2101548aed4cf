"""Compressed DDP communication hooks with error feedback, for plain PyTorch ``DistributedDataParallel``.

::

    state = lightning_localsgd.hooks.CompressedHookState("sign")          # or "topk", "qsgd", "none"
    ddp_model.register_comm_hook(state, lightning_localsgd.hooks.ef_sign_hook)

Each bucket's gradients plus this rank's error are compressed (the same compressors and error feedback as the
``ef_sign`` strategy), the packed payloads are all-gathered (sign bits and indices cannot be summed on the wire)
and every rank writes the same decoded mean into the bucket. The payload's size depends only on the bucket's size,
so it works on gloo and NCCL alike, whatever the bucket sizes (torch's PowerSGD hook aborts on gloo).

A 4-byte header carries "my bucket is finite": if any rank's gradients hold inf/NaN, no error buffer changes
and the bucket becomes NaN on every rank, as a plain all-reduce would leave it, so a ``GradScaler`` skips the
step everywhere. Then one bit per parameter of the bucket says "this rank had a gradient for it" (DDP with
``find_unused_parameters=True`` gives the hook zeros for a parameter this rank did not use): a parameter that no
rank had a gradient for keeps its error as it was (DDP leaves its ``.grad`` alone, so it never moves, and a zero
compressed by a sign compressor would otherwise leave an error of ``-scale`` to be paid into it once it is used).
One that some rank used counts as zero on the others, as under DDP.

Errors are kept per parameter, and a bucket is compressed in the module's parameter order (given ``module=``), not
in the order DDP laid it out. Compression blocks are still per bucket, and DDP regroups
its buckets at the first step after a (re)start, so a resumed run matches an uninterrupted one exactly where the
buckets hold the same parameters (one bucket, or a model whose gradients arrive in reverse parameter order).
Under a ``GradScaler`` the hook sees scaled gradients; the error then carries the scale along, which changes only
when the scaler backs off after an overflow.

The state pickles without its process group (set ``state.process_group`` again after loading) and has
``state_dict`` / ``load_state_dict`` for checkpoints: each rank saves its own.
"""

# No `from __future__ import annotations`: DDP checks the hook's annotations as objects (dist.GradBucket).
from typing import Any, Optional, Union

import torch
import torch.distributed as dist
from torch import Tensor, nn

from lightning_localsgd.comm.exit_drain import install_exit_drain
from lightning_localsgd.compression import Compressor, make_compressor
from lightning_localsgd.compression.error_feedback import compress_with_feedback, decode_mean
from lightning_localsgd.compression.packing import as_bytes, from_bytes, pack_bits, packed_bits_bytes, unpack_bits

_FINITE_BYTES = 4  # one float32: 1.0 when this rank's bucket is finite; then one bit per parameter (had a gradient)


class CompressedHookState:
    """Per-rank state of :func:`ef_sign_hook`: the compressor, one error per parameter, and counters.

    Args:
        compressor: a compressor name (``"sign"``, ``"topk"``, ``"qsgd"``, ``"none"``) or a :class:`Compressor`.
        compressor_options: keyword arguments for a compressor given by name.
        process_group: the group to exchange over (default: the world).
        error_feedback: keep what the compression lost for the next step (off: plain compressed SGD, biased).
        module: the module DDP wraps (``ddp.module``); needed by :meth:`state_dict` / :meth:`load_state_dict`,
            which key the errors by parameter name.

    Errors are kept per parameter, not per bucket, so the bucket rebuild DDP does after its first step (and again
    after every restart) loses none of them.
    """

    def __init__(
        self,
        compressor: Union[str, Compressor] = "sign",
        compressor_options: Optional[dict[str, Any]] = None,
        process_group: Optional[dist.ProcessGroup] = None,
        error_feedback: bool = True,
        module: Optional[nn.Module] = None,
    ) -> None:
        if isinstance(compressor, Compressor):
            self.compressor = compressor
        else:
            self.compressor = make_compressor(compressor, **(compressor_options or {}))
        self.process_group = process_group
        self.error_feedback = bool(error_feedback)
        self.module = module
        install_exit_drain()  # else a finished run can abort at exit (see comm/exit_drain.py)
        self.errors: dict[int, Tensor] = {}  # id(parameter) -> float32 error, flat
        self.exchanges = 0
        self.bytes_sent = 0
        self.skipped = 0  # buckets some rank sent non-finite
        self._seeded = False
        self._position: Optional[dict[int, int]] = None  # id(parameter) -> its index in module.parameters()

    def _names(self) -> dict[int, str]:
        if self.module is None:
            raise ValueError(
                "CompressedHookState needs the module to save or load its errors: "
                "`CompressedHookState(..., module=ddp.module)`."
            )
        return {id(p): name for name, p in self.module.named_parameters()}

    def state_dict(self) -> dict[str, Any]:
        names = self._names()
        errors = {names[key]: error.detach().cpu().clone() for key, error in self.errors.items() if key in names}
        return {
            "errors": errors,
            "compressor": self.compressor.state_dict(),
            "exchanges": self.exchanges,
            "bytes_sent": self.bytes_sent,
            "skipped": self.skipped,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        by_name = {name: p for name, p in self._require_module().named_parameters()}
        unknown = [name for name in state["errors"] if name not in by_name]
        if unknown:
            raise ValueError(f"The saved errors belong to parameters this module does not have: {unknown[:5]}.")
        self.errors = {id(by_name[name]): error.clone() for name, error in state["errors"].items()}
        self.compressor.load_state_dict(state["compressor"])
        self._seeded = True  # the restored random stream is this rank's already
        self.exchanges, self.bytes_sent, self.skipped = state["exchanges"], state["bytes_sent"], state["skipped"]

    def _require_module(self) -> nn.Module:
        self._names()
        assert self.module is not None
        return self.module

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["process_group"] = None  # a process group cannot be pickled; set it again after loading
        state["_position"] = None  # keyed by object ids, which mean nothing in another process
        return state

    def _canonical_order(self, params: list[Tensor], grads: list[Tensor]) -> tuple[list[Tensor], list[Tensor]]:
        """The bucket's parameters and gradient views in the module's parameter order (bucket order without one)."""
        if self.module is None or len(params) < 2:
            return params, grads
        if self._position is None:
            self._position = {id(p): i for i, p in enumerate(self.module.parameters())}
        order = sorted(range(len(params)), key=lambda i: self._position.get(id(params[i]), i))
        return [params[i] for i in order], [grads[i] for i in order]

    def _errors_for(self, params: list[Tensor], buffer: Tensor) -> Tensor:
        """The bucket's error, in the bucket's layout (its parameters' errors one after another)."""
        if not self.error_feedback:
            return torch.zeros(buffer.numel(), dtype=torch.float32, device=buffer.device)
        parts = [
            self.errors[id(p)].to(buffer.device)
            if id(p) in self.errors
            else torch.zeros(p.numel(), dtype=torch.float32, device=buffer.device)
            for p in params
        ]
        return torch.cat(parts)

    def _keep_errors(self, params: list[Tensor], error: Tensor, used: list[bool]) -> None:
        """The new errors of the parameters some rank had a gradient for; the others keep theirs."""
        offset = 0
        for p, kept in zip(params, used):
            if kept:
                self.errors[id(p)] = error[offset : offset + p.numel()].clone()
            offset += p.numel()


def ef_sign_hook(state: CompressedHookState, bucket: dist.GradBucket) -> torch.futures.Future[torch.Tensor]:
    """A DDP communication hook: compressed gradients with error feedback (EF-SignSGD with the default state)."""
    group = state.process_group if state.process_group is not None else dist.group.WORLD
    world = dist.get_world_size(group)
    if not state._seeded:
        state.compressor.seed_for_rank(dist.get_rank(group))
        state._seeded = True
    buffer = bucket.buffer()
    numel = buffer.numel()
    in_bucket = list(bucket.parameters())
    params, grads = state._canonical_order(in_bucket, list(bucket.gradients()))
    if sum(p.numel() for p in params) != numel:
        raise RuntimeError(f"A DDP bucket of {numel} elements holds parameters of {sum(p.numel() for p in params)}.")
    # Compressed in the module's parameter order, whatever order DDP laid the bucket out in: the bucket is
    # rebuilt after every (re)start, and a block's scale summed in another order differs in its last bits.
    reordered = any(a is not b for a, b in zip(params, in_bucket))
    vector = torch.cat([g.reshape(-1) for g in grads]) if reordered else buffer
    error = state._errors_for(params, buffer)
    payload = compress_with_feedback(state.compressor, vector, error)
    finite = torch.isfinite(buffer).all().to(torch.float32).reshape(1)
    # At hook time a parameter this rank used has a `.grad` (autograd's, or DDP's bucket view); an unused one has not.
    # Written on the device: a list built on the host would be a blocking copy to the GPU in every bucket's hook.
    had_gradient = torch.ones(len(params), dtype=torch.bool, device=buffer.device)
    for i, p in enumerate(params):
        if p.grad is None:
            had_gradient[i] = False
    message = torch.cat([as_bytes(finite), pack_bits(had_gradient), payload])
    header = _FINITE_BYTES + packed_bits_bytes(len(params))
    gathered = [torch.empty_like(message) for _ in range(world)]
    work = dist.all_gather(gathered, message, group=group, async_op=True)
    assert work is not None
    state.exchanges += 1
    state.bytes_sent += (world - 1) * message.numel()

    def finish(_: Any) -> Tensor:
        flags = torch.cat([from_bytes(m[:_FINITE_BYTES], torch.float32) for m in gathered]).tolist()  # one host read
        if all(flag == 1.0 for flag in flags):
            if state.error_feedback:
                used = torch.stack([unpack_bits(m[_FINITE_BYTES:header], len(params)) for m in gathered]).any(0)
                state._keep_errors(params, error, used.tolist())
            mean = decode_mean(state.compressor, [m[header:] for m in gathered], numel)
            offset = 0
            for grad in grads:
                grad.copy_(mean[offset : offset + grad.numel()].view_as(grad))
                offset += grad.numel()
        else:
            state.skipped += 1
            buffer.fill_(float("nan"))  # as an all-reduce would leave it: every rank's scaler skips this step
        return buffer

    return work.get_future().then(finish)


__all__ = ["CompressedHookState", "ef_sign_hook"]


def local_gradients_hook(state: Any, bucket: dist.GradBucket) -> torch.futures.Future[torch.Tensor]:
    """A DDP communication hook that sends nothing: every rank keeps its own gradients.

    For a model that stays wrapped in ``DistributedDataParallel`` while a local-update algorithm synchronises it
    (:class:`~lightning_localsgd.optim.LocalSGDOptimizer` registers it): DDP's all-reduce would undo what the
    algorithm saves. DDP does not divide a hook's result by the world size, so the gradients are exactly the local
    ones.
    """
    future: torch.futures.Future[torch.Tensor] = torch.futures.Future()
    future.set_result(bucket.buffer())
    return future
