"""DiLoCo's pseudo-gradients sent compressed: what one rank packs, and the mean every rank reads back.

A rank's pseudo-gradient for a fragment is ``delta_i = theta - x_i`` (theta is the same on every rank). It is
compressed (``int8`` / ``int4`` per-block quantisation as INTELLECT-1 and Streaming DiLoCo, ``sparse_topk`` as
SparseLoCo, "Communication Efficient LLM Pre-training with SparseLoCo", Sarfi et al., arXiv 2508.15706), optionally
with error feedback kept per rank:

    e_i <- decay * e_i + delta_i;   payload_i = C(e_i);   e_i <- e_i - decode(payload_i)

so what was not sent is carried to the next synchronisation of that fragment (``decay = 1``: nothing is lost;
SparseLoCo's ``decay < 1`` makes ``e`` act as the outer momentum). The ranks' payloads are all-gathered and every
rank decodes them in rank order and divides their sum by N: the same mean, bit for bit, on every rank.

Why an all-gather: a sum of quantised values cannot be formed on the packed data. The alternative, quantising per
chunk for a reduce-scatter and again for the all-gather, sends ``2 (N-1)/N * b`` per rank instead of ``(N-1) * b``
(fewer bytes from 3 ranks on) but adds a second quantisation error and makes the server part of each rank's state;
at the 2 to 8 ranks a slow-link DiLoCo run has, the payload is 1/8 to 1/110 of float32 and the all-gather's exact,
single quantisation was preferred.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Optional

import torch
from torch import Tensor

from lightning_localsgd._validation import check_bool
from lightning_localsgd.compression import Compressor, make_compressor

ERROR_FEEDBACK_BY_DEFAULT = ("sparse_topk",)  # a sparse payload drops most of delta: carry it, as SparseLoCo does


class PseudoGradientCodec:
    """Compression of DiLoCo's pseudo-gradients (see the module docstring).

    Args:
        compressor: a registered compressor name (``"int8"``, ``"int4"``, ``"sparse_topk"``, ``"sign"``,
            ``"none"``, ...). It must be deterministic: every rank decodes every payload itself.
        options: the compressor's keyword arguments.
        error_feedback: keep what was not sent and add it to the next pseudo-gradient of the same parameters
            (default: on for ``sparse_topk``, off otherwise).
        error_decay: ``decay`` above, in (0, 1] (SparseLoCo: below 1, with an outer SGD without momentum).
    """

    def __init__(
        self,
        compressor: str,
        options: Optional[dict[str, Any]] = None,
        error_feedback: Optional[bool] = None,
        error_decay: float = 1.0,
    ) -> None:
        if options is not None and not isinstance(options, dict):
            raise ValueError(f"`compressor_options` must be a mapping of keyword arguments, got {options!r}.")
        self.compressor: Compressor = make_compressor(compressor, **(options or {}))
        if not self.compressor.deterministic:
            raise ValueError(
                f"DiLoCo's compressor must be deterministic (every rank decodes every payload), and {compressor!r} "
                "draws random numbers; use 'int8', 'int4' or 'sparse_topk'."
            )
        if error_feedback is None:
            error_feedback = compressor in ERROR_FEEDBACK_BY_DEFAULT
        self.error_feedback = check_bool("error_feedback", error_feedback)
        if isinstance(error_decay, bool) or not isinstance(error_decay, (int, float)) or not 0 < error_decay <= 1:
            raise ValueError(f"`error_decay` must be a number in (0, 1], got {error_decay!r}.")
        if error_decay != 1 and not self.error_feedback:
            raise ValueError("`error_decay` only applies with `error_feedback=True`.")
        self.error_decay = float(error_decay)

    def payload_bytes(self, numels: Sequence[int]) -> int:
        return sum(self.compressor.payload_bytes(n) for n in numels)

    def encode(self, thetas: Sequence[Tensor], replicas: Sequence[Tensor], errors: Sequence[Tensor]) -> Tensor:
        """This rank's payload for one fragment: its buckets' ``theta - x`` (plus the error, if kept), packed one
        bucket after the other. ``errors`` (float32, one per bucket; empty without error feedback) are updated."""
        pieces = []
        for i, (theta, x) in enumerate(zip(thetas, replicas)):
            delta = theta.to(device=x.device, dtype=torch.float32) - x.float()
            if self.error_feedback:
                error = errors[i]
                if self.error_decay != 1:
                    error.mul_(self.error_decay)
                sent = error.add_(delta)
                payload = self.compressor.encode(sent)
                error.sub_(self.compressor.decode(payload, sent.numel()))  # what the others will read is gone
            else:
                payload = self.compressor.encode(delta)
            pieces.append(payload)
        return torch.cat(pieces) if len(pieces) > 1 else pieces[0]

    def mean(self, payloads: Sequence[Tensor], numels: Sequence[int]) -> list[Tensor]:
        """The mean pseudo-gradient of every bucket of a fragment, from every rank's payload (in rank order)."""
        means = []
        offset = 0
        for numel in numels:
            size = self.compressor.payload_bytes(numel)
            total = torch.zeros(numel, dtype=torch.float32, device=payloads[0].device)
            scratch = torch.empty_like(total)
            for payload in payloads:  # rank order: every rank adds the same values in the same order
                total.add_(self.compressor.decode_into(payload[offset : offset + size], scratch))
            means.append(total.div_(len(payloads)))
            offset += size
        return means


__all__ = ["ERROR_FEEDBACK_BY_DEFAULT", "PseudoGradientCodec"]
