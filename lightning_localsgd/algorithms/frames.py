"""Frames: a synchronisation point's flags and a step's first payload in one collective (see ``guard.py``).

An algorithm that exchanges compressed gradients at every step would otherwise pay a flag collective and then its
payload collective, a round trip more per step. With frames, each rank sends ``[flag vector | payload area]``: the
flag vector laid out as for the all-reduce (this rank's slots set, the others zero; summed over the ranks, it holds
everyone's flags), the payload area padded to a fixed capacity. An all-gather sends one frame to every rank; an
all-to-all (LIEC-SGD's sharded server) sends one per destination rank, each with the whole flag vector.
"""

from __future__ import annotations

from typing import Optional, Union

import torch
from torch import Tensor

from lightning_localsgd.comm.communicator import Communicator

# Where a synchronisation point's flags carry payload (see `agree_in_frames`): the bytes of payload room per frame,
# one number for an all-gather (the same frame to every rank; 0: the flags go alone, in an all-reduce) or one per
# destination rank for an all-to-all (LIEC-SGD's sharded server: rank k gets its shard of every rank's payload).
HeaderCapacity = Union[int, list[int]]
# What a synchronisation point's frames carry: one payload for every rank, or one per destination rank.
HeaderPayload = Union[Tensor, list[Tensor], None]


def agree_in_frames(
    comm: Communicator, flags: Tensor, payload: HeaderPayload, capacity: HeaderCapacity
) -> tuple[Tensor, list[Tensor]]:
    """The flag collective as frames ``[flag vector | payload area]`` instead of an all-reduce, so that a step's
    first payload travels with its flags (a round trip fewer): one all-gather where ``capacity`` is a number, one
    all-to-all (a frame per destination, each with the whole flag vector) where it is a list. Returns the flag vector
    summed over the ranks (as :func:`agree`'s all-reduce leaves it) and the payload areas this rank received, in rank
    order (padded to the capacity: the caller knows what length to read).

    Every frame has its capacity's size, padded where the payload is shorter or absent: ranks at different
    synchronisation points (out of step) or holding different trainable sets then still meet frames of one size and
    read each other's flags, where frames of different sizes would abort the process inside gloo instead of raising
    :class:`~lightning_localsgd.errors.OutOfStepError`. A caller that uses frames must therefore use them, with the
    same capacity, at every synchronisation point.
    """
    head = flags.numel() * flags.element_size()
    if isinstance(capacity, int):
        assert payload is None or isinstance(payload, Tensor)
        frames = comm.all_gather_(_frame(flags, payload, capacity))
    else:
        parts = payload if isinstance(payload, list) else [None] * len(capacity)
        framed = [_frame(flags, part, room) for part, room in zip(parts, capacity)]
        frames = comm.all_to_all_(torch.cat(framed), [f.numel() for f in framed])
    # A copy of each head: an all-to-all's pieces are views of one buffer, not aligned for float64. One rank's value
    # per slot (the requests: a count): the sum is exact.
    summed = torch.stack([f[:head].clone().view(flags.dtype) for f in frames]).sum(0)
    return summed, [f[head:] for f in frames]


def _frame(flags: Tensor, payload: Optional[Tensor], capacity: int) -> Tensor:
    """``[flags as bytes | payload (uint8) | zeros]``, ``capacity`` bytes past the flags."""
    head = flags.numel() * flags.element_size()
    frame = torch.zeros(head + capacity, dtype=torch.uint8, device=flags.device)
    frame[:head].copy_(flags.view(torch.uint8))
    if payload is not None:
        if payload.numel() > capacity:
            raise RuntimeError(f"A payload of {payload.numel()} bytes does not fit a frame of {capacity}.")
        frame[head : head + payload.numel()].copy_(payload)
    return frame


def header_area_bytes_sent(capacity: HeaderCapacity, comm: Communicator) -> int:
    """The payload-area bytes this rank sends in one synchronisation point's frames (counted with an exchange's)."""
    if isinstance(capacity, int):
        return (comm.world_size - 1) * capacity
    return sum(capacity) - capacity[comm.rank] if comm.world_size > 1 else 0
