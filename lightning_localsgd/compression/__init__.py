"""Compression of what ranks exchange: compressors with packed payloads, and error feedback."""

from lightning_localsgd.compression.compressors import (
    COMPRESSORS,
    QSGD,
    Compressor,
    NoCompression,
    ScaledSign,
    TopK,
    make_compressor,
)
from lightning_localsgd.compression.packing import pack_bits, unpack_bits
from lightning_localsgd.compression.quantizers import BlockQuantizer, Int4Quantizer, Int8Quantizer, SparseTopK

__all__ = [
    "COMPRESSORS",
    "QSGD",
    "BlockQuantizer",
    "Compressor",
    "Int4Quantizer",
    "Int8Quantizer",
    "NoCompression",
    "ScaledSign",
    "SparseTopK",
    "TopK",
    "make_compressor",
    "pack_bits",
    "unpack_bits",
]
