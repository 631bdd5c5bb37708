"""The platform's benchmarks as library functions, each returning its table (header, rows)
and its JSON records; ``experiments/benchmark.py`` only parses options and writes them.

``prepare`` makes what a step is timed on (config, shards, a trained teacher); ``step`` times
and profiles the training step; ``platform_cost`` measures the Ray Data streams and the loop
with and without Ray; ``curve`` trains the supervised curve.
"""
