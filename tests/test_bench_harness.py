"""Tests of the benchmark harness itself (statistics, record schema, table, registry, a tiny run).

Fast (a few seconds, most of it the profiler's one-time start) and independent of masklm_kernels:
the timed op is `torch.add`.
"""
from __future__ import annotations

import json
import random
import time

import numpy as np
import pytest
import torch

from benchmarks import harness
from benchmarks.__main__ import parse_args
from benchmarks.harness import Case, RunOptions
from benchmarks.suites import load_suite, suite_names


# ------------------------------------------------------------------------------------------ statistics
def test_quantiles_on_known_numbers():
    assert harness.summarize([5.0, 1.0, 4.0, 2.0, 3.0]) == {"time_ms": 3.0, "time_ms_min": 1.0, "time_ms_iqr": 2.0}
    s = harness.summarize([4.0, 1.0, 3.0, 2.0])
    assert s["time_ms"] == 2.5 and s["time_ms_min"] == 1.0
    assert s["time_ms_iqr"] == pytest.approx(3.25 - 1.75)
    assert harness.summarize([7.0]) == {"time_ms": 7.0, "time_ms_min": 7.0, "time_ms_iqr": 0.0}


def test_quantile_matches_numpy_linear():
    rng = random.Random(3)
    for n in (2, 3, 10, 101):
        xs = [rng.uniform(0.1, 9.0) for _ in range(n)]
        for q in (0.0, 0.25, 0.5, 0.75, 1.0):
            assert harness.quantile(xs, q) == pytest.approx(float(np.percentile(xs, 100 * q)), rel=1e-12)
    with pytest.raises(ValueError):
        harness.quantile([], 0.5)


# ------------------------------------------------------------------------------------ records, table
ENV = {"device_kind": "cpu", "cpu": "Test CPU", "gpu": None, "torch": "2.x", "triton": None,
       "python": "3.11.0", "git_sha": None, "date": "2026-01-01T00:00:00+00:00", "threads": 2,
       "load_avg_1m": 0.5}


def _case(contender: str, **kw) -> Case:
    return Case(op="add", contender=contender, case={"n": 4, "mode": "x"}, fn=lambda: None, **kw)


def test_record_schema_and_types():
    case = _case("ours", tokens=1000, bytes_moved=4000,
                 peers={"base": ("add", "peer", {"n": 4, "mode": "x"})})
    rec = harness.make_record("toy", case, ENV, times_ms=[1.0, 2.0, 3.0], warmup=1,
                              peak=(123, "method"), copy_gbps=10.0)
    assert set(rec) == set(harness.RECORD_KEYS)
    assert rec["suite"] == "toy" and rec["op"] == "add" and rec["contender"] == "ours"
    assert rec["case"] == {"n": 4, "mode": "x"} and rec["status"] == "ok" and rec["reason"] is None
    for key in ("time_ms", "time_ms_min", "time_ms_iqr", "tokens_per_s", "gb_per_s", "pct_of_copy_bw"):
        assert isinstance(rec[key], float), key
    assert rec["repeats"] == 3 and rec["peak_mem_bytes"] == 123 and rec["threads"] == 2
    assert rec["tokens_per_s"] == pytest.approx(1000 / 2e-3)
    assert rec["gb_per_s"] == pytest.approx(4000 / 2e-3 / 1e9)
    assert rec["pct_of_copy_bw"] == pytest.approx(100 * rec["gb_per_s"] / 10.0)
    assert rec["device"] == "Test CPU" and rec["device_type"] == "cpu"
    assert rec["peers"] == {"base": {"op": "add", "contender": "peer", "case": {"n": 4, "mode": "x"}}}
    json.loads(json.dumps(rec))  # serialisable as is

    skipped = harness.make_record("toy", _case("gone", skip="no reason needed"), ENV, status="skipped",
                                  reason="not installed")
    assert set(skipped) == set(harness.RECORD_KEYS)
    assert skipped["status"] == "skipped" and skipped["reason"] == "not installed" and skipped["time_ms"] is None


def test_speedups_and_table():
    peer = harness.make_record("toy", _case("peer"), ENV, times_ms=[4.0, 4.0, 4.0])
    ours = harness.make_record("toy", _case("ours", peers={"base": ("add", "peer", {"mode": "x", "n": 4}),
                                                           "missing": ("add", "nope", {})}),
                               ENV, times_ms=[1.0, 1.0, 1.0])
    gone = harness.make_record("toy", _case("gone"), ENV, status="skipped", reason="library absent")
    records = [peer, ours, gone]
    harness.add_speedups(records)
    assert ours["speedup_over_peer"] == {"base": pytest.approx(4.0)}  # key order of `case` irrelevant
    assert peer["speedup_over_peer"] == {}
    table = harness.format_table(records).splitlines()
    assert table[0].split()[:3] == ["op", "contender", "case"] and "speedup over peer" in table[0]
    assert len(table) == 2 + len(records)
    assert "4.00x vs base" in table[3] and "4.000" in table[2]
    assert "SKIPPED: library absent" in table[4]


