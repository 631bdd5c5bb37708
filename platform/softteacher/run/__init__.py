"""One training run, from its spec to its result: ``run(spec) -> RunResult``.

The sweep, the ablations, the benchmarks and the tests all start runs here; ``tune/`` only
builds grids of specs and drives Ray Tune over them.
"""
