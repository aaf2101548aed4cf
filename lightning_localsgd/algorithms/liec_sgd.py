"""LIEC-SGD: bidirectional 1-bit compression with error compensation.

Paper: "Communication-Efficient Distributed Learning with Local Immediate Error Compensation" (Cheng et al.,
arXiv 2402.11857). Compressor ``C(v) = (||v||_1 / numel) * sign(v)`` per block (:class:`ScaledSign`).

Update rule at a compressed step, per rank i (``e`` is the only persistent error, one float32 copy of the model):
    g_i        raw (unscaled) gradient
    c_i = C(g_i);  r_i = g_i - c_i           the local immediate error: used in this step, never stored
    u = mean_j c_j + e;  c_hat = C(u);  e <- u - c_hat        the "server", computed identically on every rank
                                                             from the all-gathered packed c_j (no server process)
    the optimizer steps with the direction c_hat + r_i      (momentum and weight decay are the optimizer's)

Every ``full_sync_period`` (p) steps, as in the authors' code: the parameters are averaged, then the
full-precision gradients, ``e`` is added and reset to 0, and the optimizer steps on ``mean_j g_j + e``; the
normalisation buffers are averaged at the end of that step.

Invariants: the mean over ranks of the directions is ``c_hat + mean_j r_j = mean_j g_j - (e_new - e_old)``, so the
mean model follows error-feedback SGD with the server error only; with compression off (:class:`NoCompression`)
``e`` stays 0 and every rank steps on ``mean_j g_j``: synchronous SGD; a full round leaves ``e = 0``.

``variance_reduction=True`` (our extension, not in the paper) adds VRL-SGD's control variate
(``control_variate.py``): after every local step ``x_i += lr * Delta_i``, and at each full-precision round
``Delta_i += (x_hat - x_i) / sum(lr)`` from the replica before averaging. The immediate errors and local momenta
move the replicas apart like Local SGD's local steps do, and on non-identical data (each rank a few labels) that
drift is systematic: Delta_i learns it and cancels it. ``sum_i Delta_i = 0``, so the mean model still follows
error-feedback SGD; with compression off nothing drifts, Delta_i stays 0 and it is still synchronous SGD.

The server step runs on every rank from the all-gathered payloads (``server="replicated"``: its ``C(u)`` never
crosses a wire; ``(N - 1)`` payloads per rank, about 1/32 of a float32 all-reduce's bytes at two ranks), or sharded
over the ranks (``server="sharded"``, the default at more than two ranks, ``liec_server.py``: ``2 (N - 1) / N``
payloads per rank, about 1/32 at any N, each rank holding its part of ``e``). Both give the same bits.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Optional

import torch
from torch import Tensor, nn
from torch.optim import Optimizer

from lightning_localsgd._validation import check_bool, check_choice, check_int
from lightning_localsgd.algorithms.averaging import mean_packed_
from lightning_localsgd.algorithms.buffers import BufferSelection
from lightning_localsgd.algorithms.chunks import Chunk, ChunkPlan, ChunkWriter, gather_chunk
from lightning_localsgd.algorithms.compressed import CompressedExchangeAlgorithm
from lightning_localsgd.algorithms.control_variate import ControlVariate
from lightning_localsgd.algorithms.frames import HeaderCapacity, HeaderPayload
from lightning_localsgd.algorithms.liec_server import REPLICATED, SERVER_CHOICES, ZERO, ServerLayouts, shard_bounds
from lightning_localsgd.algorithms.precision import in_state_precision, write_back
from lightning_localsgd.algorithms.rank_state import StateInit
from lightning_localsgd.comm.flat import DEFAULT_BUCKET_CAP_MB
from lightning_localsgd.compression import COMPRESSORS, Compressor, ScaledSign
from lightning_localsgd.compression.compressors import DEFAULT_BLOCK_SIZE_MB


def check_deterministic(compressor: Compressor) -> None:
    """Refuse a random compressor: every rank computes the server's ``C(u)`` itself, so with per-rank random draws
    the ranks' server errors would part ways with nothing to bring them back."""
    if getattr(compressor, "deterministic", True):
        return
    allowed = ", ".join(c.__name__ for c in COMPRESSORS.values() if c.deterministic)
    raise ValueError(
        f"LIEC-SGD: `compressor` must be deterministic, got {compressor!r}, which draws random numbers on each rank: "
        f"every rank computes the server's compression itself, so the ranks' server errors would diverge. Use one of "
        f"{allowed} (or None for ScaledSign)."
    )


