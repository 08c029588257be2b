"""Suite `attention`: `masklm_kernels.fused_attention` against PyTorch SDPA with the equivalent mask.

Cases: fp32 (CPU) / bf16 (CUDA), B=8, H=8, D=64, S in {512, 1024} (quick: 512), masks
* `causal_pad`: causal + 25% key/query padding (kv_lengths = q_lengths uniform in [S/2, S]);
* `mass_decoder`: MASS decoder self-attention, causal + spans "inside" (a 50% fragment);
* `mass_cross`: MASS cross-attention, spans "outside" + kv_lengths;
* `prefix_lm`: causal + prefix_lengths uniform in [0, S/2];
each as `fwd` and `fwd_bwd` (forward, then backward of a fixed upstream gradient). Peers, same inputs:
`sdpa_dense` -- F.scaled_dot_product_attention with the dense (B, 1, S, S) bool mask (built once,
untimed, as a user would cache it), and `sdpa_causal` (is_causal=True, no padding) for the causal
kinds. Rows with no visible key are NaN under SDPA, so the dense mask gives those rows their own
diagonal; the work compared is the same.
"""
from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from ..harness import Case

OP = "fused_attention"
B, H, D = 8, 8, 64
MASKS = ("causal_pad", "mass_decoder", "mass_cross", "prefix_lm")
DATA_SEED = 4321


def _metadata(kind: str, S: int, g: torch.Generator) -> dict:
    lengths = torch.randint(S // 2, S + 1, (B,), generator=g)
    if kind == "causal_pad":
        return dict(causal=True, kv_lengths=lengths, q_lengths=lengths)
    frag = torch.randint(0, S // 2 + 1, (B,), generator=g)
    spans = torch.stack([frag, frag + S // 2], dim=1)
    if kind == "mass_decoder":
        return dict(causal=True, spans=spans, span_mode="inside")
    if kind == "mass_cross":
        return dict(spans=spans, span_mode="outside", kv_lengths=lengths)
    return dict(causal=True, prefix_lengths=torch.randint(0, S // 2 + 1, (B,), generator=g))


def _dense_mask(meta: dict, S: int, device) -> torch.Tensor:
    from masklm_kernels.attention.masks import visibility

    vis = visibility(B, S, S, device=device, **{k: (v.to(device) if isinstance(v, torch.Tensor) else v)
                                                 for k, v in meta.items()})
    return vis | torch.eye(S, dtype=torch.bool, device=device)  # SDPA gives NaN on rows with no key


def _step(attn, q, k, v, grad, backward: bool):
    if not backward:
        with torch.no_grad():
            return attn(q, k, v)
    out = attn(q, k, v)
    return torch.autograd.grad(out, (q, k, v), grad)


def cases(device: str, quick: bool) -> list[Case]:
    from masklm_kernels import fused_attention

    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    out: list[Case] = []
    for S in ((512,) if quick else (512, 1024)):
        g = torch.Generator().manual_seed(DATA_SEED + S)
        q, k, v, grad = (torch.randn(B, H, S, D, generator=g).to(device, dtype) for _ in range(4))
        q, k, v = (t.requires_grad_() for t in (q, k, v))
        for kind in MASKS:
            meta = {n: (t.to(device) if isinstance(t, torch.Tensor) else t) for n, t in _metadata(kind, S, g).items()}
            dense = _dense_mask(meta, S, device)
            for mode in ("fwd", "fwd_bwd"):
                case = {"B": B, "H": H, "S": S, "D": D, "mask": kind, "mode": mode}
                bwd = mode == "fwd_bwd"
                peers = {"sdpa_dense": (OP, "sdpa_dense", case)}
                ours = functools.partial(fused_attention, **meta, backend="auto")
                sdpa = functools.partial(F.scaled_dot_product_attention, attn_mask=dense)
                out.append(Case(OP, "sdpa_dense", case, fn=functools.partial(_step, sdpa, q, k, v, grad, bwd),
                                device=device, tokens=B * S, notes="dense (B,1,S,S) bool mask, built untimed"))
                if kind in ("causal_pad", "mass_decoder", "prefix_lm"):
                    causal = functools.partial(F.scaled_dot_product_attention, is_causal=True)
                    out.append(Case(OP, "sdpa_causal", case, fn=functools.partial(_step, causal, q, k, v, grad, bwd),
                                    device=device, tokens=B * S, notes="is_causal only: less masking than asked"))
                    peers["sdpa_causal"] = (OP, "sdpa_causal", case)
                out.append(Case(OP, "ours", case, fn=functools.partial(_step, ours, q, k, v, grad, bwd),
                                device=device, tokens=B * S, peers=peers,
                                notes="backend=auto: cpu (blockwise) on CPU tensors"))
    return out
