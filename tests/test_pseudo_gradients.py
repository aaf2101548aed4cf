"""DiLoCo's compressed pseudo-gradients: error feedback carries exactly what was not sent, and every rank reads the
same mean (expected values from the definitions, written here)."""

from __future__ import annotations

import pytest
import torch

from lightning_localsgd.algorithms.pseudo_gradients import PseudoGradientCodec
from lightning_localsgd.compression import make_compressor


def random_rounds(rounds: int, numel: int, seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(numel, generator=g), torch.randn(numel, generator=g)) for _ in range(rounds)]


@pytest.mark.parametrize(("name", "options"), [("sparse_topk", {"k": 5, "chunk_numel": 64}), ("int4", {})])
def test_error_feedback_carries_what_was_not_sent(name, options):
    """decay 1: after any number of rounds, what was sent plus the error kept is every pseudo-gradient, summed."""
    codec = PseudoGradientCodec(name, options, error_feedback=True)
    decoder = make_compressor(name, **options)
    numel = 200
    error = torch.zeros(numel)
    sent, deltas = torch.zeros(numel, dtype=torch.float64), torch.zeros(numel, dtype=torch.float64)
    for theta, x in random_rounds(6, numel):
        payload = codec.encode([theta], [x], [error])
        sent += decoder.decode(payload, numel).double()
        deltas += (theta - x).double()
    torch.testing.assert_close(sent + error.double(), deltas, atol=1e-5, rtol=0)
    assert error.abs().max() > 0.1  # something was held back


def test_with_a_decay_the_error_is_the_decayed_sum_of_what_was_not_sent():
    codec = PseudoGradientCodec("sparse_topk", {"k": 3, "chunk_numel": 32}, error_decay=0.5)
    decoder = make_compressor("sparse_topk", k=3, chunk_numel=32)
    numel = 64
    error, expected = torch.zeros(numel), torch.zeros(numel)
    for theta, x in random_rounds(4, numel, seed=1):
        payload = codec.encode([theta], [x], [error])
        expected = 0.5 * expected + (theta - x)
        expected = expected - decoder.decode(payload, numel)
    torch.testing.assert_close(error, expected, atol=1e-6, rtol=0)


def test_the_mean_of_payloads_is_their_decoded_sum_over_the_ranks_per_bucket():
    codec = PseudoGradientCodec("int8", {"block_numel": 16})
    decoder = make_compressor("int8", block_numel=16)
    g = torch.Generator().manual_seed(2)
    sizes = [40, 7]  # two buckets in one fragment: payloads back to back
    ranks = []
    for _ in range(3):
        thetas = [torch.randn(n, generator=g) for n in sizes]
        xs = [torch.randn(n, generator=g) for n in sizes]
        ranks.append((thetas, xs))
    payloads = [codec.encode(thetas, xs, []) for thetas, xs in ranks]
    means = codec.mean(payloads, sizes)
    first = decoder.payload_bytes(sizes[0])
    for b, n in enumerate(sizes):
        parts = [p[:first] if b == 0 else p[first:] for p in payloads]
        want = sum(decoder.decode(part, n) for part in parts) / 3
        torch.testing.assert_close(means[b], want, atol=1e-7, rtol=0)
        exact = sum(thetas[b] - xs[b] for thetas, xs in ranks) / 3
        assert (means[b] - exact).abs().max() < 0.05  # int8: close to the uncompressed mean


def test_bad_codec_arguments_are_refused():
    with pytest.raises(ValueError, match="deterministic"):
        PseudoGradientCodec("qsgd")
    with pytest.raises(ValueError, match="`error_decay` must be a number in \\(0, 1\\]"):
        PseudoGradientCodec("sparse_topk", error_decay=1.5)
    with pytest.raises(ValueError, match="only applies with `error_feedback=True`"):
        PseudoGradientCodec("int4", error_decay=0.9)
    with pytest.raises(ValueError, match="`compressor_options` must be a mapping"):
        PseudoGradientCodec("int4", [4096])
    assert PseudoGradientCodec("sparse_topk").error_feedback and not PseudoGradientCodec("int8").error_feedback