def bits_checksum(tensors: Sequence[Tensor]) -> float:
    """An integer below 2**52 (exact in the float64 flag collective) that changes when any bit of ``tensors`` does.

    Integer sums of the raw bits, weighted by position: exact and order-free, so the same on every rank whatever
    its thread count or device, where a float sum would differ in its last bits and cry wolf. The bits are split
    into 16-bit halves so that no int64 sum can overflow.
    """
    total = 0
    for tensor in tensors:
        flat = tensor.detach().reshape(-1)
        if flat.numel() == 0:
            continue
        bits = flat.view(torch.int32 if flat.element_size() % 4 == 0 else torch.int16).to(torch.int64)
        weights = torch.arange(bits.numel(), device=bits.device) % 4093 + 1  # swapped elements change the sum
        low, high = bits & 0xFFFF, bits >> 16
        sums = torch.stack([(low * weights).sum(), (high * weights).sum(), bits.sum()]).tolist()
        for value in sums:
            total = (total * 1_000_003 + value) % 2**52
    return float(total)


class LIECSGD(CompressedExchangeAlgorithm):
    """LIEC-SGD. Defaults: the paper's p = 32 and blocks of 5 MiB.

    Args:
        full_sync_period: p, steps between full-precision rounds (parameters and gradients averaged, ``e`` reset).
        block_size_mb: MiB of float32 per compression block (one scale each); ``compressor`` overrides it.
        compressor: the compressor in both directions (default :class:`ScaledSign` with ``block_size_mb``);
            :class:`NoCompression` turns LIEC-SGD into synchronous SGD.
        variance_reduction: add VRL-SGD's control variate (see the module docstring), for data that differs
            between ranks.
        server: ``"auto"`` (sharded at more than two ranks), ``"sharded"`` or ``"replicated"``: where the server
            step runs (``liec_server.py``); the same bits either way.
        warmup_steps, bucket_cap_mb, buffers: as for :class:`PeriodicAlgorithm`.
    """

    rounds_synchronise = False  # local immediate errors and local momenta keep the replicas apart

    def __init__(
        self,
        full_sync_period: int = 32,
        block_size_mb: float = DEFAULT_BLOCK_SIZE_MB,
        warmup_steps: int = 0,
        bucket_cap_mb: float = DEFAULT_BUCKET_CAP_MB,
        buffers: BufferSelection = None,
        compressor: Compressor | None = None,
        variance_reduction: bool = False,
        server: str = "auto",
    ) -> None:
        check_int("full_sync_period", full_sync_period, 1)  # named as the user spells it
        compressor = compressor if compressor is not None else ScaledSign(block_size_mb)
        check_deterministic(compressor)
        self.server = check_choice("server", server, SERVER_CHOICES)
        if self.server == "sharded" and compressor.chunk_numel(1) is None:
            raise ValueError(
                f"LIEC-SGD: server='sharded' splits the server step at the compressor's blocks, and {compressor!r} "
                "compresses the whole vector at once (its result would change). Use server='replicated' or 'auto', "
                "or a block compressor (ScaledSign, NoCompression)."
            )
        super().__init__(compressor, full_sync_period, warmup_steps, bucket_cap_mb, buffers)
        self.block_size_mb = block_size_mb
        self.variance_reduction = check_bool("variance_reduction", variance_reduction)
        self._variate = ControlVariate()
        self._layouts = ServerLayouts()

    @property
    def shards_server(self) -> bool:
        """Whether the server is sharded: ``server="sharded"``, or ``"auto"`` where that sends fewer bytes (more
        than two ranks: ``2 (N - 1) / N`` payloads per rank instead of ``N - 1``) and the compressor allows it."""
        if self.server == "auto":
            return self.comm.world_size > 2 and self.compressor.chunk_numel(1) is not None
        return self.server == "sharded"

    @property
    def full_sync_period(self) -> int:
        return self.period

    @property
    def server_error(self) -> list[Tensor]:
        """``e``, in the flat bucket layout of the parameters (float32 for half-precision parameters)."""
        return self.state_buckets("server_error")

    @property
    def delta(self) -> list[Tensor]:
        """Delta_i of ``variance_reduction=True``, in the flat bucket layout of the parameters."""
        return self.state_buckets("delta")

    def _declare_state_buffers(self) -> dict[str, StateInit]:
        if self.variance_reduction:
            return {"server_error": "zeros", "delta": "zeros"}
        return {"server_error": "zeros"}

    def _on_setup(self) -> None:
        super()._on_setup()
        self._variate.reset()
        self._layouts.reset_zero()
        self._divisors: dict[tuple[torch.device, torch.dtype], Tensor] = {}

    def after_optimizer_step(self, optimizer: Optimizer) -> None:
        if not self.variance_reduction or self.in_warmup():
            return
        groups = self._groups.groups_of(self._optimizer_index(optimizer), self._optimizers, self.flat)
        self._variate.correct_(self.flat.params, self.state_views("delta"), groups)

    def _lr_state_fingerprint(self) -> float:
        return self._variate.fingerprint()

    def _fingerprint(self) -> tuple[float, ...]:
        """The core's values, and at a full-precision step the server error's checksum: every rank computes ``e``
        itself, so it must be bit-identical everywhere; a rank whose ``e`` parted ways is named before it is used.
        Other steps send 0: one pass over ``e`` every ``full_sync_period`` steps, not every step."""
        compared = self._full_precision_step() and not self.shards_server  # sharded: each rank holds its own part
        checksum = bits_checksum(self.server_error) if compared else 0.0
        return (*super()._fingerprint(), checksum)

    def _full_precision_step(self) -> bool:
        return self.is_round_after(self.step)

    def _exchange_gradients(
        self, optimizer: Optimizer, params: list[nn.Parameter], indices: list[int], scale: float
    ) -> None:
        views = self.state_views("server_error")
        errors = [views[i] for i in indices]
        index = self._optimizer_index(optimizer)
        sharded = self.shards_server
        self._arrange_server_error(index, optimizer, params, indices, sharded)
        writer = ChunkWriter(errors.__getitem__)
        if self._full_precision_step():
            self._average_parameters(optimizer, indices)
            self._stream(params, scale, lambda chunk, g: self._full_precision_chunk(chunk, g, errors, sharded))
            for error in errors:
                error.zero_()
            self._layouts.set(index, ZERO)
        else:
            rest = self._sharded_chunk if sharded else self._compressed_chunk

            def finish(chunk: Chunk, g: Tensor, shards: Any, received: list[Tensor]) -> Tensor:
                return rest(chunk, g, shards, received, errors, writer)

            self._stream_exchanged(params, indices, scale, finish)
        writer.finish()

    def _full_precision_chunk(self, chunk: Chunk, g: Tensor, errors: list[Tensor], sharded: bool) -> Tensor:
        """mean_j g_j + e (``e`` is reset by the caller once every chunk has read it). Sharded, each element of ``e``
        is on one rank and zero on the others: their sum is ``e`` exactly."""
        self.comm.all_reduce_mean_([g])
        error = self._read_state(chunk, errors, "e")  # a copy: the sum over ranks must not land in the state
        if sharded:
            self.comm.all_reduce_sum_([error])
        return g.add_(error)

    def _first_payload_capacity(self, numel: Optional[int] = None) -> HeaderCapacity:
        if not self.shards_server:
            return super()._first_payload_capacity(numel)
        # Sharded, a step starts with an all-to-all: rank k's frame has room for shard k of the first chunk.
        first = self._model_first_chunk() if numel is None else numel
        return [self.compressor.payload_bytes(n) for _, n in self._shards_of(first)]

    def _prepare_chunk(self, chunk: Chunk, g: Tensor, indices: list[int]) -> tuple[HeaderPayload, Any]:
        """A compressed step's chunk up to its payload: C(g_i), whole (replicated server) or shard by shard, one
        payload per rank (sharded server), and r_i = g_i - C(g_i) in place of g_i."""
        compressor, decoded = self.compressor, self._buffer("mean", chunk)
        if not self.shards_server:
            payload = compressor.encode(g)
            compressor.residual_into(g, g, decoded, payload=payload)  # C(g_i) into `decoded`, r_i = g_i - C(g_i) in g
            return payload, None
        shards = self._shards(chunk)
        payloads = [compressor.encode(g[start : start + numel]) for start, numel in shards]
        for (start, numel), payload in zip(shards, payloads):
            compressor.decode_into(payload, decoded[start : start + numel])
        g.sub_(decoded)
        return payloads, shards

    def _compressed_chunk(
        self, chunk: Chunk, g: Tensor, _: Any, gathered: list[Tensor], errors: list[Tensor], writer: ChunkWriter
    ) -> Tensor:
        """The rest of a compressed step's chunk, replicated server (see the module docstring), once every rank's
        C(g_j) is in ``gathered`` and ``g`` holds r_i: returns C(u) + r_i and updates ``e``."""
        compressor = self.compressor
        mean, scratch = self._buffer("mean", chunk), self._buffer("scratch", chunk)  # with g: three chunk buffers
        own = mean if len(gathered) == 2 else None  # C(g_i), decoded there by `_prepare_chunk`: not decoded again
        summed = self._decoded_sum_into(gathered, mean, scratch, own)
        e, in_place = self._state_chunk(chunk, errors, "scratch")  # a copy goes into the scratch buffer
        # u = mean_j C(g_j) + e in one pass: addcdiv rounds the quotient, then the sum, as dividing and adding do.
        u = torch.addcdiv(e, summed, self._ranks_as_tensor(mean), out=mean)
        # C(u) + r_i into the scratch buffer and e <- u - C(u) (C(u) is never sent: no payload needed).
        direction = compressor.residual_into(u, e if in_place else u, scratch, addend=g)
        if not in_place:
            writer.write(chunk, u)
        return direction

    def _ranks_as_tensor(self, like: Tensor) -> Tensor:
        """The number of ranks as a 0-dim tensor on ``like``'s device (made once: on CUDA each is a copy)."""
        key = (like.device, like.dtype)
        cached = self._divisors.get(key)
        if cached is None:
            cached = self._divisors[key] = torch.tensor(
                float(self.comm.world_size), dtype=like.dtype, device=like.device
            )
        return cached

    def _sharded_chunk(
        self,
        chunk: Chunk,
        g: Tensor,
        shards: list[tuple[int, int]],
        received: list[Tensor],
        errors: list[Tensor],
        writer: ChunkWriter,
    ) -> Tensor:
        """The rest of a compressed step's chunk, sharded server (``liec_server.py``), once every rank's C(g_j) of
        this rank's shard is in ``received`` and ``g`` holds r_i: the same bits as :meth:`_compressed_chunk`, this
        rank serving its shard only."""
        compressor, comm = self.compressor, self.comm
        server = self._buffer("mean", chunk)
        start, numel = shards[comm.rank]
        scratch = self._buffer("e", chunk)[:numel]
        u = server[start : start + numel].zero_()
        for theirs in received:  # rank order, as the replicated server sums
            u.add_(compressor.decode_into(theirs, scratch))
        mine = chunk.part(start, numel)
        u.div_(max(len(received), 1)).add_(gather_chunk(mine, errors, scratch))  # u = mean_j C(g_j) + e
        result = compressor.encode(u)  # C(u), packed: it crosses the wire
        writer.write(mine, u.sub_(compressor.decode_into(result, scratch)))  # e <- u - C(u), this shard only
        sizes = [compressor.payload_bytes(n) for _, n in shards]
        padded = torch.zeros(max(sizes), dtype=torch.uint8, device=result.device)
        padded[: result.numel()].copy_(result)
        for (start, numel), size, theirs in zip(shards, sizes, comm.all_gather_(padded)):
            compressor.decode_into(theirs[:size], server[start : start + numel])
        return server.add_(g)  # C(u) + r_i

    def _chunk_target(self) -> int:
        target = super()._chunk_target()
        unit = self.compressor.chunk_numel(1)
        if not self.shards_server or unit is None:
            return target
        # Sharded: a whole number of blocks per rank, at least one, so that the parts are even (the all-gather pads
        # every part to the largest, and a rank with no block would have nothing to serve).
        world = self.comm.world_size
        return max(world, target // unit // world * world) * unit

    def _shards(self, chunk: Chunk) -> list[tuple[int, int]]:
        return self._shards_of(chunk.numel)

    def _shards_of(self, numel: int) -> list[tuple[int, int]]:
        unit = self.compressor.chunk_numel(1)
        assert unit is not None  # checked when the server was chosen
        return shard_bounds(numel, unit, self.comm.world_size)

    def _arrange_server_error(
        self, index: int, optimizer: Optimizer, params: list[nn.Parameter], indices: list[int], sharded: bool
    ) -> None:
        """Bring optimizer ``index``'s server error into the layout this step needs (``liec_server.py``): split by
        this step's shards, or whole on every rank. Parts split by other shards are summed back together first
        (one all-reduce of this optimizer's error; every rank reaches this alike)."""
        layout = self._layouts.get(index)
        wanted = tuple(indices) if sharded else REPLICATED
        if layout in (wanted, ZERO):
            self._layouts.set(index, wanted)
            return
        views = self.state_views("server_error")
        held = [self.flat.index_of[id(p)] for p in self._managed_params_of(optimizer)]
        if layout != REPLICATED:  # split by other shards: every rank's part, summed, is the whole error
            managed = [views[i] for i in held]
            for chunk in ChunkPlan([v.numel() for v in managed], self._chunk_plan(params).chunk_numel):
                part = self._read_state(chunk, managed, "e")
                self.comm.all_reduce_sum_([part])
                writer = ChunkWriter(managed.__getitem__)
                writer.write(chunk, part)
                writer.finish()
        if sharded:  # keep this rank's shards only; rank 0 keeps the error of the parameters left out this step
            if self.comm.rank != 0:
                for i in set(held) - set(indices):
                    views[i].zero_()
            errors = [views[i] for i in indices]
            for chunk in self._chunk_plan(params):
                start, numel = self._shards(chunk)[self.comm.rank]
                zeros = self._buffer("e", chunk).zero_()
                writer = ChunkWriter(errors.__getitem__)
                for other in (chunk.part(0, start), chunk.part(start + numel, chunk.numel - start - numel)):
                    writer.write(other, zeros)
                writer.finish()
        self._layouts.set(index, wanted)

    def _average_parameters(self, optimizer: Optimizer, indices: list[int]) -> None:
        """x_i <- mean_j x_j for ``optimizer``'s parameters; with variance reduction, Delta_i learns the drift."""
        params = [self.flat.params[i].data for i in indices]
        if not self.variance_reduction:
            mean_packed_(params, self.comm)
            return
        # In float32 for half-precision parameters, so that sum_i (x_hat - x_i) is 0, not N rounding errors.
        mean = in_state_precision(params)
        drifts = [x.clone() for x in mean]  # x_i before averaging
        mean_packed_(mean, self.comm)
        for drift, averaged in zip(drifts, mean):
            drift.neg_().add_(averaged)  # x_hat - x_i
        groups = self._groups.groups_of(self._optimizer_index(optimizer), self._optimizers, self.flat)
        self._variate.update_(self.state_views("delta"), dict(zip(indices, drifts)), groups)
        write_back(params, mean)

    def _extra_state(self) -> dict[str, Any]:
        return {
            **super()._extra_state(),
            "lr_sums": self._variate.state_dict(),
            "server_layouts": self._layouts.state_dict(),
        }

    def _load_extra_state(self, state: dict[str, Any]) -> None:
        super()._load_extra_state(state)
        self._variate.load_state_dict(state.get("lr_sums", []))
        self._layouts.load_state_dict(state.get("server_layouts"))
