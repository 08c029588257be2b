"""The training command (python -m masklm_kernels.train): smoke runs of both tasks with a falling loss,
exact resumption on CPU, the summary JSON, --compare, and argument errors. A small text file keeps the
corpus and tokenizer fast (the default corpus is the standard library's docstrings)."""
from __future__ import annotations

import json

import pytest
import torch

from masklm_kernels import train as cli
from masklm_kernels.training.loop import Args, train

pytestmark = pytest.mark.usefixtures("tokenizer_cache")


def _args(corpus, **kw):
    base = dict(steps=12, batch_size=8, seq_len=32, model="tiny", text_file=corpus, vocab_size=200, lr=3e-3,
                log_every=100)
    return Args(**{**base, **kw})


@pytest.mark.parametrize("task", ["mlm", "mass", "t5", "bart"])
def test_training_runs_and_the_loss_falls(task, corpus, capsys):
    summary = train(_args(corpus, task=task, steps=40))
    assert summary["final_loss"] < summary["first_loss"] - 0.5, summary
    assert summary["steps"] == 40 and summary["implementation"] == "fused" and summary["tokens_per_s"] > 0
    assert "step 40/40" in capsys.readouterr().out


@pytest.mark.parametrize("model", ["modern-tiny", "mosaic-tiny"])
def test_modern_and_mosaic_styles_train(model, corpus):
    """BertMLM built ModernBERT-style (RoPE, local windows of 8 over 32-token rows, a global layer every
    third) or MosaicBERT-style (ALiBi) from --model: the loss falls as BERT-style's does."""
    summary = train(_args(corpus, model=model, steps=40))
    assert summary["final_loss"] < summary["first_loss"] - 0.5, summary
    assert not any("position_embeddings" in name for name in summary["state"])


def test_adaptive_masking_trains_and_resumes_exactly(corpus, tmp_path):
    """--adaptive-masking: the rates follow the model's per-token loss (statistics folded every step), the
    loss falls, and the statistics are run state: a resumed run equals the uninterrupted one."""
    ckpt = str(tmp_path / "half.pt")
    full = train(_args(corpus, steps=10, adaptive_masking=True))
    half = train(_args(corpus, steps=10, stop_after=4, save=ckpt, adaptive_masking=True))
    saved = torch.load(ckpt, weights_only=True)
    assert saved["format"] == "masklm_kernels-checkpoint"
    resumed = train(_args(corpus, steps=10, resume=ckpt, adaptive_masking=True))
    assert half["steps"] == 4 and resumed["final_loss"] == full["final_loss"]
    plain = train(_args(corpus, steps=10))
    assert plain["final_loss"] != full["final_loss"], "adaptive rates changed nothing"
    with pytest.raises(Exception, match="adaptive_masking"):
        train(_args(corpus, steps=10, resume=ckpt))  # resuming without it: another run
    longer = train(_args(corpus, steps=40, adaptive_masking=True))
    assert longer["final_loss"] < longer["first_loss"] - 0.5, longer


def test_resume_reproduces_the_uninterrupted_run(corpus, tmp_path):
    ckpt = str(tmp_path / "half.pt")
    full = train(_args(corpus, steps=10))
    half = train(_args(corpus, steps=10, stop_after=4, save=ckpt))
    assert half["steps"] == 4
    resumed = train(_args(corpus, steps=10, resume=ckpt))
    assert resumed["final_loss"] == full["final_loss"] and resumed["first_loss"] == full["first_loss"]
    for name, value in full["state"].items():
        assert torch.equal(resumed["state"][name], value), name


def test_cli_summary_json_and_compare(corpus, tmp_path, capsys):
    out = tmp_path / "summary.json"
    assert cli.main(["--steps", "4", "--batch-size", "4", "--seq-len", "32", "--text-file", corpus, "--vocab-size",
                     "200", "--device", "cpu", "--summary-json", str(out), "--compare"]) == 0
    summary = json.loads(out.read_text())
    for key in ("first_loss", "final_loss", "eval_loss", "tokens_per_s", "steps", "device", "implementation",
                "speedup", "loss_difference", "baseline_loss", "elapsed_s"):
        assert key in summary, key
    assert "fused vs reference" in capsys.readouterr().out


