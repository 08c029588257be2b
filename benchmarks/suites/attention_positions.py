"""Cases of suite `attention` for the position options: a sliding window and ALiBi (the encoders of
ModernBERT and MosaicBERT), on shapes of their own.

* `sliding_window`: ModernBERT's local attention, 128 tokens around each query (`window_size=(64, 64)`),
  bidirectional, no padding. Peers: `sdpa_dense` with the dense banded (B, 1, S, S) bool mask (what Hugging
  Face's ModernBERT runs without flash-attn); `flex` with the banded `mask_mod` (on CPU forward only); on
  CUDA, the packed layout against torch's `varlen_attn(window_size=(64, 64))` (`ours_varlen` /
  `varlen_attn`).
* `alibi`: MosaicBERT's bidirectional ALiBi with 25% padding on average (kv_lengths = q_lengths uniform in
  [S/2, S]); slopes 2^(-8 h / H) (Press et al.). Peers: `sdpa_dense` with the float (B, H, S, S) bias (ALiBi
  plus -inf on padded keys; padded query rows get their diagonal, as SDPA returns NaN on rows with nothing
  visible); `flex` with the ALiBi `score_mod` and the padding `mask_mod`.

Shapes: CPU fp32 B=4, H=8, D=64, S 1024 and 4096 (quick: 1024); CUDA bf16, 16k tokens per batch, H x D =
2048, D 64, S 1024 .. 8192 (quick: 4096); smoke: B=2, H=2, S=64, D=16. Modes fwd and fwd_bwd. TFLOP/s
count visible pairs only, as in the rest of the suite.
"""
from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from ..harness import Case, missing_peer

OP = "fused_attention"
WINDOW = (64, 64)
MODES = ("fwd", "fwd_bwd")
FLOPS_FACTOR = {"fwd": 1.0, "fwd_bwd": 3.5}
DATA_SEED = 8765


