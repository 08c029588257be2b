"""Checkpoints of the training command, kept as a system that must trust them would keep them.

A checkpoint is one file, written atomically (`_io.atomic_open`: a crash or a full disk during a save leaves
the previous checkpoint intact), holding

    {"format": "masklm_kernels-checkpoint", "format_version": 1, "sha256": <hex>, "payload": uint8 tensor}

where the payload is itself a `torch.save` of the model, optimiser, scheduler and RNG states, the step, the
first loss, the run's settings and the library and torch versions. Both levels are read with
`torch.load(weights_only=True)`: no object in the file is ever unpickled into code (a malicious pickle
raises instead of running). The checksum catches flipped bytes; a torn or foreign file is refused with
its name in the message.

On resume the settings are compared with the run's: those that shape the model (`MODEL_SETTINGS`) must
match; those that define the run (`RUN_SETTINGS`: changing one gives a different run than the one
interrupted) must match unless named in `allow_changed` (`--allow-changed lr,steps`); the rest (device,
logging, file names) are free. The step must lie in [0, steps].
"""
from __future__ import annotations

import hashlib
import io
import os

import torch

from .. import __version__
from .._io import atomic_write_bytes

FORMAT = "masklm_kernels-checkpoint"
FORMAT_VERSION = 1
MODEL_SETTINGS = ("task", "model", "vocab_size", "seq_len")
RUN_SETTINGS = ("steps", "batch_size", "seed", "lr", "warmup", "dropout", "attention_dropout", "implementation",
                "text_file", "adaptive_masking")
PAYLOAD_KEYS = ("model", "opt", "sched", "rng", "step", "first_loss", "settings", "library", "torch")


class CheckpointError(ValueError):
    """A checkpoint that cannot be resumed: unreadable, corrupted, foreign, or from another run's settings."""


def settings(args) -> dict:
    out = {name: getattr(args, name) for name in MODEL_SETTINGS + RUN_SETTINGS}
    out["attention_dropout"] = attention_dropout(args)  # the rate trained with, whichever option set it
    return out


def attention_dropout(args) -> float:
    """The attention-probability dropout rate a run trains with (what training.loop.build configures)."""
    if args.attention_dropout is not None:
        return args.attention_dropout
    if args.dropout is not None:
        return args.dropout
    from ..models.config import ModelConfig

    return ModelConfig.attention_probs_dropout_prob


def save(path: str, args, *, step: int, first_loss: float | None, model, opt, sched, adaptive=None) -> None:
    """`adaptive`: the AdaptiveMaskRates of an --adaptive-masking run (its statistics are run state)."""
    payload = dict(model=model.state_dict(), opt=opt.state_dict(), sched=sched.state_dict(),
                   rng=torch.get_rng_state(), step=int(step), first_loss=first_loss, settings=settings(args),
                   library=str(__version__), torch=str(torch.__version__),
                   adaptive=None if adaptive is None else adaptive.state_dict())
    buf = io.BytesIO()
    torch.save(payload, buf)
    data = buf.getvalue()
    outer = dict(format=FORMAT, format_version=FORMAT_VERSION, sha256=hashlib.sha256(data).hexdigest(),
                 payload=torch.frombuffer(bytearray(data), dtype=torch.uint8))
    buf = io.BytesIO()
    torch.save(outer, buf)
    atomic_write_bytes(path, buf.getvalue())


def load(path: str, args, allow_changed=()) -> dict:
    """The payload of checkpoint `path`, checked against the run `args` (see the module docstring);
    `CheckpointError` naming the file and the problem otherwise."""
    if not os.path.isfile(path):
        raise CheckpointError(f"checkpoint {path!r}: no such file")
    try:
        outer = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torn file, foreign pickle, a forbidden object: never unpickled into code
        raise CheckpointError(f"checkpoint {path!r} cannot be read safely (truncated, corrupted or not a "
                              f"masklm_kernels checkpoint): {type(e).__name__}: {str(e)[:300]}") from None
    if not isinstance(outer, dict) or outer.get("format") != FORMAT:
        raise CheckpointError(f"checkpoint {path!r} is not a masklm_kernels checkpoint")
    if outer.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(f"checkpoint {path!r} has format version {outer.get('format_version')!r}; this "
                              f"library reads version {FORMAT_VERSION}")
    raw = outer.get("payload")
    if not isinstance(raw, torch.Tensor) or raw.dtype != torch.uint8 or raw.dim() != 1:
        raise CheckpointError(f"checkpoint {path!r} has no payload")
    data = raw.numpy().tobytes()
    if hashlib.sha256(data).hexdigest() != outer.get("sha256"):
        raise CheckpointError(f"checkpoint {path!r} is corrupted: its checksum does not match its contents")
    try:
        payload = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as e:
        raise CheckpointError(f"checkpoint {path!r}: payload unreadable: {type(e).__name__}: {str(e)[:300]}") from None
    missing = [k for k in PAYLOAD_KEYS if k not in payload]
    if missing:
        raise CheckpointError(f"checkpoint {path!r} lacks {missing}")
    _check_settings(path, payload["settings"], settings(args), set(allow_changed))
    step = payload["step"]
    if not isinstance(step, int) or not 0 <= step <= args.steps:
        raise CheckpointError(f"checkpoint {path!r} is at step {step!r}, outside [0, --steps={args.steps}]")
    return payload


def _check_settings(path: str, saved: dict, now: dict, allow: set) -> None:
    unknown = allow - set(RUN_SETTINGS)
    if unknown:
        raise CheckpointError(f"allow_changed: {sorted(unknown)} are not settings that may change on resume "
                              f"(those are {', '.join(RUN_SETTINGS)})")
    if "backend" in saved and "implementation" not in saved:  # the setting's earlier name
        saved = {**saved, "implementation": saved["backend"]}
    # a checkpoint without a setting predates it: its run trained without attention dropout / adaptive masking
    saved = {"attention_dropout": 0.0, "adaptive_masking": False, **saved}
    for name in MODEL_SETTINGS:
        if saved.get(name) != now[name]:
            raise CheckpointError(f"checkpoint {path!r} was saved with {name}={saved.get(name)!r}, this run has "
                                  f"{name}={now[name]!r}: the model differs, it cannot be resumed")
    changed = [n for n in RUN_SETTINGS if saved.get(n) != now[n] and n not in allow]
    if changed:
        detail = ", ".join(f"{n}: checkpoint {saved.get(n)!r}, now {now[n]!r}" for n in changed)
        raise CheckpointError(f"checkpoint {path!r} comes from a run with other settings ({detail}); resuming "
                              f"would not continue that run. Pass --allow-changed {','.join(changed)} to resume "
                              f"with the new values anyway")
