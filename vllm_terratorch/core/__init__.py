"""The vLLM-free core: a model folder's config, weights and network, and how a batch runs through it.

Nothing here imports vLLM (a unit test imports the package with vLLM absent), so the CLI's checks,
the benchmarks' baselines and tests can build and run a model exactly as the engine does.
"""
