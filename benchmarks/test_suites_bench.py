"""Every suite through pytest-benchmark: `pytest benchmarks --benchmark-only [--bench-full]`.

Parametrised from each registered suite's `cases`, the list `python -m benchmarks <suite>` runs;
cases the suite marks as skipped (no transformers, a backend unavailable) are skipped with the reason.
Cases are grouped per suite and shape, so the comparison table lines up ours and the peers'.
"""
from __future__ import annotations

import time

import pytest

pytest.importorskip("pytest_benchmark")

from benchmarks.__main__ import resolve_device  # noqa: E402
from benchmarks.harness import Case, case_str  # noqa: E402
from benchmarks.suites import load_suite, suite_names  # noqa: E402

ROUND_BUDGET_S = 1.0  # target seconds of timed rounds per case


def pytest_generate_tests(metafunc):
    if "bench_case" in metafunc.fixturenames:
        device = resolve_device(metafunc.config.getoption("--bench-device"))
        size = "full" if metafunc.config.getoption("--bench-full") else "quick"
        cases = [(name, c) for name in suite_names() for c in load_suite(name).cases(device, size)]
        metafunc.parametrize("bench_case", [c for _, c in cases], ids=[f"{n}-{c.label}" for n, c in cases])


def test_suite_case(benchmark, bench_case: Case):
    if bench_case.skip:
        pytest.skip(bench_case.skip)
    fn = bench_case.synced_fn()
    shape = {k: v for k, v in bench_case.case.items() if k != "mode"}
    benchmark.group = f"{bench_case.op} {case_str(shape)}"
    benchmark.extra_info.update(op=bench_case.op, contender=bench_case.contender, case=bench_case.case,
                                tokens=bench_case.tokens, device=bench_case.device)
    # one untimed call (warm-up) also sizes the number of rounds to the time budget
    t0 = time.perf_counter()
    fn(*bench_case.call_args())
    rounds = int(min(50, max(3, ROUND_BUDGET_S / max(time.perf_counter() - t0, 1e-6))))
    benchmark.pedantic(fn, setup=lambda: (bench_case.call_args(), {}), rounds=rounds,
                       warmup_rounds=1, iterations=1)
