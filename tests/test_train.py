"""The training command (python -m masklm_kernels.train): smoke runs of both tasks with a falling loss,
exact resumption on CPU, the summary JSON, --compare, and argument errors. A small text file keeps the
corpus and tokenizer fast (the default corpus is the standard library's docstrings)."""
from __future__ import annotations

import json
import random

import pytest
import torch

from masklm_kernels import train as cli
from masklm_kernels.training import data
from masklm_kernels.training.loop import Args, train

WORDS = ("mask token attention kernel fused loss label vocabulary tensor batch padding span decoder encoder "
         "gradient softmax layer model train step sequence python module function class return value").split()


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    rng = random.Random(0)
    path = tmp_path_factory.mktemp("corpus") / "text.txt"
    path.write_text("\n".join(" ".join(rng.choice(WORDS) for _ in range(rng.randint(6, 30)))
                              for _ in range(400)))
    return str(path)


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch):
    monkeypatch.setattr(data, "CACHE", tmp_path / "cache")


def _args(corpus, **kw):
    base = dict(steps=12, batch_size=8, seq_len=32, model="tiny", text_file=corpus, vocab_size=200, lr=3e-3,
                log_every=100)
    return Args(**{**base, **kw})


@pytest.mark.parametrize("task", ["mlm", "mass"])
def test_training_runs_and_the_loss_falls(task, corpus, capsys):
    summary = train(_args(corpus, task=task, steps=40))
    assert summary["final_loss"] < summary["first_loss"] - 0.5, summary
    assert summary["steps"] == 40 and summary["backend"] == "fused" and summary["tokens_per_s"] > 0
    assert "step 40/40" in capsys.readouterr().out


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
    for key in ("first_loss", "final_loss", "eval_loss", "tokens_per_s", "steps", "device", "backend",
                "speedup", "loss_difference"):
        assert key in summary, key
    assert "fused vs reference" in capsys.readouterr().out


def test_cli_argument_errors(corpus):
    with pytest.raises(SystemExit):
        cli.parse(["--steps", "0"])
    with pytest.raises(SystemExit):
        cli.parse(["--task", "gpt"])
    if not torch.cuda.is_available():
        with pytest.raises(SystemExit):
            cli.parse(["--device", "cuda"])
