"""Hugging Face `Trainer` end to end with a patched model: each set-up trains the same tiny model from the
same weights on the same batches twice, unpatched and patched (`patch_model`), and compares the loss of
every step and the final weights. Set-ups: default, gradient checkpointing (non-reentrant, Hugging Face's
default, and reentrant), bf16 autocast, gradient accumulation, evaluation with `compute_metrics`; on a
GPU also fp16 (autocast and GradScaler) and bf16 on CUDA. ModernBERT: default and gradient accumulation
(its loss takes Trainer's num_items_in_batch).
Dropout is off (the patched attention draws its own dropout masks, not torch's: equal only without them);
plain SGD, so that weight differences are gradient differences. Tolerances: fp32 1e-5 relative on the
loss; bf16 / fp16 2e-2."""
from __future__ import annotations

import copy
import warnings

import numpy as np
import pytest
import torch

from helpers import assert_close

transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate", reason="Hugging Face's Trainer needs accelerate")

from masklm_kernels.integrations.huggingface import patch_model  # noqa: E402

from test_integrations_hf import V, make_model  # noqa: E402

N_EXAMPLES, MAX_LEN = 24, 20


def _dataset(seed: int = 0) -> list[dict]:
    """Examples of random length with fixed MLM labels (15% of the tokens, at least one)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(N_EXAMPLES):
        n = int(torch.randint(3, MAX_LEN + 1, (), generator=g))
        ids = torch.randint(5, V, (n,), generator=g)
        picked = torch.rand(n, generator=g) < 0.15
        picked[int(torch.randint(0, n, (), generator=g))] = True
        out.append({"input_ids": torch.where(picked, 4, ids), "labels": torch.where(picked, ids, -100)})
    return out


def _collate(examples: list[dict]) -> dict:
    """Right padding to the batch's longest example (pad id 1: RoBERTa's; ids start at 5)."""
    S = max(len(e["input_ids"]) for e in examples)
    pad = lambda t, v: torch.nn.functional.pad(t, (0, S - len(t)), value=v)  # noqa: E731
    return {"input_ids": torch.stack([pad(e["input_ids"], 1) for e in examples]),
            "attention_mask": torch.stack([pad(torch.ones_like(e["input_ids"]), 0) for e in examples]),
            "labels": torch.stack([pad(e["labels"], -100) for e in examples])}


def _accuracy(pred) -> dict:
    logits, labels = pred.predictions, pred.label_ids
    keep = labels != -100
    return {"accuracy": float((logits.argmax(-1)[keep] == labels[keep]).mean())}


def _run(model, tmp_path, *, patched: bool, evaluate: bool = False, **args) -> tuple[list[float], dict, dict]:
    """(training loss per step, final state dict, evaluation metrics) of a Trainer run."""
    if patched:
        patch_model(model)
    settings = dict(output_dir=str(tmp_path / ("patched" if patched else "unpatched")), max_steps=4,
                    per_device_train_batch_size=4, per_device_eval_batch_size=8, learning_rate=0.5, optim="sgd",
                    lr_scheduler_type="constant", logging_steps=1, save_strategy="no", report_to=[], use_cpu=True,
                    disable_tqdm=True, dataloader_num_workers=0, seed=3, max_grad_norm=0.0)
    settings.update(args)
    trainer = transformers.Trainer(model=model, args=transformers.TrainingArguments(**settings),
                                   train_dataset=_dataset(), eval_dataset=_dataset(1) if evaluate else None,
                                   data_collator=_collate, compute_metrics=_accuracy if evaluate else None)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Trainer's deprecation and device notices
        trainer.train()
        metrics = trainer.evaluate() if evaluate else {}
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    return losses, {k: v.detach().float().clone() for k, v in model.state_dict().items()}, metrics


SETUPS = {
    "default": dict(),
    "gradient_checkpointing": dict(gradient_checkpointing=True),
    "gradient_checkpointing_reentrant": dict(gradient_checkpointing=True,
                                             gradient_checkpointing_kwargs={"use_reentrant": True}),
    "gradient_accumulation": dict(gradient_accumulation_steps=2, per_device_train_batch_size=2),
    "bf16": dict(bf16=True),
    # on a GPU: autocast on CUDA, fp16 with Trainer's GradScaler
    "fp16_cuda": dict(fp16=True, use_cpu=False),
    "bf16_cuda": dict(bf16=True, use_cpu=False),
}
LOW_PRECISION = ("bf16", "fp16_cuda", "bf16_cuda")


@pytest.mark.parametrize("setup", list(SETUPS))
def test_trainer_patched_follows_unpatched(setup, tmp_path):
    if setup.endswith("_cuda") and not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    _assert_patched_trains_as_unpatched(make_model("roberta").float(), setup, SETUPS[setup], tmp_path)


@pytest.mark.parametrize("setup", ["default", "gradient_accumulation"])
def test_trainer_modernbert(setup, tmp_path):
    """ModernBERT's forward takes Trainer's num_items_in_batch (its loss divides by it): with gradient
    accumulation, the patched loss must divide the same way."""
    from test_integrations_modernbert import make_model as make_modernbert

    _assert_patched_trains_as_unpatched(make_modernbert().float(), setup, SETUPS[setup], tmp_path)


def _assert_patched_trains_as_unpatched(base, setup: str, args: dict, tmp_path):
    ref_losses, ref_state, _ = _run(copy.deepcopy(base), tmp_path, patched=False, **args)
    losses, state, _ = _run(copy.deepcopy(base), tmp_path, patched=True, **args)
    assert len(losses) == len(ref_losses) == 4
    bf16 = setup in LOW_PRECISION
    assert_close(torch.tensor(losses), torch.tensor(ref_losses), atol=0, rtol=2e-2 if bf16 else 1e-5,
                 msg=f"{setup}: loss per step")
    start = base.state_dict()
    for name, w in state.items():
        w, ref_w = w.cpu(), ref_state[name].cpu()
        moved, ref_moved = w - start[name].float(), ref_w - start[name].float()
        if bf16:  # bf16 matmuls: the updates point the same way
            if ref_moved.norm() > 1e-4:
                cos = torch.nn.functional.cosine_similarity(moved.flatten(), ref_moved.flatten(), dim=0)
                assert cos > 0.95, f"{setup}: update of {name}: cosine {float(cos):.3f}"
        else:
            assert_close(w, ref_w, atol=2e-6, rtol=1e-5, msg=f"{setup}: final {name}")


def test_trainer_evaluate_with_compute_metrics(tmp_path):
    base = make_model("bert").float()
    _, _, ref = _run(copy.deepcopy(base), tmp_path, patched=False, evaluate=True)
    _, _, got = _run(copy.deepcopy(base), tmp_path, patched=True, evaluate=True)
    assert "eval_accuracy" in got, f"compute_metrics got no predictions: {got}"
    assert np.isclose(got["eval_loss"], ref["eval_loss"], rtol=1e-5, atol=0), (got, ref)
    assert got["eval_accuracy"] == ref["eval_accuracy"]
