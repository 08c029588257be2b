"""pytest options for the pytest-benchmark cases (`pytest benchmarks --benchmark-only`).

The cases are the suites' own `cases(device, size)`, so the runner and pytest time the same list.
These options only exist when pytest loads this directory; the repository's default `testpaths`
(`tests/`) never collects the benchmarks.
"""
from __future__ import annotations


def pytest_addoption(parser):
    group = parser.getgroup("masklm benchmarks")
    group.addoption("--bench-device", choices=["cpu", "cuda", "auto"], default="auto",
                    help="device of the benchmark cases (auto: cuda when available)")
    group.addoption("--bench-full", action="store_true",
                    help="all shapes (default: the quick shapes, as `python -m benchmarks --quick`)")
