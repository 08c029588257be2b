"""The benchmark product around the harness: roofline and memory ratios, optional peers recorded as
skipped, the summary table, the Markdown report (and plots), and `benchmarks.compare`, on small made-up
records whose answers are known."""
from __future__ import annotations

import json

import pytest

from benchmarks import compare, harness, report
from benchmarks.harness import Case

ENV = {"device_kind": "cpu", "cpu": "Test CPU", "gpu": None, "torch": "2.x", "triton": "3.x",
       "python": "3.11.0", "git_sha": "abcdef0123", "date": "2026-01-01T00:00:00+00:00", "threads": 2,
       "load_avg_1m": 0.5}
SHAPE = {"n": 4, "mode": "x"}


def _rec(contender, ms=None, mem=None, iqr=0.0, op="add", suite="toy", status=None, reason=None, env=ENV, **kw):
    case = Case(op=op, contender=contender, case=dict(SHAPE), fn=lambda: None, **kw)
    if ms is None:
        return harness.make_record(suite, case, env, status=status or "skipped", reason=reason or "absent")
    rec = harness.make_record(suite, case, env, times_ms=[ms - iqr / 2, ms, ms + iqr / 2], peak=(mem, "m"),
                              copy_gbps=kw.get("bytes_moved") and 100.0, peak_tflops=kw.get("flops") and 10.0)
    return rec


def test_roofline_percentage_takes_the_binding_ceiling():
    # 1e10 flops at 10 TFLOP/s = 1 ms; 1e7 bytes at 100 GB/s = 0.1 ms: compute binds, 1 ms of 4 ms = 25%
    rec = _rec("ours", ms=4.0, flops=1e10, bytes_moved=1e7)
    assert rec["pct_of_roofline"] == pytest.approx(25.0) and rec["peak_tflops"] == 10.0
    mem_bound = _rec("ours", ms=4.0, flops=1e8, bytes_moved=2e8)  # 0.01 ms compute, 2 ms memory
    assert mem_bound["pct_of_roofline"] == pytest.approx(50.0)
    assert _rec("ours", ms=4.0)["pct_of_roofline"] is None  # no work stated: no roofline claimed


def test_memory_ratio_and_speedup_over_peers():
    peers = {"p": ("add", "peer", SHAPE), "gone": ("add", "gone", SHAPE)}
    records = [_rec("peer", ms=6.0, mem=400), _rec("gone"), _rec("ours", ms=2.0, mem=100, peers=peers)]
    harness.add_speedups(records)
    ours = records[-1]
    assert ours["speedup_over_peer"] == {"p": pytest.approx(3.0)}
    assert ours["mem_ratio_vs_peer"] == {"p": pytest.approx(0.25)}


@pytest.mark.parametrize("device,installed,expect", [
    ("cpu", True, "runs on CUDA only"), ("cuda", False, "is not installed (pip install x-pkg)"), ("cuda", True, None)])
def test_missing_peer_reasons(device, installed, expect, monkeypatch):
    monkeypatch.setattr(harness.importlib.util, "find_spec", lambda name: object() if installed else None)
    why = harness.missing_peer("x_mod", "x-pkg", device)
    assert why == expect if expect is None else expect in why


def test_optional_peers_of_the_suites_are_recorded_as_skipped_on_cpu():
    from benchmarks.suites import losses

    peers, skipped = losses._peers("cpu")
    assert "liger" in skipped and "CUDA" in skipped["liger"] and "liger" not in peers
    assert {"full_logits", "gather_ce"} <= peers.keys()


def test_summary_rows_keep_peers_that_did_not_run():
    peers = {"p": ("add", "peer", SHAPE), "gone": ("add", "gone", SHAPE), "never": ("add", "never", SHAPE)}
    records = [_rec("peer", ms=6.0, mem=400), _rec("gone", reason="gone is not installed"),
               _rec("ours", ms=2.0, mem=100, peers=peers, flops=1e10)]
    harness.add_speedups(records)
    rows = {r[4]: r for r in report.summary_rows(records)}
    assert rows.keys() == {"p", "gone", "never"}
    assert rows["p"][5:] == ["2.000", "6.000", "3.00x", "0.25x", "50.0"]
    assert rows["gone"][7] == "peer skipped: gone is not installed"
    assert rows["never"][7] == "peer not run"
    text = report.text_table(report.SUMMARY_HEADER, list(rows.values())).splitlines()
    assert text[0].startswith("suite") and len(text) == 5


