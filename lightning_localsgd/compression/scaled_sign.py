"""The scaled sign, ``C(v) = (||v||_1 / numel(v)) * sign(v)`` per block: 1 bit per element and one float32 scale per
block, about 1/32 of float32. The compressor of LIEC-SGD and of EF-SignSGD ("Error Feedback Fixes SignSGD and other
Gradient Compression Schemes", Karimireddy et al., arXiv 1901.09847).

On CPU its encode, decode, decode-and-add and residual go through the C kernels (``sign_kernels.c``, ``native.py``)
where they can be built, else through torch and NumPy; on CUDA through torch. Every path gives the same payload bits:
the scale's float64 sum follows the order ``sign_format.py`` fixes (format 2; CUDA: its own order).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any, Optional

import torch
from torch import Tensor

from lightning_localsgd.compression import native, sign_format
from lightning_localsgd.compression.compressors import (
    DEFAULT_BLOCK_SIZE_MB,
    Compressor,
    _Blocks,
    _check_payload,
    _flat_float32,
    _Scratch,
    _whole_blocks,
    block_numel_of,
)
from lightning_localsgd.compression.packing import (
    as_bytes,
    from_bytes,
    pack_bits,
    pack_negatives_into,
    packed_bits_bytes,
    unpack_bits,
)

_SIGN_TABLES: dict[torch.device, Tensor] = {}


def _sign_table(device: torch.device) -> Tensor:
    """Row ``b``: the 8 signs byte ``b`` encodes, least significant bit first (+1 for a clear bit, -1 for a set one)."""
    table = _SIGN_TABLES.get(device)
    if table is None:
        bits = (torch.arange(256).reshape(-1, 1) >> torch.arange(8)) & 1
        table = _SIGN_TABLES[device] = (1.0 - 2.0 * bits.to(torch.float32)).to(device)
    return table


def _mean_abs(
    blocks: _Blocks,
    flat: Tensor,
    scratch: Optional[_Scratch] = None,
    then: Optional[Callable[[int, Tensor], object]] = None,
) -> Tensor:
    """``||block||_1 / numel(block)`` of every block of ``blocks``, as float32, the same bits whatever the thread count.

    Summed in float64: a float32 sum (``vector_norm(block, 1)``) changes with the number of intra-op threads
    and loses about 1e-2 relative on blocks of millions of elements, and LIEC-SGD's ranks each compute the
    server's scale themselves, so such differences would drift the ranks apart. On CPU in the order of the
    payload format (``sign_format.ordered_abs_sum_``, which the C kernel follows too); on CUDA in CUDA's.

    On CPU each block is cast into one float64 buffer (``scratch``, kept between calls; else a fresh one) and
    made absolute there: fresh temporaries of megabytes are page-faulted in again at every call.

    ``then(index, block)``, if given, is called on each block (CPU only) right after its sum, while the block is
    still in the CPU's cache: a second pass over the whole vector reads it from memory again.
    """
    wide = torch.float32 if flat.device.type == "mps" else torch.float64  # MPS has no float64
    if flat.device.type != "cpu":  # CUDA reductions widen as they read: nothing to save
        sums = torch.stack([block.abs().sum(dtype=wide) for block in flat.split(blocks.block_numel)])
    else:
        scratch = scratch if scratch is not None else _Scratch(torch.float64)
        buffer = scratch.get(min(blocks.block_numel, blocks.numel))
        each = []
        for index, block in enumerate(flat.split(blocks.block_numel)):
            each.append(sign_format.ordered_abs_sum_(buffer[: block.numel()].copy_(block).abs_()))
            if then is not None:
                then(index, block)
        sums = torch.stack(each)
    return (sums / blocks.lengths(flat.device, wide)).to(torch.float32)


class ScaledSign(Compressor):
    """``C(v) = (||v||_1 / numel(v)) * sign(v)`` per block of ``block_size_mb`` MiB of float32.

    Payload: one float32 scale per block, then the sign bits (1 for negative), 8 to a byte. A zero element
    decodes as ``+scale`` (one bit cannot say 0); error feedback carries the difference like any other
    compression error.
    """

    name = "sign"

    def __init__(self, block_size_mb: float = DEFAULT_BLOCK_SIZE_MB) -> None:
        self.block_size_mb = float(block_size_mb)
        self._block_numel = block_numel_of(block_size_mb)
        self._scratch = _Scratch(torch.float64)  # each block's float64 |v| (see `_mean_abs`)
        self._signs = _Scratch(torch.bool)  # `v < 0`, packed in place (see `pack_negatives_into`)
        self._codes = _Scratch(torch.int32)  # the payload's bytes as gather indices (see `decode_into`)

    def payload_bytes(self, numel: int) -> int:
        return 4 * _Blocks(numel, self._block_numel).count + packed_bits_bytes(numel)

    def chunk_numel(self, target: int) -> int:
        return _whole_blocks(target, self._block_numel)

    def state_dict(self) -> dict[str, Any]:
        return {"format": sign_format.FORMAT_VERSION}  # which order the scales were summed in (sign_format.py)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        written = state.get("format", 1)  # checkpoints before format 2 saved no state for this compressor
        if written != sign_format.FORMAT_VERSION:
            warnings.warn(
                f"This checkpoint was written with scaled-sign payload format {written}; this version encodes format "
                f"{sign_format.FORMAT_VERSION} (the scale's float64 sum in another order, sign_format.py). Training "
                "resumes correctly, but not bit for bit as the old version would have gone on: about one block scale "
                "in 10^8 differs in its last bit.",
                stacklevel=2,
            )

    def encode(self, tensor: Tensor) -> Tensor:
        flat = _flat_float32(tensor)
        blocks = _Blocks(flat.numel(), self._block_numel)
        if blocks.count == 0:
            return torch.zeros(0, dtype=torch.uint8, device=flat.device)
        if flat.device.type != "cpu":  # the caching allocator hands temporaries back at no cost
            return torch.cat([as_bytes(_mean_abs(blocks, flat)), pack_bits(flat < 0)])
        payload = torch.empty(self.payload_bytes(flat.numel()), dtype=torch.uint8)
        signs = payload[4 * blocks.count :]
        aligned = blocks.block_numel % 8 == 0  # every block starts on a byte of the sign bits
        kernels = sign_format.kernels() if native.is_plain_cpu_float32(flat) else None
        if kernels is not None:  # one pass per block: the scale's sum and, where aligned, the signs
            sums = [
                kernels.abs_sum_signs(block, signs[index * blocks.block_numel // 8 :] if aligned else None)
                for index, block in enumerate(flat.split(blocks.block_numel))
            ]
            scales = (torch.tensor(sums, dtype=torch.float64) / blocks.lengths(flat.device, torch.float64)).float()
            if not aligned:
                pack_negatives_into(flat, self._signs.get(8 * packed_bits_bytes(flat.numel())), signs)
        elif aligned:  # each block's signs are packed while it is in cache from its scale's pass

            def pack_signs(index: int, block: Tensor) -> None:
                start = index * blocks.block_numel // 8
                end = start + packed_bits_bytes(block.numel())
                pack_negatives_into(block, self._signs.get(8 * packed_bits_bytes(block.numel())), signs[start:end])

            scales = _mean_abs(blocks, flat, self._scratch, then=pack_signs)
        else:  # a block boundary inside a byte: the signs of the whole vector at once
            scales = _mean_abs(blocks, flat, self._scratch)
            pack_negatives_into(flat, self._signs.get(8 * packed_bits_bytes(flat.numel())), signs)
        payload[: 4 * blocks.count].copy_(as_bytes(scales))
        return payload

    def decode(self, payload: Tensor, numel: int) -> Tensor:
        return self.decode_into(payload, torch.empty(numel, dtype=torch.float32, device=payload.device))

    def decode_into(self, payload: Tensor, out: Tensor) -> Tensor:
        numel = out.numel()
        _check_payload(payload, self.payload_bytes(numel), "ScaledSign")
        blocks = _Blocks(numel, self._block_numel)
        if blocks.count == 0:
            return out
        scales = from_bytes(payload[: 4 * blocks.count], torch.float32)
        packed = payload[4 * blocks.count :]
        kernels = sign_format.kernels() if native.is_plain_cpu_float32(out) and payload.device.type == "cpu" else None
        if kernels is not None and blocks.block_numel % 8 == 0:  # one pass per block, +-scale straight from the bits
            rows = blocks.block_numel // 8
            for b, (block, scale) in enumerate(zip(out.view(-1).split(blocks.block_numel), scales.tolist())):
                kernels.decode(packed[b * rows :], scale, block)
            return out
        if blocks.block_numel % 8:  # a block boundary inside a byte: decode the bits, then scale block by block
            out.copy_(unpack_bits(packed, numel)).mul_(-2.0).add_(1.0)
            return blocks.scale_(out, scales)
        # Each block owns whole bytes: one gather per block from a 256 x 8 table of +-scale writes the decoded
        # values directly (bit-identical to sign * scale), with no intermediate bit or sign vector.
        table = _sign_table(payload.device)
        # int32 indices, on CPU in a kept buffer: a fresh int64 copy was 8 bytes per 8 outputs, page-faulted in again
        # at every call (0.10 against 0.08 ms per MiB of output on one thread).
        codes = packed.int() if payload.device.type != "cpu" else self._codes.get(packed.numel()).copy_(packed)
        rows = blocks.block_numel // 8
        for b, block in enumerate(out.split(blocks.block_numel)):
            signed = table * scales[b]
            whole = block.numel() // 8  # the last block may end inside its last byte
            torch.index_select(signed, 0, codes[b * rows : b * rows + whole], out=block[: 8 * whole].view(whole, 8))
            if whole * 8 < block.numel():
                # A one-element slice as the row index: a 0-dim index tensor is read on the host (a sync on CUDA).
                last = codes[b * rows + whole : b * rows + whole + 1]
                block[8 * whole :].copy_(signed.index_select(0, last)[0, : block.numel() - 8 * whole])
        return out

    def decode_add_into(self, payload: Tensor, addend: Tensor, out: Tensor, scratch: Tensor) -> Tensor:
        blocks = _Blocks(out.numel(), self._block_numel)
        plain = native.is_plain_cpu_float32(out) and native.is_plain_cpu_float32(addend)
        kernels = sign_format.kernels() if plain and payload.device.type == "cpu" else None
        if kernels is None or blocks.block_numel % 8 or blocks.count == 0:
            return super().decode_add_into(payload, addend, out, scratch)
        _check_payload(payload, self.payload_bytes(out.numel()), "ScaledSign")
        scales = from_bytes(payload[: 4 * blocks.count], torch.float32).tolist()
        packed, rows = payload[4 * blocks.count :], blocks.block_numel // 8
        pieces = zip(out.view(-1).split(blocks.block_numel), addend.view(-1).split(blocks.block_numel), scales)
        for b, (block, base, scale) in enumerate(pieces):
            kernels.decode_add(packed[b * rows :], scale, base, block)
        return out

    def residual_into(
        self,
        tensor: Tensor,
        residual: Tensor,
        decoded: Tensor,
        addend: Optional[Tensor] = None,
        payload: Optional[Tensor] = None,
    ) -> Tensor:
        blocks = _Blocks(decoded.numel(), self._block_numel)
        operands = (tensor, residual, decoded) if addend is None else (tensor, residual, decoded, addend)
        kernels = sign_format.kernels() if all(native.is_plain_cpu_float32(t) for t in operands) else None
        if kernels is None or blocks.block_numel % 8 or blocks.count == 0:
            return super().residual_into(tensor, residual, decoded, addend, payload)
        payload = self.encode(tensor) if payload is None else payload  # one pass: the scales (and bits, unused)
        _check_payload(payload, self.payload_bytes(decoded.numel()), "ScaledSign")
        scales = from_bytes(payload[: 4 * blocks.count], torch.float32).tolist()
        packed, rows, size = payload[4 * blocks.count :], blocks.block_numel // 8, blocks.block_numel
        flat = [t.view(-1) for t in (tensor, residual, decoded)]
        extra = None if addend is None else addend.view(-1)
        for b, scale in enumerate(scales):
            part = slice(b * size, (b + 1) * size)
            added = None if extra is None else extra[part]
            kernels.residual(packed[b * rows :], scale, flat[0][part], flat[1][part], added, flat[2][part])
        return decoded

    # No `compress_values_into` of its own: writing +-scale per block with `torch.where(block < 0, -scale, scale)`
    # skipped the packing but took 2.2x the time of packing and then decoding through the table (29.6 ms against
    # 13.5 ms for 25 MiB on one thread, torch 2.13), for the same bits.
