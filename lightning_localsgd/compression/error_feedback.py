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
    payload, decoded = compressor.compress(compensated)
    error.copy_((compensated - decoded).view_as(error))
    return payload


def decode_mean(compressor: Compressor, payloads: Sequence[Tensor], numel: int) -> Tensor:
    """The mean of the decoded payloads, summed in rank order so that every rank gets the same bits."""
    total = torch.zeros(numel, dtype=torch.float32, device=payloads[0].device if payloads else None)
    for payload in payloads:
        total.add_(compressor.decode(payload, numel))
    return total.div_(max(len(payloads), 1))
