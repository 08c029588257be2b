"""`AdaptiveMaskRates`: per-token-id masking rates from a running statistic of the per-token loss. The
statistics follow the documented bias-corrected EMA (checked against hand-computed values); every row's
eligible tokens average the target rate within [min_rate, max_rate], harder ids get proportionally higher
rates; ignored positions are never read; the state round-trips through state_dict; the rates drive
`mask_tokens` (hard ids masked more often); torch.compile(fullgraph=True) traces both methods; errors."""
from __future__ import annotations

import math

import pytest
import torch

from masklm_kernels import AdaptiveMaskRates, mask_tokens, masked_cross_entropy

V = 50


def _rows(seed=0, B=6, S=40):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, V, (B, S), generator=g)
    lengths = torch.tensor([40, 33, 20, 7, 1, 0])[:B]
    return ids, lengths


def _eligible(ids, lengths, special=(0, 1, 2)):
    S = ids.shape[1]
    return (torch.arange(S) < lengths[:, None]) & ~torch.isin(ids, torch.tensor(special))


def test_the_statistics_are_a_bias_corrected_ema():
    ada = AdaptiveMaskRates(V, decay=0.5)
    labels = torch.tensor([7, 7, -100, 9])
    ada.update(labels, torch.tensor([1.0, 3.0, float("nan"), 5.0]))  # id 7: mean 2; the NaN is ignored
    ada.update(torch.tensor([7, -100]), torch.tensor([4.0, float("inf")]))
    est = ada.loss_sum / ada.weight.clamp_min(1e-30)
    # id 7: sum 0.5 * 2 = 1, weight 0.5, then sum 0.5 * 1 + 0.5 * 4 = 2.5, weight 0.75 -> 10 / 3
    assert math.isclose(float(est[7]), 2.5 / 0.75, rel_tol=1e-6)
    assert math.isclose(float(est[9]), 5.0, rel_tol=1e-6)  # seen once: the correction makes it exact
    # global: batch means 3 (1, 3, 5) then 4: (0.5 * 1.5 + 0.5 * 4) / 0.75
    assert math.isclose(float(ada.global_sum / ada.global_weight), (0.75 + 2.0) / 0.75, rel_tol=1e-6)
    d = ada.difficulty()
    assert torch.isfinite(d).all() and math.isclose(float(d[3]), float(ada.global_sum / ada.global_weight),
                                                    rel_tol=1e-6)  # never seen: the global average


def test_rates_average_the_target_per_row_and_follow_difficulty():
    ada = AdaptiveMaskRates(V, target=0.15, min_rate=0.01, max_rate=0.9, temperature=1.0)
    ids, lengths = _rows()
    before = ada.rates(ids, lengths=lengths, special_token_ids=[0, 1, 2])
    assert before.dtype == torch.float32 and torch.allclose(before, torch.full_like(before, 0.15), atol=1e-6, rtol=0)
    g = torch.Generator().manual_seed(1)
    for _ in range(5):  # ids >= 40 are four times harder
        labels = torch.randint(3, V, (200,), generator=g)
        ada.update(labels, torch.where(labels >= 40, 4.0, 1.0) + 0.01 * torch.rand(200, generator=g))
    r = ada.rates(ids, lengths=lengths, special_token_ids=[0, 1, 2])
    elig = _eligible(ids, lengths)
    for b in range(ids.shape[0]):
        if elig[b].any():
            assert abs(float(r[b][elig[b]].mean()) - 0.15) < 1e-5, f"row {b}: mean {float(r[b][elig[b]].mean())}"
    assert (r[~elig] == 0.15).all() and (r >= 0.01).all() and (r <= 0.9).all()
    row = r[0][elig[0]]
    hard, easy = row[ids[0][elig[0]] >= 40], row[ids[0][elig[0]] < 40]
    assert hard.numel() and easy.numel()
    assert 3.8 < float(hard.mean() / easy.mean()) < 4.2  # unclamped: proportional to the difficulty
    flat = AdaptiveMaskRates(V, temperature=0.0)
    flat.load_state_dict(ada.state_dict())
    assert torch.allclose(flat.rates(ids, lengths=lengths), torch.full(ids.shape, 0.15))


