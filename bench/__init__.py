"""Benchmarks: `python -m bench.run` runs every `bench/bench_*.py` module (see bench/run.py).

Shared pieces (a production-mode app on a throwaway database, worker and web processes, a
live-socket client, percentiles, machine info) live in bench/common.py.
"""
