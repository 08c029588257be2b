"""Checks shared by the masking test files (``mask_tokens`` semantics and statistics, ``mass_mask``).

* :data:`COMMON`: the mask id and vocabulary of the helpers' input factories;
* :func:`eligible_of` / :func:`units_of`: the spec's eligibility and units for a call's kwargs;
* :func:`check_invariants`: the structural guarantees of ``mask_tokens`` judged from its outputs;
* :func:`expected_budget`: the spec's per-row budget ``k``;
* :func:`replacement_shares`: the exact (mask, random, keep) probabilities the thresholds give;
* :func:`permute_row_kwargs`: permute every per-row argument of a call (rows move with their sample ids).
"""

from __future__ import annotations

import numpy as np
import torch

from helpers import MASK_ID, VOCAB_SIZE
from masking_model import as_np, budget, fx, model_eligible, model_units, replacement_thresholds

COMMON = dict(mask_token_id=MASK_ID, vocab_size=VOCAB_SIZE)


def eligible_of(ids, kw):
    """(B, S) bool: the spec's eligibility for ``mask_tokens(ids, **kw)``."""
    return model_eligible(ids, lengths=kw.get("lengths"), attention_mask=kw.get("attention_mask"),
                          special_token_ids=kw.get("special_token_ids"),
                          special_tokens_mask=kw.get("special_tokens_mask"), word_ids=kw.get("word_ids"))


def units_of(ids, kw):
    """Per row, the list of units (first position, length) per the spec."""
    elig = eligible_of(ids, kw)
    wid = as_np(kw.get("word_ids"))
    return [model_units(elig[b], None if wid is None else wid[b]) for b in range(elig.shape[0])]


def check_invariants(ids, kw, out, labels):
    """Structural guarantees that hold for every mode and every random draw.

    * only eligible positions are selected (never special, padding or word id -1);
    * labels = original id where selected, ``ignore_index`` elsewhere;
    * unselected positions unchanged;
    * a selected position holds the mask id, an id from the random range, or its original id (no garbage:
      the kernel allocates its outputs, so every element must be written with one of these);
    * whole words (units) are all-or-none.
    Returns the (B, S) selection.
    """
    ignore = kw.get("ignore_index", -100)
    ids_np, out_np, lab_np = as_np(ids).astype(np.int64), as_np(out).astype(np.int64), as_np(labels).astype(np.int64)
    assert out.dtype == ids.dtype, f"masked_input_ids dtype {out.dtype} != input_ids dtype {ids.dtype}"
    assert out.shape == ids.shape and labels.shape == ids.shape
    sel = lab_np != ignore
    elig = eligible_of(ids, kw)
    bad = np.argwhere(sel & ~elig)
    assert bad.size == 0, f"{len(bad)} ineligible positions selected, e.g. (b, s) = {bad[:5].tolist()}"
    bad = np.argwhere(sel & (lab_np != ids_np))
    assert bad.size == 0, f"labels differ from the original ids at selected positions {bad[:5].tolist()}"
    bad = np.argwhere(~sel & (out_np != ids_np))
    assert bad.size == 0, f"unselected positions changed at {bad[:5].tolist()}"
    lo, hi = kw.get("random_token_range") or (0, kw["vocab_size"])
    v = out_np[sel]
    ok = (v == kw["mask_token_id"]) | (v == ids_np[sel]) | ((v >= lo) & (v < hi))
    assert ok.all(), f"selected positions hold ids that are neither mask, original nor in [{lo}, {hi}): {v[~ok][:10]}"
    if kw.get("word_ids") is not None:
        for b, units in enumerate(units_of(ids, kw)):
            for f, ln in units:
                s = sel[b, f:f + ln]
                assert s.all() or not s.any(), f"row {b}: word at {f}..{f + ln - 1} partly selected: {s.astype(int)}"
    return sel


def expected_budget(rates_row, elig_row):
    """The spec's budget k for one row (integer arithmetic on rates quantised to 2^-24)."""
    return budget(sum(fx(float(r)) for r in np.asarray(rates_row, dtype=np.float32)[elig_row]))


def replacement_shares(mask_prob, random_prob):
    """Exact (mask, random, keep) probabilities of a selected token: the spec's integer thresholds
    ``T_mask``, ``T_rand`` over 2^32."""
    t_mask, t_rand = replacement_thresholds(mask_prob, random_prob)
    two32 = 2.0 ** 32
    return t_mask / two32, (t_rand - t_mask) / two32, 1.0 - t_rand / two32


def permute_row_kwargs(kw, perm, B):
    """``kw`` with every per-row tensor argument (leading dimension B) permuted by ``perm``."""
    out = {}
    for k, v in kw.items():
        if isinstance(v, torch.Tensor) and v.dim() >= 1 and v.shape[0] == B and k != "special_token_ids":
            out[k] = v[perm]
        else:
            out[k] = v
    return out
