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

The server's ``C(u)`` never crosses a wire here: every rank computes it from the same bytes. The bytes sent at a
compressed step are the all-gathered payloads, about 1/32 of a float32 all-reduce's at two ranks.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torch.optim import Optimizer

from lightning_localsgd._validation import check_bool, check_int
from lightning_localsgd.algorithms.averaging import mean_packed_
from lightning_localsgd.algorithms.buffers import BufferSelection
from lightning_localsgd.algorithms.chunks import Chunk
from lightning_localsgd.algorithms.compressed import CompressedExchangeAlgorithm
from lightning_localsgd.algorithms.control_variate import ControlVariate
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
    ) -> None:
        check_int("full_sync_period", full_sync_period, 1)  # named as the user spells it
        compressor = compressor if compressor is not None else ScaledSign(block_size_mb)
        check_deterministic(compressor)
        super().__init__(compressor, full_sync_period, warmup_steps, bucket_cap_mb, buffers)
        self.block_size_mb = block_size_mb
        self.variance_reduction = check_bool("variance_reduction", variance_reduction)
        self._variate = ControlVariate()

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
        checksum = bits_checksum(self.server_error) if self._full_precision_step() else 0.0
        return (*super()._fingerprint(), checksum)

    def _full_precision_step(self) -> bool:
        return self.is_round_after(self.step)

    def _exchange_gradients(
        self, optimizer: Optimizer, params: list[nn.Parameter], indices: list[int], scale: float
    ) -> None:
        views = self.state_views("server_error")
        errors = [views[i] for i in indices]
        if self._full_precision_step():
            self._average_parameters(optimizer, indices)
            self._stream(params, scale, lambda chunk, g: self._full_precision_chunk(chunk, g, errors))
            for error in errors:
                error.zero_()
            return
        staged: dict[int, Tensor] = {}
        self._stream(params, scale, lambda chunk, g: self._compressed_chunk(chunk, g, errors, staged))

    def _full_precision_chunk(self, chunk: Chunk, g: Tensor, errors: list[Tensor]) -> Tensor:
        """mean_j g_j + e (``e`` is reset by the caller once every chunk has read it)."""
        self.comm.all_reduce_mean_([g])
        return g.add_(self._read_state(chunk, errors, "e"))

    def _compressed_chunk(self, chunk: Chunk, g: Tensor, errors: list[Tensor], staged: dict[int, Tensor]) -> Tensor:
        """One chunk of a compressed step (see the module docstring): returns C(u) + r_i, updates ``e``."""
        compressor = self.compressor
        payload = compressor.encode(g)  # C(g_i), packed
        mean = self._buffer("mean", chunk)
        g.sub_(compressor.decode_into(payload, mean))  # r_i = g_i - C(g_i), in place of g_i
        scratch = self._buffer("e", chunk)
        u = self._gathered_mean_into(payload, mean, scratch).add_(self._read_state(chunk, errors, "e"))  # mean + e
        server = compressor.compress_values_into(u, scratch)  # C(u): computed here, never packed or sent
        self._write_state(chunk, u.sub_(server), errors, staged)  # e <- u - C(u)
        return server.add_(g)  # C(u) + r_i

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
        return {**super()._extra_state(), "lr_sums": self._variate.state_dict()}

    def _load_extra_state(self, state: dict[str, Any]) -> None:
        super()._load_extra_state(state)
        self._variate.load_state_dict(state.get("lr_sums", []))
