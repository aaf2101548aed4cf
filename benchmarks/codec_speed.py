"""Encode and decode cost of the compressors against a memcpy of the same float32 bytes, on this machine.

    python -m benchmarks.codec_speed [--mib 5 64] [--threads 1] [--repeats 7] [--compressors sign int4 sparse_topk]

For each size it times ``encode`` and ``decode`` of every compressor and a copy of the float32 input into a buffer
allocated once (the memcpy bound: the least a pass over the data costs), medians over ``--repeats`` runs after one
warm-up, and prints ms per MiB of float32 input and the ratio to the memcpy. One thread by default, as each training
rank has here. ``decode`` allocates its output afresh (above glibc's mmap threshold it is page-faulted in again);
``decode_into`` writes into a buffer allocated once, as the streamed exchanges do, and is what the ratio uses.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch

from lightning_localsgd.compression.compressors import NoCompression, ScaledSign, TopK
from lightning_localsgd.compression.quantizers import Int4Quantizer, Int8Quantizer, SparseTopK

# The per-step exchanges' compressors, then DiLoCo's pseudo-gradient compressors (at their defaults).
COMPRESSORS: dict[str, Callable[[], object]] = {
    "sign": ScaledSign,
    "topk 1%": lambda: TopK(0.01),
    "none": NoCompression,
    "int8": Int8Quantizer,
    "int4": Int4Quantizer,
    "sparse_topk": SparseTopK,
}


def median_seconds(fn: Callable[[], object], repeats: int) -> float:
    fn()  # warm-up: first-touch page faults and lazily built tables out of the measurement
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mib", type=float, nargs="+", default=[5.0, 64.0], help="float32 input sizes in MiB")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--compressors", nargs="+", default=list(COMPRESSORS), choices=list(COMPRESSORS))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    compressors = {name: COMPRESSORS[name]() for name in args.compressors}
    print(f"threads {args.threads}, medians of {args.repeats}; ms per MiB of float32 input (x: ratio to memcpy)")
    print("| MiB | compressor | encode | decode | decode_into | encode + decode_into | memcpy | ratio to memcpy |")
    print("|---:|---|---:|---:|---:|---:|---:|---:|")
    for mib in args.mib:
        numel = int(mib * 2**20) // 4
        x = torch.randn(numel, generator=torch.Generator().manual_seed(0))
        target = torch.empty_like(x)
        copy = median_seconds(lambda src=x, dst=target: dst.copy_(src), args.repeats) * 1e3 / mib
        for name, compressor in compressors.items():
            payload = compressor.encode(x)
            enc = median_seconds(lambda c=compressor, v=x: c.encode(v), args.repeats) * 1e3 / mib
            dec = median_seconds(lambda c=compressor, p=payload, n=numel: c.decode(p, n), args.repeats) * 1e3 / mib
            into = median_seconds(lambda c=compressor, p=payload, o=target: c.decode_into(p, o), args.repeats)
            into *= 1e3 / mib
            ratio = (enc + into) / copy
            print(
                f"| {mib:g} | {name} | {enc:.3f} | {dec:.3f} | {into:.3f} | {enc + into:.3f} | {copy:.3f} | "
                f"{ratio:.1f}x |"
            )


if __name__ == "__main__":
    main()
