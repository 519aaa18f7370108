"""Small servable models, a `vllm serve` launcher and the demo: what `make demo`, the tests and the
benchmarks build on (no downloads; random weights, written to a folder)."""
