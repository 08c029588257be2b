"""Loss-driven adaptive masking: per-token-id masking rates kept on the device from the model's own
per-token loss, fed to `mask_tokens` as (B, S) rates.

The tokens the model still gets wrong are masked more often, the ones it has learnt less often, while each
row keeps the target rate on average — the idea of masking informative / difficult tokens by the model's
own predictions (e.g. Self-Evolution learning, Zhong et al., 2023; and the token-level rates of
"Should You Mask 15% in MLM?", Wettig et al., 2023, which shows the rate itself is a free choice)::

    adaptive = AdaptiveMaskRates(vocab_size, target=0.15)
    rates = adaptive.rates(input_ids, lengths=lengths, special_token_ids=[cls, sep])   # (B, S) float32
    masked, labels = mask_tokens(input_ids, mlm_probability=rates, lengths=lengths, ...)
    per_token = masked_cross_entropy(logits, labels, reduction="none")              # (N,), 0 at ignored
    adaptive.update(labels, per_token)                                                # no host sync

State (buffers: saved in `state_dict`, moved by `.to`): for every id v, `loss_sum[v]` and `weight[v]`,
exponential moving averages (decay `decay` per update in which v is labelled) of its mean per-token
loss and of 1, so that `loss_sum / weight` is the bias-corrected average (as Adam's moments); the same
over all labelled tokens in `global_sum` / `global_weight`. An id never labelled takes the global
average. Its difficulty is `estimate ** temperature`.

Rates: row b's rate of token s is `clamp(c_b * difficulty[ids[b, s]], min_rate, max_rate)`, with the
scale `c_b` chosen so that the mean rate over the row's eligible tokens is `target` (found by 48 steps of
bisection on log c: monotone, deterministic, no host synchronisation; exact to float32 whenever `target`
is reachable, i.e. always since min_rate <= target <= max_rate). Ineligible positions (padding, special
ids) get `target` and are never masked by `mask_tokens` anyway. Every step is a fixed sequence of tensor
operations: the rates are a pure function of the state and the batch, the same on every device up to
float rounding, and `mask_tokens` keys the masks by (seed, step, sample id) as always.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from .._common import IGNORE_INDEX
from .._validation import check_int, check_prob, values_checkable

_BISECTION_STEPS = 48


class AdaptiveMaskRates(nn.Module):
    """Per-token-id masking rates from a running statistic of the per-token loss (module docstring).

    Args:
        vocab_size: ids are in [0, vocab_size).
        target: the mean masking rate of every row (BERT: 0.15).
        min_rate, max_rate: bounds of a token's rate (0 <= min_rate <= target <= max_rate <= 1).
        decay: EMA decay per update, in [0, 1) (0: the last batch only).
        temperature: difficulty = estimated loss ** temperature (0: uniform rates; 1: proportional).
    """

    def __init__(self, vocab_size: int, target: float = 0.15, *, min_rate: float = 0.02, max_rate: float = 0.6,
                 decay: float = 0.99, temperature: float = 1.0):
        super().__init__()
        self.vocab_size = check_int("vocab_size", vocab_size, lo=1)
        self.target = check_prob("target", target)
        self.min_rate = check_prob("min_rate", min_rate)
        self.max_rate = check_prob("max_rate", max_rate)
        if not self.min_rate <= self.target <= self.max_rate:
            raise ValueError(f"min_rate <= target <= max_rate is required, got {min_rate}, {target}, {max_rate}")
        self.decay = check_prob("decay", decay)
        if self.decay >= 1.0:
            raise ValueError(f"decay must be < 1 (1 would never learn), got {decay}")
        real = isinstance(temperature, (int, float)) and not isinstance(temperature, bool)
        if not real or not 0 <= temperature < math.inf:
            raise ValueError(f"temperature must be a finite number >= 0, got {temperature!r}")
        self.temperature = float(temperature)
        self.register_buffer("loss_sum", torch.zeros(vocab_size, dtype=torch.float32))
        self.register_buffer("weight", torch.zeros(vocab_size, dtype=torch.float32))
        self.register_buffer("global_sum", torch.zeros((), dtype=torch.float32))
        self.register_buffer("global_weight", torch.zeros((), dtype=torch.float32))

    def extra_repr(self) -> str:
        return (f"vocab_size={self.vocab_size}, target={self.target}, min_rate={self.min_rate}, "
                f"max_rate={self.max_rate}, decay={self.decay}, temperature={self.temperature}")

    def _ids(self, name: str, ids: torch.Tensor) -> torch.Tensor:
        if not isinstance(ids, torch.Tensor) or ids.dtype.is_floating_point or ids.dtype == torch.bool:
            raise TypeError(f"{name} must be an integer tensor, got {getattr(ids, 'dtype', type(ids).__name__)}")
        if ids.device != self.weight.device:
            raise ValueError(f"{name} is on {ids.device}, the statistics on {self.weight.device} (move the module)")
        return ids

    @torch.no_grad()
    def update(self, labels: torch.Tensor, per_token_loss: torch.Tensor, ignore_index: int = IGNORE_INDEX) -> None:
        """Fold one batch into the statistics. labels: (...) ids or `ignore_index` (mask_tokens' labels);
        per_token_loss: the same shape, the loss of each labelled position (`reduction="none"` of the
        losses; its values at ignored positions are not read). Not differentiated."""
        self.fold(*self.batch_statistics(labels, per_token_loss, ignore_index))

    @torch.no_grad()
    def batch_statistics(self, labels: torch.Tensor, per_token_loss: torch.Tensor,
                         ignore_index: int = IGNORE_INDEX) -> tuple[torch.Tensor, torch.Tensor]:
        """(loss sums (V,), label counts (V,)) of one batch, float32: what `fold` takes. Under data
        parallelism all-reduce (sum) both before folding, so that every rank keeps the same statistics."""
        labels = self._ids("labels", labels)
        if not isinstance(per_token_loss, torch.Tensor) or per_token_loss.shape != labels.shape:
            raise ValueError(f"per_token_loss must be a tensor of labels' shape {tuple(labels.shape)}, got "
                             f"{tuple(getattr(per_token_loss, 'shape', ()))}")
        labels, loss = labels.reshape(-1), per_token_loss.detach().reshape(-1).to(torch.float32)
        keep = labels != ignore_index
        if values_checkable(labels) and bool(((labels[keep] < 0) | (labels[keep] >= self.vocab_size)).any()):
            raise ValueError(f"labels must be ids in [0, {self.vocab_size}) or ignore_index={ignore_index}")
        ids = torch.where(keep, labels, 0).clamp(0, self.vocab_size - 1).long()  # clamped: never out of bounds
        sums = torch.zeros_like(self.loss_sum).index_add_(0, ids, torch.where(keep, loss, 0.0))
        counts = torch.zeros_like(self.weight).index_add_(0, ids, keep.to(torch.float32))
        return sums, counts

    @torch.no_grad()
    def fold(self, sums: torch.Tensor, counts: torch.Tensor) -> None:
        """One EMA step from a batch's (loss sums, counts) per id (`batch_statistics`)."""
        seen = counts > 0
        d = self.decay
        mean = sums / counts.clamp_min(1.0)
        self.loss_sum.copy_(torch.where(seen, d * self.loss_sum + (1 - d) * mean, self.loss_sum))
        self.weight.copy_(torch.where(seen, d * self.weight + (1 - d), self.weight))
        n = counts.sum()
        batch_mean = sums.sum() / n.clamp_min(1.0)
        any_ = n > 0
        self.global_sum.copy_(torch.where(any_, d * self.global_sum + (1 - d) * batch_mean, self.global_sum))
        self.global_weight.copy_(torch.where(any_, d * self.global_weight + (1 - d), self.global_weight))

    def difficulty(self) -> torch.Tensor:
        """(vocab_size,) float32: estimated per-token loss ** temperature (ids never labelled: the global
        average; before any update: 1)."""
        glob = torch.where(self.global_weight > 0, self.global_sum / self.global_weight.clamp_min(1e-30), 1.0)
        est = torch.where(self.weight > 0, self.loss_sum / self.weight.clamp_min(1e-30), glob)
        return est.clamp_min(1e-6) ** self.temperature

    @torch.no_grad()
    def rates(self, input_ids: torch.Tensor, *, lengths: torch.Tensor | None = None,
              attention_mask: torch.Tensor | None = None, special_token_ids=None) -> torch.Tensor:
        """(B, S) float32 rates for `mask_tokens(mlm_probability=...)`: each row's eligible tokens (inside
        `lengths` / `attention_mask`, not a special id) average `target`; others get `target`."""
        ids = self._ids("input_ids", input_ids)
        if ids.dim() != 2:
            raise ValueError(f"input_ids must be (batch, seq), got shape {tuple(ids.shape)}")
        B, S = ids.shape
        elig = torch.ones(B, S, dtype=torch.bool, device=ids.device)
        if lengths is not None:
            elig &= torch.arange(S, device=ids.device) < lengths.to(ids.device).view(B, 1)
        if attention_mask is not None:
            elig &= attention_mask.to(ids.device) != 0
        if special_token_ids is not None:
            special = torch.as_tensor(special_token_ids, dtype=torch.int64, device=ids.device)
            elig &= ~torch.isin(ids.long(), special)
        d = self.difficulty()[ids.long().clamp(0, self.vocab_size - 1)]  # (B, S); out-of-range ids: clamped
        d = torch.where(elig, d, 1.0)
        n = elig.sum(1, keepdim=True).clamp_min(1)
        lo_rate, hi_rate = self.min_rate, self.max_rate

        def mean_rate(log_c):
            r = (log_c.exp() * d).clamp(lo_rate, hi_rate)
            return torch.where(elig, r, 0.0).sum(1, keepdim=True) / n

        # log c between "every rate at min" and "every rate at max" (+1 of slack): mean_rate is monotone
        big = torch.finfo(torch.float32).max
        d_max = torch.where(elig, d, 0.0).amax(1, keepdim=True)
        d_min = torch.where(elig, d, big).amin(1, keepdim=True).clamp_max(d_max.clamp_min(1e-6))
        lo = math.log(max(lo_rate, 1e-12)) - d_max.clamp_min(1e-6).log() - 1.0
        hi = math.log(max(hi_rate, 1e-12)) - d_min.clamp_min(1e-6).log() + 1.0
        for _ in range(_BISECTION_STEPS):
            mid = (lo + hi) / 2
            above = mean_rate(mid) > self.target
            hi, lo = torch.where(above, mid, hi), torch.where(above, lo, mid)
        rates = ((lo + hi) / 2).exp().mul(d).clamp(lo_rate, hi_rate)
        return torch.where(elig, rates, self.target).to(torch.float32)
