"""Compressors: a vector in, a packed payload out, and back.

One small interface (:class:`Compressor`): :meth:`~Compressor.encode` turns a tensor of any float dtype into one
flat ``uint8`` payload whose size depends only on the number of elements (so every rank's payload for the same
tensor has the same size and the payloads can be all-gathered), :meth:`~Compressor.decode` turns a payload back
into a float32 vector, and :meth:`~Compressor.payload_bytes` says what crosses the wire.

* :class:`ScaledSign`: ``(||v||_1 / numel) * sign(v)`` per block, 1 bit per element plus one float32 scale per
  block (about 1/32 of float32), the compressor of LIEC-SGD and EF-SignSGD: :mod:`.scaled_sign`, registered here.
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
from abc import ABC, abstractmethod
from typing import Any, Optional

import torch
from torch import Tensor

from lightning_localsgd._validation import check_int, check_positive_float, check_unit_interval
from lightning_localsgd.compression.packing import as_bytes, from_bytes

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


# The scaled sign and the quantisers subclass `Compressor`, so their modules are imported here, below the classes
# they need: the package's __init__ imports this module first, whichever module a caller names, so no import cycle
# is left half done.
from lightning_localsgd.compression.quantizers import Int4Quantizer, Int8Quantizer, SparseTopK  # noqa: E402
from lightning_localsgd.compression.scaled_sign import ScaledSign  # noqa: E402

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
