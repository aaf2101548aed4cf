"""Compressors: a vector in, a packed payload out, and back.

One small interface (:class:`Compressor`): :meth:`~Compressor.encode` turns a tensor of any float dtype into one
flat ``uint8`` payload whose size depends only on the number of elements (so every rank's payload for the same
tensor has the same size and the payloads can be all-gathered), :meth:`~Compressor.decode` turns a payload back
into a float32 vector, and :meth:`~Compressor.payload_bytes` says what crosses the wire.

* :class:`ScaledSign`: ``(||v||_1 / numel) * sign(v)`` per block, 1 bit per element plus one float32 scale per
  block (about 1/32 of float32). The compressor of LIEC-SGD and of EF-SignSGD ("Error Feedback Fixes SignSGD
  and other Gradient Compression Schemes", Karimireddy et al., arXiv 1901.09847).
* :class:`TopK`: the ``k`` largest magnitudes, as float32 values and int32 indices.
* :class:`QSGD`: unbiased stochastic quantisation to ``levels`` levels per block ("QSGD: Communication-Efficient
  SGD via Gradient Quantization and Encoding", Alistarh et al., arXiv 1610.02132), one signed byte per element.
* :class:`NoCompression`: float32 as it is; the check that a compressed algorithm without compression is the
  uncompressed one.
* ``int8`` / ``int4`` (per-block quantisation) and ``sparse_topk`` (SparseLoCo's chunked top-k), for DiLoCo's
  pseudo-gradients: :mod:`~lightning_localsgd.compression.quantizers`, registered here.

Compressors are plain values (picklable, built from a name and keyword arguments in YAML through
:func:`make_compressor`); a random one keeps its generator's state in :meth:`~Compressor.state_dict`.
"""

from __future__ import annotations

import math
import warnings
from abc import ABC, abstractmethod
from collections.abc import Callable
from typing import Any, Optional

import torch
from torch import Tensor

from lightning_localsgd._validation import check_int, check_positive_float, check_unit_interval
from lightning_localsgd.compression import native, sign_format
from lightning_localsgd.compression.packing import (
    as_bytes,
    from_bytes,
    pack_bits,
    pack_negatives_into,
    packed_bits_bytes,
    unpack_bits,
)

DEFAULT_BLOCK_SIZE_MB = 5.0  # LIEC-SGD's reference code: buckets of 5 MiB (about 10 blocks for ResNet-18)


def _flat_float32(tensor: Tensor) -> Tensor:
    return tensor.detach().reshape(-1).to(torch.float32)


