"""Benchmarks of masklm_kernels against what a user would otherwise use.

Run `python -m benchmarks [suite ...] [--quick] [--device cpu|cuda|auto]`; results are appended to
`benchmarks/results/<suite>-<device kind>.jsonl`. Suites live in `benchmarks/suites/` (one module per
suite, each exposing `cases(device, quick)`); the shared timing and reporting is in `harness.py`.
"""
