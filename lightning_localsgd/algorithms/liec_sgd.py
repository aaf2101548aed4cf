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

The server's ``C(u)`` never crosses a wire here: every rank computes it from the same bytes. The bytes sent at a
compressed step are the all-gathered payloads, about 1/32 of a float32 all-reduce's at two ranks.
"""

from __future__ import annotations

from torch import Tensor
from torch.optim import Optimizer

from lightning_localsgd._validation import check_int
from lightning_localsgd.algorithms.averaging import mean_, mean_packed_
from lightning_localsgd.algorithms.buffers import BufferSelection
from lightning_localsgd.algorithms.compressed import CompressedExchangeAlgorithm
from lightning_localsgd.algorithms.gradient_exchange import flat_slices, write_slices
from lightning_localsgd.algorithms.rank_state import StateInit
from lightning_localsgd.comm.flat import DEFAULT_BUCKET_CAP_MB
from lightning_localsgd.compression import Compressor, ScaledSign
from lightning_localsgd.compression.compressors import DEFAULT_BLOCK_SIZE_MB


def server_step(compressor: Compressor, mean_compressed: Tensor, error: Tensor) -> Tensor:
    """``u = mean_compressed + error``; returns ``C(u)`` and leaves ``error = u - C(u)``."""
    u = mean_compressed + error
    _, c_hat = compressor.compress(u)
    error.copy_(u - c_hat)
    return c_hat


class LIECSGD(CompressedExchangeAlgorithm):
    """LIEC-SGD. Defaults: the paper's p = 32 and blocks of 5 MiB.

    Args:
        full_sync_period: p, steps between full-precision rounds (parameters and gradients averaged, ``e`` reset).
        block_size_mb: MiB of float32 per compression block (one scale each); ``compressor`` overrides it.
        compressor: the compressor in both directions (default :class:`ScaledSign` with ``block_size_mb``);
            :class:`NoCompression` turns LIEC-SGD into synchronous SGD.
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
    ) -> None:
        check_int("full_sync_period", full_sync_period, 1)  # named as the user spells it
        compressor = compressor if compressor is not None else ScaledSign(block_size_mb)
        super().__init__(compressor, full_sync_period, warmup_steps, bucket_cap_mb, buffers)
        self.block_size_mb = block_size_mb

    @property
    def full_sync_period(self) -> int:
        return self.period

    @property
    def server_error(self) -> list[Tensor]:
        """``e``, in the flat bucket layout of the parameters (float32 for half-precision parameters)."""
        return self.state_buckets("server_error")

    def _declare_state_buffers(self) -> dict[str, StateInit]:
        return {"server_error": "zeros"}

    def _full_precision_step(self) -> bool:
        return self.is_round_after(self.step)

    def _exchange_gradients(self, optimizer: Optimizer, indices: list[int], grads: Tensor) -> Tensor:
        views = self.state_views("server_error")
        error = flat_slices(views, indices).float()
        if self._full_precision_step():
            mean_packed_([self.flat.params[i].data for i in indices], self.comm)  # x_i <- mean_j x_j
            mean_([grads], self.comm)
            direction = grads.add_(error)
            error.zero_()
        else:
            payload, compressed = self.compressor.compress(grads)
            local_error = grads.sub_(compressed)  # r_i, in place of g_i (no longer needed)
            mean_compressed = self._all_gather_mean(payload, grads.numel())
            direction = server_step(self.compressor, mean_compressed, error).add_(local_error)
        write_slices(views, indices, error)
        return direction