def _shapes(device: str, size: str):
    if size == "smoke":
        return [(2, 2, 64, 16)]
    if device == "cuda":
        return [(16384 // S, 32, S, 64) for S in ((4096,) if size == "quick" else (1024, 4096, 8192))]
    return [(4, 8, S, 64) for S in ((1024,) if size == "quick" else (1024, 4096))]


def alibi_slopes(H: int) -> torch.Tensor:
    """ALiBi's geometric slopes 2^(-8 h / H), h = 1..H (Press et al. 2022), float32."""
    return 2.0 ** (-8.0 * torch.arange(1, H + 1, dtype=torch.float32) / H)


def _window_mod(b, h, q_idx, kv_idx):
    return (kv_idx >= q_idx - WINDOW[0]) & (kv_idx <= q_idx + WINDOW[1])


def _flex(q, k, v, *, detach: bool, **kw):
    from .attention import _flex as compiled

    if detach:  # on CPU (forward only) flex refuses inputs that require grad
        q, k, v = q.detach(), k.detach(), v.detach()
    return compiled()(q, k, v, **kw)


def _step(attn, tensors, mode: str):
    q, k, v, grad = tensors
    if mode == "fwd":
        with torch.no_grad():
            return attn(q, k, v)
    return torch.autograd.grad(attn(q, k, v), (q, k, v), grad)


def _varlen_window_cases(tensors, base: dict, flops: float, device: str) -> list[Case]:
    """CUDA: the batch packed (every sequence full), ours against torch's varlen_attn with the same window."""
    from masklm_kernels import fused_attention_varlen

    case = {**base, "layout": "varlen", "mode": "fwd_bwd"}
    B, H, S, D = tensors[0].shape
    packed = [t.detach().transpose(1, 2).reshape(B * S, H, D).contiguous().requires_grad_(i < 3)
              for i, t in enumerate(tensors)]
    cu = torch.arange(0, (B + 1) * S, S, dtype=torch.int32, device=tensors[0].device)
    run = lambda attn: torch.autograd.grad(attn(*packed[:3]), packed[:3], packed[3])  # noqa: E731
    reason = missing_peer("torch.nn.attention.varlen", "torch>=2.10", device)
    out = []
    if reason:
        out.append(Case(OP, "varlen_attn", case, device=device, skip=reason))
    else:
        from torch.nn.attention.varlen import varlen_attn

        out.append(Case(OP, "varlen_attn", case, device=device, tokens=B * S, flops=flops * FLOPS_FACTOR["fwd_bwd"],
                        fn=functools.partial(run, lambda q, k, v: varlen_attn(q, k, v, cu, cu, S, S,
                                                                               window_size=WINDOW)),
                        notes=f"torch.nn.attention.varlen.varlen_attn, window_size={WINDOW}"))
    out.append(Case(OP, "ours_varlen", case, device=device, tokens=B * S, flops=flops * FLOPS_FACTOR["fwd_bwd"],
                    fn=functools.partial(run, lambda q, k, v: fused_attention_varlen(q, k, v, cu, cu, S, S,
                                                                                      window_size=WINDOW)),
                    peers={"varlen_attn": (OP, "varlen_attn", case)}, notes="fused_attention_varlen, backend=auto"))
    return out


def cases(device: str, size: str) -> list[Case]:
    from torch.nn.attention.flex_attention import create_block_mask

    from masklm_kernels import fused_attention
    from masklm_kernels.attention.masks import visibility

    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    out: list[Case] = []
    for B, H, S, D in _shapes(device, size):
        g = torch.Generator().manual_seed(DATA_SEED + S)
        tensors = tuple(torch.randn(B, H, S, D, generator=g).to(device, dtype).requires_grad_(i < 3) for i in range(4))
        shape = {"B": B, "H": H, "S": S, "D": D}
        # sliding window
        vis = visibility(B, S, S, window_size=WINDOW, device=device)
        pairs = int(vis.sum()) * H
        ours = functools.partial(fused_attention, window_size=WINDOW, backend="auto")
        block_mask = create_block_mask(_window_mod, None, None, S, S, device=device)
        peers = {"sdpa_dense": functools.partial(F.scaled_dot_product_attention, attn_mask=vis),
                 "flex": functools.partial(_flex, block_mask=block_mask, detach=device == "cpu")}
        out += _contest("sliding_window", ours, peers, tensors, shape, device, 4.0 * D * pairs,
                        f"dense banded (B,1,S,S) bool mask, built untimed; window {WINDOW}")
        if device == "cuda":
            out += _varlen_window_cases(tensors, {**shape, "mask": "sliding_window"}, 4.0 * D * pairs, device)
        # ALiBi with padding
        lengths = torch.randint(S // 2, S + 1, (B,), generator=g).to(device)
        slopes = alibi_slopes(H).to(device)
        pad = visibility(B, S, S, kv_lengths=lengths, q_lengths=lengths, device=device)
        pairs = int(pad.sum()) * H
        i = torch.arange(S, device=device)
        bias = -slopes.view(1, H, 1, 1) * (i[:, None] - i[None, :]).abs().to(torch.float32)
        bias = bias.masked_fill(~(pad | torch.eye(S, dtype=torch.bool, device=device)), float("-inf")).to(dtype)
        ours = functools.partial(fused_attention, kv_lengths=lengths, q_lengths=lengths, alibi_slopes=slopes,
                                 backend="auto")

        def score_mod(score, b, h, q_idx, kv_idx):
            return score - slopes[h] * (q_idx - kv_idx).abs()

        def pad_mod(b, h, q_idx, kv_idx):
            return (kv_idx < lengths[b]) & (q_idx < lengths[b])

        block_mask = create_block_mask(pad_mod, B, None, S, S, device=device)
        peers = {"sdpa_dense": functools.partial(F.scaled_dot_product_attention, attn_mask=bias),
                 "flex": functools.partial(_flex, block_mask=block_mask, score_mod=score_mod, detach=device == "cpu")}
        out += _contest("alibi", ours, peers, tensors, shape, device, 4.0 * D * pairs,
                        "dense (B,H,S,S) float ALiBi + padding bias, built untimed")
    return out


def _contest(kind: str, ours, peers: dict, tensors, shape: dict, device: str, flops: float, dense_note: str):
    from .attention import FLEX_CPU_BACKWARD

    out = []
    q = tensors[0]
    for mode in MODES:
        case = {**shape, "mask": kind, "mode": mode}
        for name, fn in peers.items():
            skip = FLEX_CPU_BACKWARD if name == "flex" and device == "cpu" and mode != "fwd" else None
            note = dense_note if name == "sdpa_dense" else "compiled flex_attention, block mask built untimed"
            out.append(Case(OP, name, case, fn=functools.partial(_step, fn, tensors, mode), device=device,
                            tokens=q.shape[0] * q.shape[2], flops=flops * FLOPS_FACTOR[mode], notes=note, skip=skip))
        out.append(Case(OP, "ours", case, fn=functools.partial(_step, ours, tensors, mode), device=device,
                        tokens=q.shape[0] * q.shape[2], flops=flops * FLOPS_FACTOR[mode],
                        peers={n: (OP, n, case) for n in peers}, notes="backend=auto"))
    return out
