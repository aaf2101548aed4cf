"""Error feedback, and averaging payloads that cannot be summed on the wire.

Error feedback ("Error Feedback Fixes SignSGD and other Gradient Compression Schemes", Karimireddy et al., arXiv
1901.09847): compress ``v + e`` instead of ``v`` and keep what the compression lost, ``e <- (v + e) - C(v + e)``,
for the next step, so that nothing is lost for good. Written once, for the Lightning strategy and for the DDP
communication hooks alike.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from lightning_localsgd.compression.compressors import Compressor


def compress_with_feedback(compressor: Compressor, vector: Tensor, error: Tensor) -> Tensor:
    """The payload of ``C(vector + error)``; ``error`` (float32, same numel) becomes what that compression lost."""
    compensated = vector.reshape(-1).to(torch.float32) + error.reshape(-1)
    payload = compressor.encode(compensated)
    # Decoded straight into the error buffer where it is a flat float32 view (no temporary), then e = p - C(p).
    in_place = error.dtype == torch.float32 and error.is_contiguous()
    decoded = compressor.decode_into(payload, error.view(-1) if in_place else torch.empty_like(compensated))
    torch.sub(compensated, decoded, out=decoded)
    if not in_place:
        error.copy_(decoded.view_as(error))
    return payload


def decode_mean(compressor: Compressor, payloads: Sequence[Tensor], numel: int) -> Tensor:
    """The mean of the decoded payloads, summed in rank order so that every rank gets the same bits (each payload
    decoded and added in one pass where the compressor can, else through one reused buffer)."""
    device = payloads[0].device if payloads else None
    total = torch.zeros(numel, dtype=torch.float32, device=device)
    scratch = torch.empty(numel, dtype=torch.float32, device=device)
    for payload in payloads:
        compressor.decode_add_into(payload, total, total, scratch)
    return total.div_(max(len(payloads), 1))