def test_report_is_written_per_device_kind(tmp_path):
    peers = {"p": ("add", "peer", SHAPE), "gone": ("add", "gone", SHAPE)}
    recs = [_rec("peer", ms=6.0, mem=400), _rec("gone", reason="needs a | pipe"),
            _rec("ours", ms=2.0, mem=100, peers=peers)]
    harness.add_speedups(recs)
    harness.write_jsonl([_rec("ours", ms=9.0, peers=peers)] + recs, harness.results_path(tmp_path, "toy", "cpu"))
    gpu_env = dict(ENV, device_kind="some-gpu", gpu="Some GPU")
    harness.write_jsonl([_rec("ours", ms=1.0, env=gpu_env)], harness.results_path(tmp_path, "toy", "some-gpu"))
    path = report.write_report("cpu", tmp_path, plots=False)
    text = path.read_text()
    assert path.name == "REPORT-cpu.md" and "## toy" in text and "Test CPU" in text and "Some GPU" not in text
    assert "| add | n=4 mode=x | ours | p | 2.000 | 6.000 | 3.00x | 0.25x | - |" in text  # newest record of ours
    assert "9.000" not in text
    assert "`gone` n=4 mode=x: skipped, needs a | pipe" in text
    with pytest.raises(FileNotFoundError):
        report.write_report("tpu", tmp_path, plots=False)


def test_a_report_without_matplotlib_says_its_plots_are_missing(tmp_path, monkeypatch):
    harness.write_jsonl([_rec("ours", ms=2.0)], harness.results_path(tmp_path, "toy", "cpu"))
    monkeypatch.setattr(report, "make_plots", lambda *a: None)  # what it returns when matplotlib is missing
    text = report.write_report("cpu", tmp_path).read_text()
    assert "Plots not drawn: matplotlib is not installed" in text


def test_plots_of_every_suite(tmp_path):
    pytest.importorskip("matplotlib")
    from benchmarks import plot

    env = dict(ENV, device_type="cpu")
    records = {"attention": [], "losses": [], "e2e": []}
    for S in (128, 256):
        for contender, ms in (("ours", 1.0), ("sdpa", 2.0)):
            records["attention"].append(dict(env, op="fused_attention", contender=contender, time_ms=ms * S,
                                             case={"S": S, "D": 64, "mask": "causal", "mode": "fwd"}))
    for V in (100, 200):
        records["losses"].append(dict(env, op="fused_linear_cross_entropy", contender="ours", time_ms=V / 10,
                                      peak_mem_bytes=V << 20, case={"V": V, "labelled": 0.15, "mode": "fwd_bwd"}))
    records["e2e"] = [dict(env, op="e2e_train_step", contender=b, time_ms=10.0, tokens_per_s=t, peak_mem_bytes=1 << 20,
                           case={"B": 2, "mode": "train_step"}) for b, t in (("hf", 100.0), ("ours", 300.0))]
    written = [p.name for s, recs in records.items() for p in plot.plot_suite(s, recs, tmp_path)]
    assert written == ["attention-cpu-causal.png", "losses-cpu-0.15.png", "e2e-cpu.png"]
    assert all((tmp_path / name).stat().st_size > 1000 for name in written)


# ------------------------------------------------------------------------------------------ compare
def test_compare_orders_regressions_first_and_ignores_noise():
    old = [_rec("fast", ms=1.0), _rec("slow", ms=1.0), _rec("slower", ms=1.0), _rec("noisy", ms=1.0, iqr=1.0),
           _rec("better", ms=2.0), _rec("breaks", ms=1.0), _rec("fixed"), _rec("fat", ms=1.0, mem=100),
           _rec("removed", ms=1.0)]
    new = [_rec("fast", ms=1.01), _rec("slow", ms=1.2), _rec("slower", ms=2.0), _rec("noisy", ms=1.3, iqr=1.0),
           _rec("better", ms=1.0), _rec("breaks", status="error", reason="RuntimeError: boom"), _rec("fixed", ms=1.0),
           _rec("fat", ms=1.0, mem=200), _rec("added", ms=1.0)]
    result = compare.compare(old, new, threshold=0.05)
    kinds = [(c.kind, c.contender) for c in result["changes"]]
    assert kinds == [("broken", "breaks"), ("regression", "slower"), ("regression", "slow"), ("memory", "fat"),
                     ("improvement", "better"), ("fixed", "fixed")]
    assert result["same"] == 2  # "fast" (under the threshold) and "noisy" (inside the IQRs)
    assert len(result["added"]) == 1 and len(result["removed"]) == 1 and result["provenance"] == {}
    text = compare.format_comparison(result, "a", "b")
    assert text.index("BROKEN") < text.index("REGRESSION") < text.index("IMPROVEMENT")
    assert "1.000 -> 2.000 ms (2.00x time" in text and "RuntimeError: boom" in text


def test_compare_cli_warns_across_machines_and_gates(tmp_path, capsys):
    a, b = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    harness.write_jsonl([_rec("x", ms=1.0)], a)
    harness.write_jsonl([_rec("x", ms=3.0, env=dict(ENV, torch="9.9"))], b)
    assert compare.main([str(a), str(b)]) == 0
    out = capsys.readouterr().out
    assert "WARNING: different machines or versions (torch: 2.x -> 9.9)" in out and "REGRESSION (1)" in out
    assert compare.main([str(a), str(b), "--fail-on-regression"]) == 1
    assert compare.main([str(a), str(a), "--fail-on-regression"]) == 0
    with pytest.raises(SystemExit):
        compare.main([str(a), str(tmp_path / "missing.jsonl")])
    json.loads(a.read_text().splitlines()[0])
