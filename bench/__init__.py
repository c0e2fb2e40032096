"""Benchmarks and demos; each prints a table and, as its last line, one JSON object."""

import os

# The benches share small, busy CPUs: let idle OpenMP threads sleep rather than spin (the
# inference service does the same, see api/inference/runtime.py), so the bare model and the
# services are measured under one setting. Only effective before torch is imported.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
