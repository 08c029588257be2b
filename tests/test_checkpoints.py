"""Checkpoints of the training command under faults: a malicious pickle never runs, torn and bit-flipped
files and foreign files are refused with the file's name, settings that differ from the checkpoint's are
named (and allowed only when asked), the step is range-checked, `--save-every` keeps the last good
checkpoint through a crash during a later save, and the summary JSON is strict. Also `_io.atomic_open`
itself: an exception inside the block leaves the old file untouched."""
from __future__ import annotations

import dataclasses
import json
import os
import pickle

import pytest
import torch

from masklm_kernels import _io
from masklm_kernels import train as cli
from masklm_kernels.training import checkpoint
from masklm_kernels.training.checkpoint import CheckpointError
from masklm_kernels.training.loop import Args, train

pytestmark = pytest.mark.usefixtures("tokenizer_cache")


def _args(corpus, **kw):
    base = dict(steps=6, batch_size=4, seq_len=16, model="tiny", text_file=corpus, vocab_size=150, lr=3e-3,
                log_every=100)
    return Args(**{**base, **kw})


@pytest.fixture
def ckpt(corpus, tmp_path):
    path = str(tmp_path / "run.pt")
    train(_args(corpus, stop_after=3, save=path))
    return path


class _Evil:
    def __reduce__(self):
        return (os.system, ("touch pwned-by-checkpoint",))


