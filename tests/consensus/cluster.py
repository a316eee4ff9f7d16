"""In-process 3-node clusters of the cp service on 127.0.0.1 with free ports, for tests.

The helpers live in `bench/_inproc.py` (benchmarks use them too and must not import the
test tree); this module keeps the name the tests import.
"""
from __future__ import annotations

from bench._inproc import FAST, Cluster, make_configs

__all__ = ["FAST", "Cluster", "make_configs"]