def _whole_blocks(target: int, block_numel: int) -> int:
    """The multiple of ``block_numel`` nearest ``target`` from below (at least one block)."""
    return max(1, target // block_numel) * block_numel


def block_numel_of(block_size_mb: float) -> int:
    """Float32 elements in a block of ``block_size_mb`` MiB (at least 1)."""
    return max(1, int(check_positive_float("block_size_mb", block_size_mb) * 2**20) // 4)


class Compressor(ABC):
    """Encode a vector into a packed ``uint8`` payload and decode it back (see the module docstring)."""

    name: str = ""
    # Whether the same input gives the same payload on every rank. LIEC-SGD needs it: every rank computes the
    # "server" compression itself, and only a deterministic compressor keeps those results identical.
    deterministic: bool = True

    @abstractmethod
    def payload_bytes(self, numel: int) -> int:
        """Bytes of the payload for a tensor of ``numel`` elements (the same on every rank)."""

    @abstractmethod
    def encode(self, tensor: Tensor) -> Tensor:
        """The payload for ``tensor`` (any float dtype and shape, read as a flat vector)."""

    @abstractmethod
    def decode(self, payload: Tensor, numel: int) -> Tensor:
        """The float32 vector of ``numel`` elements that ``payload`` stands for."""

    def compress(self, tensor: Tensor) -> tuple[Tensor, Tensor]:
        """``(payload, decoded)``: what is sent and what the receivers will read from it."""
        payload = self.encode(tensor)
        return payload, self.decode(payload, tensor.numel())

    def chunk_numel(self, target: int) -> Optional[int]:
        """A chunk length near ``target`` such that compressing a vector chunk by chunk gives exactly what
        compressing it whole gives (the streamed exchanges cut their vectors there); ``None``: only the whole
        vector does (the default, e.g. a top-k selection)."""
        return None

    def decode_into(self, payload: Tensor, out: Tensor) -> Tensor:
        """:meth:`decode` written into ``out`` (a float32 vector of the payload's element count); returns ``out``.
        Compressors that can decode in place override it, so the exchanges reuse one buffer at every step."""
        return out.copy_(self.decode(payload, out.numel()))

    def decode_add_into(self, payload: Tensor, addend: Tensor, out: Tensor, scratch: Tensor) -> Tensor:
        """``out`` = ``addend + decode(payload)``, bit for bit as ``torch.add`` (``out`` may be ``addend``;
        ``scratch``, a float32 buffer of the same length, may be overwritten); returns ``out``. Compressors that can
        add as they decode override it: one pass instead of two."""
        return torch.add(addend, self.decode_into(payload, scratch), out=out)

    def residual_into(
        self,
        tensor: Tensor,
        residual: Tensor,
        decoded: Tensor,
        addend: Optional[Tensor] = None,
        payload: Optional[Tensor] = None,
    ) -> Tensor:
        """``decoded`` = ``C(tensor)``, plus ``addend`` if given, and ``residual`` = ``tensor - C(tensor)`` (it may be
        ``tensor`` itself), bit for bit as decoding, ``torch.sub`` and ``torch.add`` do; returns ``decoded``.
        ``payload``: ``tensor``'s, where it was encoded already; else ``C(tensor)`` is computed here, unpacked where
        the compressor can (:meth:`compress_values_into`). Compressors that can do it all in one pass override it."""
        if payload is None:
            self.compress_values_into(tensor, decoded)
        else:
            self.decode_into(payload, decoded)
        torch.sub(tensor, decoded, out=residual)
        return decoded if addend is None else decoded.add_(addend)

    def compress_values_into(self, tensor: Tensor, out: Tensor) -> Tensor:
        """``decode(encode(tensor))`` written into ``out``, bit for bit, for a result that never crosses a wire
        (LIEC-SGD's server step): compressors that can skip packing and unpacking override it."""
        return self.decode_into(self.encode(tensor), out)

    def seed_for_rank(self, rank: int) -> None:  # noqa: B027 - deterministic compressors have nothing to seed
        """Give this rank's copy its own random stream (random compressors only)."""

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:  # noqa: B027 - stateless by default
        """Restore :meth:`state_dict`'s output."""

    def __repr__(self) -> str:
        fields = ", ".join(f"{k}={v!r}" for k, v in vars(self).items() if not k.startswith("_"))
        return f"{type(self).__name__}({fields})"


def _check_payload(payload: Tensor, expected: int, what: str) -> None:
    if payload.dtype != torch.uint8 or payload.dim() != 1 or payload.numel() != expected:
        raise ValueError(
            f"A {what} payload for this tensor is a 1-D uint8 tensor of {expected} bytes, got "
            f"{payload.dtype} of shape {tuple(payload.shape)}."
        )


class _Scratch:
    """A CPU buffer of one dtype kept between calls, grown to the longest request: on CPU a fresh temporary of
    megabytes lies above glibc's mmap threshold and is page-faulted in again at every call. Not pickled or copied
    with its compressor: it is rebuilt on the first call after."""

    def __init__(self, dtype: torch.dtype) -> None:
        self.dtype = dtype
        self._buffer: Optional[Tensor] = None

    def get(self, numel: int) -> Tensor:
        if self._buffer is None or self._buffer.numel() < numel:
            self._buffer = torch.empty(numel, dtype=self.dtype)
        return self._buffer[:numel]

    def __getstate__(self) -> dict[str, Any]:
        return {"dtype": self.dtype, "_buffer": None}


class _Blocks:
    """Splitting a flat vector of ``numel`` elements into blocks of ``block_numel`` (the last one shorter).

    Blocks are processed as views of the flat vector, one reduction each: a ``(blocks, block_numel)`` reduction
    along the long dimension measured 15x slower on one CPU thread, and padding would copy the whole vector.
    """

    def __init__(self, numel: int, block_numel: int) -> None:
        self.numel = numel
        self.block_numel = block_numel
        self.count = math.ceil(numel / block_numel) if numel else 0

    def norms(self, flat: Tensor, order: float) -> Tensor:
        """The ``order``-norm of every block."""
        return torch.stack([torch.linalg.vector_norm(block, order) for block in flat.split(self.block_numel)])

    def mean_abs(
        self, flat: Tensor, scratch: Optional[_Scratch] = None, then: Optional[Callable[[int, Tensor], object]] = None
    ) -> Tensor:
        """``||block||_1 / numel(block)`` of every block, as float32, the same bits whatever the thread count.

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
            sums = torch.stack([block.abs().sum(dtype=wide) for block in flat.split(self.block_numel)])
        else:
            scratch = scratch if scratch is not None else _Scratch(torch.float64)
            buffer = scratch.get(min(self.block_numel, self.numel))
            each = []
            for index, block in enumerate(flat.split(self.block_numel)):
                each.append(sign_format.ordered_abs_sum_(buffer[: block.numel()].copy_(block).abs_()))
                if then is not None:
                    then(index, block)
            sums = torch.stack(each)
        return (sums / self.lengths(flat.device, wide)).to(torch.float32)

    def lengths(self, device: torch.device, dtype: torch.dtype = torch.float32) -> Tensor:
        # Filled on the device: a list built on the host would be a blocking host-to-device copy on CUDA, per call.
        lengths = torch.full((self.count,), float(self.block_numel), device=device, dtype=dtype)
        last = self.numel - (self.count - 1) * self.block_numel
        if self.count and last != self.block_numel:
            lengths[-1] = float(last)
        return lengths

    def scale_(self, flat: Tensor, per_block: Tensor) -> Tensor:
        """``flat`` with each block multiplied in place by its value of ``per_block``."""
        for block, value in zip(flat.split(self.block_numel), per_block):
            block.mul_(value)
        return flat


_SIGN_TABLES: dict[torch.device, Tensor] = {}


def _sign_table(device: torch.device) -> Tensor:
    """Row ``b``: the 8 signs byte ``b`` encodes, least significant bit first (+1 for a clear bit, -1 for a set one)."""
    table = _SIGN_TABLES.get(device)
    if table is None:
        bits = (torch.arange(256).reshape(-1, 1) >> torch.arange(8)) & 1
        table = _SIGN_TABLES[device] = (1.0 - 2.0 * bits.to(torch.float32)).to(device)
    return table


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
        self._scratch = _Scratch(torch.float64)  # each block's float64 |v| (see `_Blocks.mean_abs`)
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
            return torch.cat([as_bytes(blocks.mean_abs(flat)), pack_bits(flat < 0)])
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

            scales = blocks.mean_abs(flat, self._scratch, then=pack_signs)
        else:  # a block boundary inside a byte: the signs of the whole vector at once
            scales = blocks.mean_abs(flat, self._scratch)
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
            for b, (block, scale) in enumerate(zip(out.split(blocks.block_numel), scales.tolist())):
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
        pieces = zip(out.split(blocks.block_numel), addend.split(blocks.block_numel), scales)
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
        for b, scale in enumerate(scales):
            part = slice(b * size, (b + 1) * size)
            extra = None if addend is None else addend[part]
            kernels.residual(packed[b * rows :], scale, tensor[part], residual[part], extra, decoded[part])
        return decoded

    # No `compress_values_into` of its own: writing +-scale per block with `torch.where(block < 0, -scale, scale)`
    # skipped the packing but took 2.2x the time of packing and then decoding through the table (29.6 ms against
    # 13.5 ms for 25 MiB on one thread, torch 2.13), for the same bits.


class TopK(Compressor):
    """The ``ceil(ratio * numel)`` largest-magnitude elements (at least one), as float32 values and int32 indices.

    Ties are broken by ``torch.topk``; the decoded vector is zero elsewhere.
    """

    name = "topk"

    def __init__(self, ratio: float = 0.01) -> None:
        self.ratio = check_unit_interval("ratio", ratio)
        if self.ratio == 0:
            raise ValueError("`ratio` must be > 0: top-k with k = 0 sends nothing.")

    def k_of(self, numel: int) -> int:
        return 0 if numel == 0 else min(numel, max(1, math.ceil(self.ratio * numel)))

    def payload_bytes(self, numel: int) -> int:
        return 8 * self.k_of(numel)

    def encode(self, tensor: Tensor) -> Tensor:
        flat = _flat_float32(tensor)
        k = self.k_of(flat.numel())
        indices = torch.topk(flat.abs(), k, sorted=False).indices if k else flat.new_zeros(0, dtype=torch.long)
        return torch.cat([as_bytes(flat[indices]), as_bytes(indices.to(torch.int32))])

    def decode(self, payload: Tensor, numel: int) -> Tensor:
        _check_payload(payload, self.payload_bytes(numel), "TopK")
        k = self.k_of(numel)
        values = from_bytes(payload[: 4 * k], torch.float32)
        indices = from_bytes(payload[4 * k :], torch.int32).long()
        out = torch.zeros(numel, dtype=torch.float32, device=payload.device)
        out[indices] = values
        return out


class QSGD(Compressor):
    """Unbiased stochastic quantisation: per block, ``||v||_2 * sign(v_i) * l_i / levels`` with ``l_i`` the floor
    or ceiling of ``levels * |v_i| / ||v||_2`` chosen at random so that the expectation is ``v_i``.

    Payload: one float32 norm per block, then one signed byte per element (``levels <= 127``). Each rank draws
    from its own generator (:meth:`seed_for_rank`), whose state is part of :meth:`state_dict`.
    """

    name = "qsgd"
    deterministic = False  # each rank draws its own random rounding

    def __init__(self, levels: int = 127, block_size_mb: float = DEFAULT_BLOCK_SIZE_MB, seed: int = 0) -> None:
        self.levels = check_int("levels", levels, 1)
        if self.levels > 127:
            raise ValueError(f"`levels` must be at most 127 (one signed byte per element), got {levels}.")
        self.block_size_mb = float(block_size_mb)
        self.seed = check_int("seed", seed, 0)
        self._block_numel = block_numel_of(block_size_mb)
        self._generator: Optional[torch.Generator] = None
        self._rank = 0

    def seed_for_rank(self, rank: int) -> None:
        self._rank = rank
        self._generator = None

    def _random(self, shape: tuple[int, ...]) -> Tensor:
        if self._generator is None:
            self._generator = torch.Generator().manual_seed(self.seed * 1_000_003 + self._rank)
        return torch.rand(shape, generator=self._generator)  # on CPU: the same stream on every device

    def payload_bytes(self, numel: int) -> int:
        return 4 * _Blocks(numel, self._block_numel).count + numel

    def chunk_numel(self, target: int) -> int:
        # Blocks are independent and the random draws come one per element from one stream, whatever the chunks.
        return _whole_blocks(target, self._block_numel)

    def encode(self, tensor: Tensor) -> Tensor:
        flat = _flat_float32(tensor)
        blocks = _Blocks(flat.numel(), self._block_numel)
        if blocks.count == 0:
            return torch.zeros(0, dtype=torch.uint8, device=flat.device)
        norms = blocks.norms(flat, 2)
        safe = torch.where(norms > 0, norms, torch.ones_like(norms))
        ratio = blocks.scale_(flat.abs(), self.levels / safe)  # in [0, levels]
        low = ratio.floor()
        up = (self._random((flat.numel(),)).to(flat.device) < (ratio - low)).to(torch.float32)
        level = (low + up).clamp_(max=self.levels) * torch.sign(flat)
        return torch.cat([as_bytes(norms), as_bytes(level.to(torch.int8))])

    def decode(self, payload: Tensor, numel: int) -> Tensor:
        _check_payload(payload, self.payload_bytes(numel), "QSGD")
        blocks = _Blocks(numel, self._block_numel)
        if blocks.count == 0:
            return torch.zeros(0, dtype=torch.float32, device=payload.device)
        norms = from_bytes(payload[: 4 * blocks.count], torch.float32)
        levels = from_bytes(payload[4 * blocks.count :], torch.int8).to(torch.float32)
        return blocks.scale_(levels, norms / self.levels)

    def state_dict(self) -> dict[str, Any]:
        return {"generator": self._generator.get_state() if self._generator is not None else None}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        saved = state.get("generator")
        if saved is None:
            self._generator = None
            return
        self._random((0,))  # make the generator, then overwrite its state
        assert self._generator is not None
        self._generator.set_state(saved)


class NoCompression(Compressor):
    """Float32 as it is (4 bytes per element): compression switched off."""

    name = "none"

    def payload_bytes(self, numel: int) -> int:
        return 4 * numel

    def chunk_numel(self, target: int) -> int:
        return max(1, target)

    def encode(self, tensor: Tensor) -> Tensor:
        return as_bytes(_flat_float32(tensor).clone())  # a payload never aliases its input

    def decode(self, payload: Tensor, numel: int) -> Tensor:
        _check_payload(payload, self.payload_bytes(numel), "NoCompression")
        return from_bytes(payload, torch.float32)


# The quantisers subclass `Compressor`, so their module is imported here, below the classes it needs: the package's
# __init__ imports this module first, whichever module a caller names, so no import cycle is left half done.
from lightning_localsgd.compression.quantizers import Int4Quantizer, Int8Quantizer, SparseTopK  # noqa: E402

COMPRESSORS: dict[str, type[Compressor]] = {
    c.name: c for c in (ScaledSign, TopK, QSGD, NoCompression, Int8Quantizer, Int4Quantizer, SparseTopK)
}


def make_compressor(name: str, **options: Any) -> Compressor:
    """A compressor by name and its keyword arguments: ``"sign"``, ``"topk"``, ``"qsgd"``, ``"none"`` (this
    module), ``"int8"``, ``"int4"`` (``block_numel``) and ``"sparse_topk"`` (``chunk_numel``, ``k``,
    ``value_bits``) (:mod:`~lightning_localsgd.compression.quantizers`)."""
    if name not in COMPRESSORS:
        raise ValueError(f"`compressor` must be one of {', '.join(map(repr, COMPRESSORS))}; got {name!r}.")
    try:
        return COMPRESSORS[name](**options)
    except TypeError as error:
        raise ValueError(f"Bad options for compressor {name!r} ({options}): {error}.") from error
