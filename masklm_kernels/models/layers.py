"""Modules shared by the MLM encoder and the MASS encoder-decoder (parameter names as Hugging Face's BERT,
so that weights map one to one). Attention takes an `attend(q, k, v)` callable: the model decides how the
mask is applied (the library's fused kernels from O(B) metadata, or a dense mask in plain PyTorch), and the
layers stay the same for both implementations.

Attention-probability dropout (`attention_probs_dropout_prob`, in train() only) is the library's: inside
the fused kernels, and in the plain-PyTorch attention the same keep masks (`dropout_mask`), so that both
implementations compute the same function. `AttentionDropout` numbers a forward's attention calls: call c
of step t draws offset t x calls + c under one seed, keyed by each row's sample id (under data
parallelism the global one: N ranks drop what one rank would).
"""
from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from .config import ModelConfig

# attend(q, k, v, window=-1): attention of token-major q, k, v; window w >= 0 restricts a local layer to
# the keys j with |i - j| <= w (FlashAttention's window_size=(w, w))
Attend = Callable[..., torch.Tensor]


class AttentionDropout:
    """Attention-probability dropout of one forward pass (p = 0: off).

    seed: int or 0-dim tensor; None draws one from torch's default generator (as nn.Dropout draws from it:
    torch.manual_seed reproduces a run). step: the training step (int or 0-dim tensor); `calls`: attention
    calls per forward, so that every call of every step has its own offset. sample_ids: (B,) or None (the
    batch row)."""

    def __init__(self, p: float, calls: int, seed=None, step=0, sample_ids=None):
        self.p, self.calls, self.step, self.sample_ids, self.count = float(p), calls, step, sample_ids, 0
        if self.p > 0 and seed is None:
            seed = torch.randint(-(2**63), 2**63 - 1, (), dtype=torch.int64)
        self.seed = seed

    def next(self) -> dict:
        """The dropout arguments of the forward's next attention call ({} when off)."""
        if self.p <= 0:
            return {}
        offset = self.step * self.calls + self.count
        self.count += 1
        return dict(dropout_p=self.p, dropout_seed=self.seed, dropout_offset=offset, sample_ids=self.sample_ids)


NO_DROPOUT = AttentionDropout(0.0, 1)