def test_clamping_keeps_the_mean_when_reachable():
    ada = AdaptiveMaskRates(V, target=0.3, min_rate=0.1, max_rate=0.35)
    ids = torch.tensor([[5] * 10 + [6] * 30])
    ada.update(torch.tensor([5, 6]), torch.tensor([100.0, 1.0]))  # id 5 would want almost everything
    r = ada.rates(ids)
    assert torch.allclose(r[0, :10], torch.tensor(0.35)) and abs(float(r.mean()) - 0.3) < 1e-5


def test_the_rates_drive_mask_tokens_towards_hard_ids():
    ada = AdaptiveMaskRates(V, target=0.15, max_rate=0.8)
    g = torch.Generator().manual_seed(2)
    ids = torch.randint(3, V, (64, 128), generator=g)
    for step in range(20):
        rates = ada.rates(ids)
        masked, labels = mask_tokens(ids, mask_token_id=1, vocab_size=V, mlm_probability=rates, seed=5, step=step)
        logits = torch.randn(labels.numel(), V, generator=g)
        logits[:, :40] += 3.0  # the "model" predicts ids < 40 well: ids >= 40 keep a high loss
        logits[torch.arange(labels.numel()), labels.reshape(-1).clamp_min(0)] += torch.where(
            labels.reshape(-1) < 40, 4.0, 0.0)
        ada.update(labels.reshape(-1), masked_cross_entropy(logits, labels.reshape(-1), reduction="none"))
    _, labels = mask_tokens(ids, mask_token_id=1, vocab_size=V, mlm_probability=ada.rates(ids), seed=5, step=99)
    chosen = labels != -100
    hard = ids >= 40
    assert abs(float(chosen.float().mean()) - 0.15) < 0.02
    assert float(chosen[hard].float().mean()) > 2 * float(chosen[~hard].float().mean())


def test_state_dict_round_trip_and_compile():
    ada = AdaptiveMaskRates(V)
    ada.update(torch.tensor([4, 5, -100]), torch.tensor([2.0, 0.5, 0.0]))
    twin = AdaptiveMaskRates(V)
    twin.load_state_dict(ada.state_dict())
    ids, lengths = _rows(3)
    assert torch.equal(twin.rates(ids, lengths=lengths), ada.rates(ids, lengths=lengths))
    assert set(ada.state_dict()) == {"loss_sum", "weight", "global_sum", "global_weight"}
    compiled_rates = torch.compile(ada.rates, fullgraph=True, backend="aot_eager")
    assert torch.allclose(compiled_rates(ids, lengths=lengths), ada.rates(ids, lengths=lengths), atol=1e-6)
    before = ada.state_dict()
    before = {k: v.clone() for k, v in before.items()}
    torch.compile(ada.update, fullgraph=True, backend="aot_eager")(torch.tensor([4, 9]), torch.tensor([1.0, 3.0]))
    twin.update(torch.tensor([4, 9]), torch.tensor([1.0, 3.0]))
    for k, v in ada.state_dict().items():
        assert torch.allclose(v, twin.state_dict()[k]) and not torch.equal(v, before[k]) or k == "weight"


def test_errors_name_the_argument():
    with pytest.raises(ValueError, match="min_rate <= target <= max_rate"):
        AdaptiveMaskRates(V, target=0.5, max_rate=0.4)
    with pytest.raises(ValueError, match="decay must be < 1"):
        AdaptiveMaskRates(V, decay=1.0)
    with pytest.raises(ValueError, match="temperature must be"):
        AdaptiveMaskRates(V, temperature=-1.0)
    with pytest.raises(TypeError, match="vocab_size must be an int"):
        AdaptiveMaskRates(50.0)
    ada = AdaptiveMaskRates(V)
    with pytest.raises(ValueError, match=r"labels must be ids in \[0, 50\)"):
        ada.update(torch.tensor([50]), torch.tensor([1.0]))
    with pytest.raises(ValueError, match="per_token_loss must be a tensor of labels' shape"):
        ada.update(torch.tensor([1, 2]), torch.tensor([1.0]))
    with pytest.raises(TypeError, match="labels must be an integer tensor"):
        ada.update(torch.tensor([1.0]), torch.tensor([1.0]))
    with pytest.raises(ValueError, match="input_ids must be"):
        ada.rates(torch.tensor([1, 2]))