def test_a_malicious_pickle_in_a_checkpoint_never_runs(corpus, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for bad in (dict(first_loss=_Evil()), _Evil()):
        path = tmp_path / "evil.pt"
        with open(path, "wb") as f:
            pickle.dump(bad, f)
        with pytest.raises(CheckpointError, match="evil.pt.*cannot be read safely"):
            train(_args(corpus, resume=str(path)))
        assert not (tmp_path / "pwned-by-checkpoint").exists()


def test_the_payload_is_also_loaded_without_code(ckpt, corpus, tmp_path, monkeypatch):
    """A well-formed outer file whose payload (with a correct checksum) hides a code-running pickle."""
    import hashlib
    import io

    monkeypatch.chdir(tmp_path)
    buf = io.BytesIO()
    torch.save(dict(first_loss=_Evil()), buf)
    raw = buf.getvalue()
    outer = dict(format=checkpoint.FORMAT, format_version=checkpoint.FORMAT_VERSION,
                 sha256=hashlib.sha256(raw).hexdigest(), payload=torch.frombuffer(bytearray(raw), dtype=torch.uint8))
    torch.save(outer, ckpt)
    with pytest.raises(CheckpointError, match="payload unreadable"):
        train(_args(corpus, resume=ckpt))
    assert not (tmp_path / "pwned-by-checkpoint").exists()


def test_torn_and_flipped_files_are_refused_by_name(ckpt, corpus):
    blob = open(ckpt, "rb").read()
    with open(ckpt, "wb") as f:
        f.write(blob[: len(blob) // 3])  # what a full disk used to leave
    with pytest.raises(CheckpointError, match=r"run\.pt.*cannot be read"):
        train(_args(corpus, resume=ckpt))
    flipped = bytearray(blob)
    flipped[len(blob) // 2] ^= 0x10  # inside the payload's bytes
    with open(ckpt, "wb") as f:
        f.write(bytes(flipped))
    with pytest.raises(CheckpointError, match=r"run\.pt.*(corrupted|cannot be read)"):
        train(_args(corpus, resume=ckpt))


def test_foreign_files_and_missing_keys_are_refused(tmp_path, corpus):
    path = str(tmp_path / "plain.pt")
    torch.save({"model": {}, "step": 3}, path)  # an ordinary torch checkpoint, not ours
    with pytest.raises(CheckpointError, match="not a masklm_kernels checkpoint"):
        train(_args(corpus, resume=path))
    with pytest.raises(CheckpointError, match="no such file"):
        train(_args(corpus, resume=str(tmp_path / "missing.pt")))


def test_changed_settings_are_named_and_allowed_only_when_asked(ckpt, corpus):
    with pytest.raises(CheckpointError, match=r"batch_size: checkpoint 4, now 8.*--allow-changed batch_size"):
        train(_args(corpus, batch_size=8, resume=ckpt))
    with pytest.raises(CheckpointError, match=r"lr: checkpoint 0.003, now 0.01.*seed|seed.*lr"):
        train(_args(corpus, lr=1e-2, seed=5, resume=ckpt))
    with pytest.raises(CheckpointError, match=r"model=.tiny.*the model differs"):
        train(_args(corpus, model="small", resume=ckpt))
    out = train(_args(corpus, lr=1e-2, resume=ckpt, allow_changed=("lr",)))
    assert out["steps"] == 6


def test_step_outside_the_run_is_refused_and_a_finished_run_writes_strict_json(corpus, tmp_path):
    path = str(tmp_path / "done.pt")
    train(_args(corpus, steps=6, save=path))
    with pytest.raises(CheckpointError, match=r"step 6, outside \[0, --steps=4\]"):
        train(_args(corpus, steps=4, resume=path, allow_changed=("steps",)))
    summary = tmp_path / "s.json"
    assert cli.main(["--steps", "6", "--batch-size", "4", "--seq-len", "16", "--model", "tiny", "--text-file",
                     corpus, "--vocab-size", "150", "--lr", "3e-3", "--device", "cpu", "--resume", path,
                     "--summary-json", str(summary)]) == 0
    text = summary.read_text()
    parsed = json.loads(text, parse_constant=lambda c: pytest.fail(f"non-strict JSON constant {c}"))
    assert parsed["final_loss"] is None and parsed["steps"] == 6  # no step ran: no loss, null not NaN


def test_cli_reports_checkpoint_errors_without_a_traceback(ckpt, corpus, capsys):
    rc = cli.main(["--steps", "6", "--batch-size", "8", "--seq-len", "16", "--model", "tiny", "--text-file", corpus,
                   "--vocab-size", "150", "--lr", "3e-3", "--device", "cpu", "--resume", ckpt])
    assert rc == 2
    assert "batch_size: checkpoint 4, now 8" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli.parse(["--resume", "/nonexistent/ck.pt"])
    with pytest.raises(SystemExit):
        cli.parse(["--save-every", "3"])  # without --save
    with pytest.raises(SystemExit):
        cli.parse(["--allow-changed", "model"])


def test_save_every_keeps_the_last_good_checkpoint_through_a_crash(corpus, tmp_path, monkeypatch):
    path = str(tmp_path / "periodic.pt")
    saves = []
    real = _io.os.replace

    def crash_on_second_save(src, dst):  # os is one module: other writers (the tokenizer cache) pass through
        if str(dst) == path:
            saves.append(dst)
        if len(saves) == 2 and str(dst) == path:
            raise OSError(28, "No space left on device")  # the disk fills during the second save
        return real(src, dst)

    monkeypatch.setattr(_io.os, "replace", crash_on_second_save)
    with pytest.raises(OSError, match="No space"):
        train(_args(corpus, steps=6, save=path, save_every=2))
    monkeypatch.setattr(_io.os, "replace", real)
    assert not [f for f in os.listdir(tmp_path) if f.endswith(".tmp")], "temporary file left behind"
    state = checkpoint.load(path, _args(corpus, steps=6))
    assert state["step"] == 2  # the first save, intact
    full = train(_args(corpus, steps=6))
    resumed = train(_args(corpus, steps=6, resume=path))
    assert resumed["final_loss"] == full["final_loss"]


def test_atomic_open_leaves_the_old_file_on_an_exception(tmp_path):
    path = tmp_path / "f.txt"
    path.write_text("old")
    with pytest.raises(RuntimeError):
        with _io.atomic_open(path) as f:
            f.write("new, half")
            raise RuntimeError("killed")
    assert path.read_text() == "old" and os.listdir(tmp_path) == ["f.txt"]
    _io.write_json(path, {"x": float("nan"), "y": [float("inf"), 1.0]})
    assert json.loads(path.read_text()) == {"x": None, "y": [None, 1.0]}
    with pytest.raises(ValueError, match="mode"):
        with _io.atomic_open(path, "a"):
            pass


def test_settings_cover_what_a_checkpoint_stores():
    names = {f.name for f in dataclasses.fields(Args)}
    assert set(checkpoint.MODEL_SETTINGS + checkpoint.RUN_SETTINGS) <= names


def test_the_attention_dropout_rate_trained_with_is_a_setting(corpus):
    """Saved as the rate in effect (from --attention-dropout, else --dropout, else the config's); a checkpoint
    without it predates attention dropout (it trained with none), so resuming one with dropout on is a
    changed setting, named."""
    args = _args(corpus)
    assert checkpoint.settings(dataclasses.replace(args, dropout=0.2))["attention_dropout"] == 0.2
    assert checkpoint.settings(dataclasses.replace(args, dropout=0.2, attention_dropout=0.0))["attention_dropout"] == 0
    now = checkpoint.settings(dataclasses.replace(args, dropout=None))
    assert now["attention_dropout"] == 0.1
    old = {k: v for k, v in now.items() if k != "attention_dropout"}
    with pytest.raises(CheckpointError, match=r"attention_dropout: checkpoint 0.0, now 0.1"):
        checkpoint._check_settings("old.pt", old, now, set())
    checkpoint._check_settings("old.pt", old, now, {"attention_dropout"})
    checkpoint._check_settings("old.pt", old, {**now, "attention_dropout": 0.0}, set())