class Embeddings(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.word_embeddings = nn.Embedding(cfg.vocab_size, cfg.hidden_size, padding_idx=cfg.pad_token_id)
        learned = cfg.position_embedding_type == "learned"  # RoPE and ALiBi act in attention instead
        self.position_embeddings = nn.Embedding(cfg.max_position_embeddings, cfg.hidden_size) if learned else None
        self.token_type_embeddings = nn.Embedding(cfg.type_vocab_size, cfg.hidden_size)
        self.LayerNorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.dropout = nn.Dropout(cfg.hidden_dropout_prob)

    def forward(self, ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        x = self.word_embeddings(ids)
        if self.position_embeddings is not None:
            x = x + self.position_embeddings(positions)
        return self.dropout(self.LayerNorm(x + self.token_type_embeddings.weight[0]))


def rotary_tables(positions: torch.Tensor, dim: int, theta: float, dtype: torch.dtype):
    """RoPE's (cos, sin), each (*positions.shape, dim), in the GPT-NeoX / Hugging Face layout (the two
    halves of the head dimension rotate together: frequencies theta^(-2i/dim) repeated twice). Computed in
    fp32 (fp64 for fp64 models), returned in `dtype`."""
    acc = torch.promote_types(dtype, torch.float32)
    inv = theta ** (-torch.arange(0, dim, 2, device=positions.device, dtype=acc) / dim)
    freqs = positions[..., None].to(acc) * inv
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def apply_rotary(t: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """t (..., tokens, heads, D) rotated by the tables (..., tokens, D) of its tokens' positions."""
    cos, sin = cos.unsqueeze(-2), sin.unsqueeze(-2)
    half = t.shape[-1] // 2
    return t * cos + torch.cat((-t[..., half:], t[..., :half]), dim=-1) * sin


def alibi_slopes(heads: int) -> torch.Tensor:
    """ALiBi's per-head slopes (Press et al., 2022, as MosaicBERT): the geometric sequence 2^(-8 h / n),
    h = 1..n, for n a power of two; otherwise those of the power of two below, then every other slope of
    the next power of two. (heads,) fp32."""
    def geometric(n: int) -> list[float]:
        return [2.0 ** (-8.0 * h / n) for h in range(1, n + 1)]

    low = 2 ** math.floor(math.log2(heads))
    slopes = geometric(low) + geometric(2 * low)[0::2][: heads - low]
    return torch.tensor(slopes, dtype=torch.float32)


class Attention(nn.Module):
    """Multi-head attention with BERT's post-LayerNorm residual; queries from x, keys/values from `memory`
    (cross-attention) or x. Tensors are token-major: (..., tokens, hidden), heads split as (..., nh, D)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.heads, self.head_dim = cfg.num_attention_heads, cfg.head_dim
        self.query = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        self.key = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        self.value = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        self.dense = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        self.LayerNorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.dropout = nn.Dropout(cfg.hidden_dropout_prob)

    def forward(self, x: torch.Tensor, attend: Attend, memory: torch.Tensor | None = None,
                rotary: tuple[torch.Tensor, torch.Tensor] | None = None, window: int = -1) -> torch.Tensor:
        """rotary: the (cos, sin) tables of x's tokens (self-attention with RoPE); window: see `Attend`."""
        src = x if memory is None else memory
        split = (self.heads, self.head_dim)
        q = self.query(x).unflatten(-1, split)
        k, v = self.key(src).unflatten(-1, split), self.value(src).unflatten(-1, split)
        if rotary is not None:
            q, k = apply_rotary(q, *rotary), apply_rotary(k, *rotary)
        out = self.dense(attend(q, k, v, window=window).flatten(-2))
        return self.LayerNorm(x + self.dropout(out))


class FeedForward(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.intermediate = nn.Linear(cfg.hidden_size, cfg.intermediate_size)
        self.output = nn.Linear(cfg.intermediate_size, cfg.hidden_size)
        self.LayerNorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.dropout = nn.Dropout(cfg.hidden_dropout_prob)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.LayerNorm(x + self.dropout(self.output(F.gelu(self.intermediate(x)))))


class Layer(nn.Module):
    """An encoder layer (self-attention, feed-forward), or with `cross=True` a decoder layer
    (self-attention, cross-attention over the encoder's output, feed-forward)."""

    def __init__(self, cfg: ModelConfig, cross: bool = False):
        super().__init__()
        self.attention = Attention(cfg)
        self.crossattention = Attention(cfg) if cross else None
        self.ffn = FeedForward(cfg)

    def forward(self, x: torch.Tensor, attend: Attend, memory: torch.Tensor | None = None,
                cross_attend: Attend | None = None, rotary=None, window: int = -1) -> torch.Tensor:
        x = self.attention(x, attend, rotary=rotary, window=window)
        if self.crossattention is not None:
            x = self.crossattention(x, cross_attend, memory)
        return self.ffn(x)


class LMHead(nn.Module):
    """BERT's prediction head: dense + GELU + LayerNorm, then the decoder tied to the word embeddings."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.dense = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        self.LayerNorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.bias = nn.Parameter(torch.zeros(cfg.vocab_size))

    def transform(self, x: torch.Tensor) -> torch.Tensor:
        return self.LayerNorm(F.gelu(self.dense(x)))


def init_weights(module: nn.Module, std: float = 0.02) -> None:
    """BERT's initialisation: normal(0, 0.02) weights, zero biases, unit LayerNorms (PyTorch's defaults
    give N(0, 1) embeddings, hence tied-head logits in the tens and an initial loss far above ln V)."""
    if isinstance(module, (nn.Linear, nn.Embedding)):
        nn.init.normal_(module.weight, std=std)
    if isinstance(module, nn.Linear) and module.bias is not None:
        nn.init.zeros_(module.bias)
    if isinstance(module, nn.Embedding) and module.padding_idx is not None:
        with torch.no_grad():
            module.weight[module.padding_idx].zero_()
    if isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)


# ------------------------------------------------------------------------------------------------
# attend callables
# ------------------------------------------------------------------------------------------------

def dense_attend(visible: torch.Tensor, dropout: AttentionDropout = NO_DROPOUT,
                 alibi_slopes: torch.Tensor | None = None) -> Attend:
    """Plain PyTorch attention for padded (B, S, nh, D) tensors and a boolean `visible` mask broadcastable to
    (B, nh, Sq, Sk); query rows with no visible key give 0 (as the library's kernels, never NaN). A window
    w >= 0 also hides |i - j| > w; `alibi_slopes` (nh,) add -slope * |i - j| to the scaled scores. Dropout:
    the keep mask the fused kernels draw, built densely (`dropout_mask`)."""
    from ..attention.dropout import dropout_mask

    def attend(q, k, v, window: int = -1):
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))
        scores = (q @ k.transpose(-1, -2)) / math.sqrt(q.shape[-1])
        Sq, Sk = q.shape[-2], k.shape[-2]  # |i + Sk - Sq - j|: the kernels' bottom-right alignment
        dist = (torch.arange(Sq, device=q.device)[:, None] + (Sk - Sq) - torch.arange(Sk, device=q.device)).abs()
        seen = visible if window < 0 else visible & (dist <= window)
        if alibi_slopes is not None:
            scores = scores - alibi_slopes.to(scores)[:, None, None] * dist
        p = torch.softmax(scores.masked_fill(~seen, float("-inf")), dim=-1)
        p = torch.where(seen.any(-1, keepdim=True), p, torch.zeros_like(p))
        drop = dropout.next()
        if drop:
            B, H, Sq, Sk = p.shape
            keep = dropout_mask(B, H, Sq, Sk, **drop, device=q.device)
            p = p * keep / (1.0 - drop["dropout_p"])
        return (p @ v).transpose(1, 2)

    return attend


def padded_fused_attend(dropout: AttentionDropout = NO_DROPOUT, **meta) -> Attend:
    """The library's `fused_attention` for padded (B, S, nh, D) tensors with O(B) mask metadata."""
    from ..attention import fused_attention

    def attend(q, k, v, window: int = -1):
        out = fused_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), **meta,
                              window_size=(window, window), **dropout.next())
        return out.transpose(1, 2)

    return attend


def varlen_fused_attend(cu_seqlens_q, cu_seqlens_k, max_q: int, max_k: int, causal: bool = False,
                        dropout: AttentionDropout = NO_DROPOUT, alibi_slopes: torch.Tensor | None = None) -> Attend:
    """The library's `fused_attention_varlen` for packed (total, nh, D) tensors (sequence b keyed by the
    dropout's sample_ids[b]); a window and ALiBi slopes as `dense_attend`'s."""
    from ..attention import fused_attention_varlen

    def attend(q, k, v, window: int = -1):
        return fused_attention_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_q, max_k, causal=causal,
                                      window_size=(window, window), alibi_slopes=alibi_slopes, **dropout.next())

    return attend
