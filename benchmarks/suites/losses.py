"""Suite `losses`: the MLM loss over labelled rows only, against what a user would otherwise run, same inputs.

`fused_linear_cross_entropy` (LM head fused with the loss, labelled rows only) against
* `full_logits`: F.linear over every row, then F.cross_entropy (what BERT-style heads do);
* `gather_ce`: select the labelled rows first (a host sync), then F.linear + F.cross_entropy;
* `torch_lce`: torch's F.linear_cross_entropy (reference path), and `torch_lce_chunked` with
  LinearCrossEntropyOptions() (its chunked path), where this torch has them;
* `liger`: Liger-Kernel's fused linear cross-entropy on CUDA when installed (else recorded as skipped);
TFLOP/s count the useful work only (6 * labelled rows * H * V: logits, dh, dW of the labelled rows);
(`ours_bounded` is ours with `max_labelled_rows`: no host synchronisation on CUDA), and
`masked_cross_entropy` on given logits against F.cross_entropy (`logits_ce`).
Shapes: CPU fp32, N = 4096 tokens, hidden 256, V = 30522 (full: also 50265), labelled fraction 15% / 50% /
100% (quick and smoke: 15%; smoke: N = 64, hidden 32, V = 1000); CUDA bf16, N = 16384, hidden 1024,
V = 30522, 50265, 128256 (quick: 50265, the GPU target's shape). Mode fwd_bwd (loss, then gradients of
every input that has one). Peak memory is the number to read next to time: the peers' (N, V) logits.
"""
from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from ..harness import Case, missing_peer

DATA_SEED = 777
FRACTIONS = (0.15, 0.5, 1.0)


def _shapes(device: str, size: str):
    quick = size == "quick"
    if size == "smoke":
        return [(64, 32, 1000)]
    if device == "cuda":
        return [(16384, 1024, V) for V in ((50265,) if quick else (30522, 50265, 128256))]
    return [(4096, 256, V) for V in ((30522,) if quick else (30522, 50265))]


def _fwd_bwd(loss_fn, leaves):
    loss = loss_fn()
    return torch.autograd.grad(loss, leaves)


def _full_logits(h, w, y):
    return F.cross_entropy(F.linear(h, w).float(), y)


def _gather_ce(h, w, y):
    keep = (y != -100).nonzero().squeeze(1)
    return F.cross_entropy(F.linear(h.index_select(0, keep), w).float(), y.index_select(0, keep))


def _peers(device: str) -> tuple[dict, dict]:
    """(peer name -> fn(h, w, y), optional peer name -> why it cannot run here)."""
    peers = {"full_logits": _full_logits, "gather_ce": _gather_ce}
    skipped = {}
    lce = getattr(F, "linear_cross_entropy", None)
    options = getattr(torch.nn, "LinearCrossEntropyOptions", None)
    if lce is not None:
        peers["torch_lce"] = lambda h, w, y: lce(h, w, y)
    else:
        skipped["torch_lce"] = f"torch {torch.__version__} has no F.linear_cross_entropy"
    if lce is not None and options is not None:
        peers["torch_lce_chunked"] = lambda h, w, y: lce(h, w, y, options=options())
    else:
        skipped["torch_lce_chunked"] = f"torch {torch.__version__} has no LinearCrossEntropyOptions"
    no_liger = missing_peer("liger_kernel", "liger-kernel", device)
    if no_liger:
        skipped["liger"] = no_liger
    else:
        from liger_kernel.transformers.functional import liger_fused_linear_cross_entropy

        peers["liger"] = lambda h, w, y: liger_fused_linear_cross_entropy(h, w, y)
    return peers, skipped


def cases(device: str, size: str) -> list[Case]:
    from masklm_kernels import fused_linear_cross_entropy, masked_cross_entropy

    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    out: list[Case] = []
    for N, H, V in _shapes(device, size):
        g = torch.Generator().manual_seed(DATA_SEED + V)
        h = torch.randn(N, H, generator=g).to(device, dtype).requires_grad_()
        w = (torch.randn(V, H, generator=g) / H ** 0.5).to(device, dtype).requires_grad_()
        for frac in FRACTIONS if size == "full" else (0.15,):
            y = torch.randint(0, V, (N,), generator=g)
            y[torch.rand(N, generator=g) >= frac] = -100
            y = y.to(device)
            case = {"N": N, "H": H, "V": V, "labelled": frac, "mode": "fwd_bwd"}
            peers, skipped = _peers(device)
            bound = int((y != -100).sum())  # what exact-count masking tells the caller, without a sync
            flops = 6.0 * bound * H * V  # useful work: logits, dh and dW of the labelled rows only
            for name, fn in peers.items():
                out.append(Case("fused_linear_cross_entropy", name, case, device=device, tokens=N, flops=flops,
                                fn=functools.partial(_fwd_bwd, functools.partial(fn, h, w, y), (h, w))))
            out += [Case("fused_linear_cross_entropy", name, case, device=device, skip=why)
                    for name, why in skipped.items()]
            for name, kw in (("ours", {}), ("ours_bounded", dict(max_labelled_rows=bound))):
                ours = functools.partial(fused_linear_cross_entropy, h, w, y, **kw)
                out.append(Case("fused_linear_cross_entropy", name, case, device=device, tokens=N, flops=flops,
                                fn=functools.partial(_fwd_bwd, ours, (h, w)),
                                peers={n: ("fused_linear_cross_entropy", n, case) for n in (*peers, *skipped)},
                                notes="backend=auto (cpu on CPU, triton on CUDA)"
                                      + (", max_labelled_rows = the exact count (no host sync)" if kw else "")))
            if frac == FRACTIONS[0]:  # the loss alone, on given logits
                logits = F.linear(h.detach(), w.detach()).requires_grad_()
                lcase = {"N": N, "V": V, "labelled": frac, "mode": "fwd_bwd"}
                out.append(Case("masked_cross_entropy", "logits_ce", lcase, device=device, tokens=N,
                                fn=functools.partial(_fwd_bwd, functools.partial(F.cross_entropy, logits, y),
                                                     (logits,))))
                out.append(Case("masked_cross_entropy", "ours", lcase, device=device, tokens=N,
                                fn=functools.partial(_fwd_bwd, functools.partial(masked_cross_entropy, logits, y),
                                                     (logits,)),
                                peers={"logits_ce": ("masked_cross_entropy", "logits_ce", lcase)}))
    return out