# -------------------------------------------------------------------------------------------- timing
def test_setup_is_not_timed():
    case = Case(op="noop", contender="x", case={}, fn=lambda t: t, setup=lambda: (time.sleep(0.02),))
    times = harness.time_case(case, repeats=3, warmup=1, budget_s=5.0)
    assert len(times) == 3 and max(times) < 10.0


def test_budget_stops_early_but_keeps_min_repeats():
    case = Case(op="sleep", contender="x", case={}, fn=lambda: time.sleep(0.01))
    times = harness.time_case(case, repeats=1000, warmup=1, budget_s=0.001)
    assert len(times) == harness.MIN_REPEATS and min(times) >= 9.0


# ------------------------------------------------------------------------------------------ registry
def test_suite_registry():
    assert "masking" in suite_names()
    assert callable(load_suite("masking").cases)
    with pytest.raises(ValueError, match="unknown suite"):
        load_suite("no_such_suite")
    args = parse_args(["masking", "--quick", "--device", "cpu", "--repeats", "3"])
    assert args.suites == ["masking"] and args.quick and args.repeats == 3
    with pytest.raises(SystemExit):
        parse_args(["no_such_suite"])


def test_runs_write_locally_unless_asked_and_sizes_never_mix(capsys):
    """A plain run never touches the committed results; --update-results writes there, full size only."""
    from benchmarks import harness

    assert parse_args(["masking"]).out == harness.LOCAL_OUT / "full"
    assert parse_args(["masking", "--quick"]).out == harness.LOCAL_OUT / "quick"
    assert parse_args(["--size", "smoke"]).out == harness.LOCAL_OUT / "smoke"
    assert parse_args(["masking", "--update-results"]).out == harness.DEFAULT_OUT
    assert parse_args(["masking", "--out", "/tmp/x"]).out.as_posix() == "/tmp/x"
    for bad, says in ((["--quick", "--update-results"], "full-size runs only"),
                      (["--update-results", "--out", "/tmp/x"], "takes no --out")):
        with pytest.raises(SystemExit):
            parse_args(bad)
        assert says in capsys.readouterr().err


def test_load_above_the_cores_is_reported(monkeypatch):
    import os

    from benchmarks import __main__ as runner

    monkeypatch.setattr(os, "cpu_count", lambda: 2)
    monkeypatch.setattr(os, "getloadavg", lambda: (5.5, 1.0, 1.0))
    assert "load average 5.5 is above the machine's 2 cores" in runner.load_warning()
    monkeypatch.setattr(os, "getloadavg", lambda: (1.5, 1.0, 1.0))
    assert runner.load_warning() is None


# ---------------------------------------------------------------------------------------- end to end
def test_tiny_suite_end_to_end(tmp_path):
    n = 1 << 16
    a, b = torch.rand(n), torch.rand(n)
    cases = [
        Case(op="add", contender="torch", case={"n": n}, fn=torch.add, setup=lambda: (a, b),
             tokens=n, bytes_moved=3 * 4 * n),
        Case(op="add", contender="torch_out_of_place_twice", case={"n": n}, fn=lambda: (a + b) + b,
             tokens=n, peers={"single": ("add", "torch", {"n": n})}),
        Case(op="add", contender="absent_peer", case={"n": n}, skip="peer not installed"),
        Case(op="add", contender="broken", case={"n": n}, fn=lambda: torch.add(a, torch.rand(3))),
    ]
    options = RunOptions(repeats=5, warmup=1, budget_s=0.5, out_dir=tmp_path)
    records = harness.run_suite("toy", cases, options, device="cpu")
    path = harness.results_path(tmp_path, "toy", "cpu")
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    assert lines == records and [r["status"] for r in lines] == ["ok", "ok", "skipped", "error"]
    for r in lines:
        assert set(r) == set(harness.RECORD_KEYS)
        assert r["suite"] == "toy" and r["device_kind"] == "cpu" and r["torch"] == torch.__version__
    ok = lines[0]
    assert ok["time_ms"] > 0 and 1 <= ok["repeats"] <= 5 and ok["tokens_per_s"] > 0
    # the output tensor (n float32) is allocated by torch's CPU allocator during the call
    assert ok["peak_mem_bytes"] >= 4 * n and ok["peak_mem_method"].startswith("torch_profiler")
    assert ok["copy_gb_per_s"] > 0 and ok["pct_of_copy_bw"] > 0
    assert lines[1]["speedup_over_peer"]["single"] > 0
    assert lines[2]["reason"] == "peer not installed"
    assert lines[3]["reason"].startswith("RuntimeError")
    harness.run_suite("toy", cases[2:3], options, device="cpu")  # appends, never truncates
    assert len(path.read_text().splitlines()) == len(cases) + 1
    # files written before the timed thing's field was named "contender" (it was "backend") still read
    old = {**lines[1], "peers": {"single": {"op": "add", "backend": "torch", "case": {"n": n}}}}
    old = {("backend" if k == "contender" else k): v for k, v in old.items()}
    path.write_text(json.dumps(old) + "\n")
    (back,) = harness.read_jsonl(path)
    assert back == lines[1] and list(back) == list(lines[1])