def test_cli_summary_line_can_be_judged(corpus, tmp_path, capsys):
    """The last line of a run: elapsed time, held-out loss beside the uniform baseline ln V, the checkpoint."""
    ckpt = tmp_path / "run.pt"
    assert cli.main(["--steps", "2", "--batch-size", "4", "--seq-len", "32", "--text-file", corpus, "--vocab-size",
                     "200", "--device", "cpu", "--save", str(ckpt)]) == 0
    line = capsys.readouterr().out.strip().splitlines()[-1]
    assert "2 steps in" in line and "held-out loss" in line and "ln V = " in line, line
    assert f"checkpoint written to {ckpt}" in line and ckpt.is_file(), line


def test_cli_corpus_errors_end_in_one_line(tmp_path, capsys):
    small = tmp_path / "small.txt"
    small.write_text("one paragraph\nanother one\n")
    assert cli.main(["--steps", "1", "--text-file", str(small), "--device", "cpu"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("masklm_kernels.train: error:") and "at least 20 are needed" in err
    assert len(err.splitlines()) == 1 and "Traceback" not in err


def test_cli_argument_errors(corpus):
    with pytest.raises(SystemExit):
        cli.parse(["--steps", "0"])
    with pytest.raises(SystemExit):
        cli.parse(["--task", "gpt"])
    with pytest.raises(SystemExit):
        cli.parse(["--task", "mass", "--model", "modern-small"])
    with pytest.raises(SystemExit):
        cli.parse(["--task", "mass", "--adaptive-masking"])
    with pytest.raises(SystemExit):
        cli.parse(["--task", "t5", "--model", "mosaic-tiny"])
    assert cli.parse(["--task", "t5"]).task == "t5"
    assert cli.parse(["--adaptive-masking"]).adaptive_masking
    assert cli.parse(["--model", "modern-small"]).model == "modern-small"
    if not torch.cuda.is_available():
        with pytest.raises(SystemExit):
            cli.parse(["--device", "cuda"])


@pytest.mark.skipif(not torch.distributed.is_available() or not torch.distributed.is_gloo_available(),
                    reason="torch.distributed with gloo is not available")
@pytest.mark.parametrize("task", ["mlm", "mass", "t5", "mlm_adaptive"])
def test_torchrun_two_processes_match_one(task, corpus, tmp_path):
    """DDP on CPU (gloo): with masks keyed by global sample ids and the loss scaled to the global mean, the
    2-process run's step-1 loss is the 1-process run's, and so are the later steps (up to summation order).
    Attention dropout is on: its masks are keyed by the global sample ids too (hidden dropout, torch's own
    per-process RNG, is off). With adaptive masking the per-id statistics are all-reduced every step, so
    the rates of later steps are the one-process run's too."""
    adaptive = task == "mlm_adaptive"
    task = "mlm" if adaptive else task
    import os
    import subprocess
    import sys

    out = tmp_path / "summary.json"
    argv = ["--task", task, "--steps", "3", "--batch-size", "8", "--seq-len", "32", "--model", "tiny", "--text-file",
            corpus, "--vocab-size", "200", "--lr", "3e-3", "--dropout", "0", "--attention-dropout", "0.1",
            "--device", "cpu", "--summary-json", str(out)] + (["--adaptive-masking"] if adaptive else [])
    env = dict(os.environ, MASKLM_CACHE=str(tmp_path / "cache"), OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           "-m", "masklm_kernels.train", *argv], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    two = json.loads(out.read_text())
    one = train(_args(corpus, task=task, steps=3, dropout=0.0, attention_dropout=0.1, adaptive_masking=adaptive))
    assert two["processes"] == 2 and one["processes"] == 1
    assert two["first_loss"] == pytest.approx(one["first_loss"], rel=1e-6)
    assert two["final_loss"] == pytest.approx(one["final_loss"], rel=1e-5)
    assert proc.stdout.count("step 3/3") == 1  # only rank 0 logs


def test_batch_must_split_across_processes(corpus, monkeypatch):
    from masklm_kernels.training import distributed

    monkeypatch.setattr(distributed, "setup", lambda device, *_: distributed.Context(0, 3, device))
    with pytest.raises(ValueError, match="batch_size"):
        train(_args(corpus, batch_size=8))
