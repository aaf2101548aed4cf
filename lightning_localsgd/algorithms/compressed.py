"""What every algorithm with a compressed gradient exchange at each step shares (LIEC-SGD, EF-SGD).

Each local step's gradients go through the core's per-step exchange moment (``gradient_exchange.py``: the flag
collective first, so an inf/NaN never enters an error buffer), are compressed into a packed payload, and the
payloads are all-gathered: sign bits and top-k indices cannot be summed on the wire, so every rank decodes all of
them and computes the same mean. Every ``period`` steps a round averages the normalisation buffers (and, for
LIEC-SGD, parameters and gradients in full precision).

Why an all-gather and not a root that gathers and scatters (the reference code of LIEC-SGD): with N ranks the
all-gather puts ``(N - 1) * b`` bytes on each rank's link for a payload of ``b`` bytes, the root's gather plus
scatter puts ``2 (N - 1) * b`` on the root's link and waits for two transfers in a row; at the 2 to 8 ranks a
slow link joins, the symmetric collective is cheaper and needs no rank to be special.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor

from lightning_localsgd.algorithms.averaging import mean_packed_
from lightning_localsgd.algorithms.buffers import BufferSelection
from lightning_localsgd.algorithms.periodic import PeriodicAlgorithm
from lightning_localsgd.comm.flat import DEFAULT_BUCKET_CAP_MB
from lightning_localsgd.compression import Compressor
from lightning_localsgd.compression.error_feedback import decode_mean


class CompressedExchangeAlgorithm(PeriodicAlgorithm):
    """A :class:`PeriodicAlgorithm` whose local steps exchange compressed gradients (see the module docstring)."""

    exchanges_every_step = True

    def __init__(
        self,
        compressor: Compressor,
        period: int,
        warmup_steps: int = 0,
        bucket_cap_mb: float = DEFAULT_BUCKET_CAP_MB,
        buffers: BufferSelection = None,
    ) -> None:
        super().__init__(period, warmup_steps, False, bucket_cap_mb, buffers)
        if not isinstance(compressor, Compressor):
            raise ValueError(f"`compressor` must be a Compressor, got {compressor!r}.")
        self.compressor = compressor

    def _on_setup(self) -> None:
        self.compressor.seed_for_rank(self.comm.rank)

    def _all_gather_mean(self, payload: Tensor, numel: int) -> Tensor:
        """The mean over ranks of what every rank's ``payload`` decodes to (identical bits on every rank)."""
        return decode_mean(self.compressor, self.comm.all_gather_(payload), numel)

    def _round(self) -> None:
        """Normalisation buffers only: the parameters were dealt with by the step's exchange."""
        mean_packed_(self.averaged_buffers(), self.comm)

    def _extra_state(self) -> dict[str, Any]:
        # The parameters stepped since the last full-precision step (LIEC-SGD; always empty for EF-SGD): one left out
        # of the next full-precision step for want of a gradient is still averaged there, also after a resume.
        return {"compressor": self.compressor.state_dict(), "stepped_since_full": self._stepped_state()}

    def _load_extra_state(self, state: dict[str, Any]) -> None:
        self.compressor.load_state_dict(state.get("compressor", {}))
        self._load_stepped_state(state.get("stepped_since_full"))
