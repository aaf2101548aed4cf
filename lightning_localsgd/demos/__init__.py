"""Ready-made workloads for the demo, the examples and the benchmarks (no download needed)."""
