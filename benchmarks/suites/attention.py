"""Suite `attention`: `masklm_kernels.fused_attention` against what a user would otherwise run, same inputs.

Masks (O(B) metadata for ours; the equivalent dense mask or `mask_mod` for the peers):
* `none`; `causal`;
* `causal_pad`: causal + 25% key/query padding on average (kv_lengths = q_lengths uniform in [S/2, S]);
* `mass_decoder`: MASS decoder self-attention, causal + a 50% fragment, spans "inside";
* `mass_cross`: MASS cross-attention, spans "outside" + kv_lengths;
* `prefix_lm`: causal + prefix_lengths uniform in [0, S/2].
Modes: `fwd` (no autograd), `bwd` (the backward of a forward done untimed in `setup`), `fwd_bwd`.
Shapes: CUDA bf16, 16k tokens per batch (B = 16384 / S), H x D = 2048 (D 64 and 128), S 128 .. 8192
(quick: S 1024 and 4096, D 128); CPU fp32, B=8, H=8, D=64, S 512 and 1024 (quick: 512); smoke: B=2, H=2,
S=64, D=16.

Peers, same tensors: `sdpa_dense` -- F.scaled_dot_product_attention with the dense (B, 1, S, S) bool mask
(built once, untimed, as a user would cache it; rows with no visible key get their diagonal, since SDPA
returns NaN there); `sdpa_causal` (is_causal=True: less masking than asked, a lower bound) for the causal
kinds and plain SDPA for `none`; `flex` -- FlexAttention compiled, with the equivalent `mask_mod` (its
`create_block_mask` timed separately as contender `flex_block_mask`; on CPU forward only: torch has no CPU
backward for it, recorded as skipped); `flash_attn` (`none` and `causal`) on CUDA when installed, recorded as
skipped with the reason otherwise. On CUDA also `sdpa_flash` (`none`, `causal`) and `sdpa_efficient`: SDPA
pinned to one backend with `sdpa_kernel`; and for `causal_pad` the packed layout, `ours_varlen`
(`fused_attention_varlen`) against torch's `varlen_attn` on the same packed tensors (fwd_bwd). TFLOP/s
count visible pairs only (4 * D flops per visible pair forward, 2.5x that backward, FlashAttention's
convention), so a kernel that skips invisible work is not credited for it; `pct_of_roofline` compares
them with the measured dense-matmul rate. On CUDA, `extra` records the tiles each Triton kernel computed
and the tiles holding a visible pair.

Dropout (`causal_pad`, p = 0.1, cases with "dropout": 0.1): `ours` with `dropout_p` against
`sdpa_dense` with the same dropout_p (SDPA draws its mask from torch's generator; on CPU that is its math
path) and against our own no-dropout record of the same shapes (label `no_dropout`: what dropout costs).
Modes fwd and fwd_bwd.

The position options (a sliding window, ALiBi) have cases of their own shapes: attention_positions.py.
"""
from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from ..harness import Case, missing_peer

OP = "fused_attention"
MASKS = ("none", "causal", "causal_pad", "mass_decoder", "mass_cross", "prefix_lm")
MODES = ("fwd", "bwd", "fwd_bwd")
FLOPS_FACTOR = {"fwd": 1.0, "bwd": 2.5, "fwd_bwd": 3.5}  # of the forward's 4 * D per visible pair
DATA_SEED = 4321
FLEX_CPU_BACKWARD = "FlexAttention has no CPU backward (torch raises NotImplementedError): forward only on CPU"
DROPOUT_P = 0.1
DROPOUT_SEED = 1234


def _metadata(kind: str, B: int, S: int, g: torch.Generator) -> dict:
    if kind == "none":
        return {}
    if kind == "causal":
        return dict(causal=True)
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


def _visibility(meta: dict, B: int, S: int, device) -> torch.Tensor:
    from masklm_kernels.attention.masks import visibility

    return visibility(B, S, S, device=device, **meta)


def _mask_mod(meta: dict):
    """FlexAttention's mask_mod for the same metadata (None: no mask)."""
    if not meta:
        return None
    causal, prefix = meta.get("causal", False), meta.get("prefix_lengths")
    kv_len, q_len, spans = meta.get("kv_lengths"), meta.get("q_lengths"), meta.get("spans")
    inside = meta.get("span_mode", "inside") == "inside"

    def mod(b, h, q_idx, kv_idx):
        ok = q_idx >= 0  # an all-True start of the same shape
        if causal:
            c = kv_idx <= q_idx
            ok = ok & ((c | (kv_idx < prefix[b])) if prefix is not None else c)
        if kv_len is not None:
            ok = ok & (kv_idx < kv_len[b])
        if q_len is not None:
            ok = ok & (q_idx < q_len[b])
        if spans is not None:
            key_in = (kv_idx >= spans[b, 0]) & (kv_idx < spans[b, 1])
            ok = ok & ((key_in & (q_idx >= spans[b, 0]) & (q_idx < spans[b, 1])) if inside else ~key_in)
        return ok

    return mod


def _step(attn, q, k, v, grad, mode: str, *out):
    if mode == "fwd":
        with torch.no_grad():
            return attn(q, k, v)
    if mode == "bwd":
        return torch.autograd.grad(out[0], (q, k, v), grad)
    return torch.autograd.grad(attn(q, k, v), (q, k, v), grad)


def _case(contender: str, attn, tensors, mode: str, case: dict, device: str, flops: float, **kw) -> Case:
    q, k, v, grad = tensors
    setup = (lambda: (attn(q, k, v),)) if mode == "bwd" else None
    return Case(OP, contender, case, fn=functools.partial(_step, attn, q, k, v, grad, mode), setup=setup,
                device=device, tokens=q.shape[0] * q.shape[2], flops=flops, **kw)


def _sdpa_backends(kind: str, dense: torch.Tensor) -> dict:
    """SDPA pinned to one CUDA backend each (`sdpa_kernel`): `sdpa_flash` (no mask argument: `none` and
    `causal` only) and `sdpa_efficient` (memory-efficient, takes the dense mask)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    def pinned(backend, **kw):
        def attn(q, k, v):
            with sdpa_kernel(backend):
                return F.scaled_dot_product_attention(q, k, v, **kw)
        return attn

    mask_kw = {} if kind == "none" else dict(is_causal=True) if kind == "causal" else dict(attn_mask=dense)
    out = {"sdpa_efficient": pinned(SDPBackend.EFFICIENT_ATTENTION, **mask_kw)}
    if kind in ("none", "causal"):
        out["sdpa_flash"] = pinned(SDPBackend.FLASH_ATTENTION, **mask_kw)
    return out


def _varlen_cases(tensors, lengths: torch.Tensor, case_base: dict, flops: float, device: str) -> list[Case]:
    """Packed layout (padding removed, untimed): `fused_attention_varlen` against torch's
    `torch.nn.attention.varlen.varlen_attn` (FlashAttention's varlen kernel; CUDA only), causal, on the
    same packed tensors, fwd+bwd."""
    from masklm_kernels import fused_attention_varlen

    case = {**case_base, "layout": "varlen", "mode": "fwd_bwd"}
    valid = torch.arange(tensors[0].shape[2], device=lengths.device)[None] < lengths[:, None]
    packed = [t.detach().transpose(1, 2)[valid].contiguous().requires_grad_(i < 3) for i, t in enumerate(tensors)]
    cu = torch.nn.functional.pad(lengths.cumsum(0), (1, 0)).to(torch.int32)
    S = int(lengths.max())
    tokens = packed[0].shape[0]
    reason = missing_peer("torch.nn.attention.varlen", "torch>=2.10", device)

    def run(attn):
        q, k, v, grad = packed
        return torch.autograd.grad(attn(q, k, v), (q, k, v), grad)

    out = []
    if reason:
        out.append(Case(OP, "varlen_attn", case, device=device, skip=reason))
    else:
        from torch.nn.attention.varlen import varlen_attn

        out.append(Case(OP, "varlen_attn", case, device=device, tokens=tokens, flops=flops * FLOPS_FACTOR["fwd_bwd"],
                        fn=functools.partial(run, lambda q, k, v: varlen_attn(q, k, v, cu, cu, S, S,
                                                                               window_size=(-1, 0))),
                        notes="torch.nn.attention.varlen.varlen_attn, window (-1, 0) = causal"))
    out.append(Case(OP, "ours_varlen", case, device=device, tokens=tokens, flops=flops * FLOPS_FACTOR["fwd_bwd"],
                    fn=functools.partial(run, lambda q, k, v: fused_attention_varlen(q, k, v, cu, cu, S, S,
                                                                                      causal=True)),
                    peers={"varlen_attn": (OP, "varlen_attn", case)},
                    notes="fused_attention_varlen, backend=auto"))
    return out


def _dropout_cases(tensors, meta: dict, dense: torch.Tensor, device: str, flops: float, base: dict) -> list[Case]:
    """`ours` and `sdpa_dense` with dropout_p = DROPOUT_P, compared with each other and with our no-dropout
    record of the same case."""
    from masklm_kernels import fused_attention

    ours = functools.partial(fused_attention, **meta, dropout_p=DROPOUT_P, dropout_seed=DROPOUT_SEED, backend="auto")
    sdpa = functools.partial(F.scaled_dot_product_attention, attn_mask=dense, dropout_p=DROPOUT_P)
    out = []
    for mode in ("fwd", "fwd_bwd"):
        case = {**base, "mode": mode, "dropout": DROPOUT_P}
        out.append(_case("sdpa_dense", sdpa, tensors, mode, case, device, flops * FLOPS_FACTOR[mode],
                         notes=f"dense (B,1,S,S) bool mask, built untimed; dropout_p={DROPOUT_P}"))
        out.append(_case("ours", ours, tensors, mode, case, device, flops * FLOPS_FACTOR[mode],
                         peers={"sdpa_dense": (OP, "sdpa_dense", case),
                                "no_dropout": (OP, "ours", {**base, "mode": mode})},
                         notes=f"backend=auto, dropout_p={DROPOUT_P} (keep masks regenerated in the backward)"))
    return out


def _tiles(ours, tensors, vis: torch.Tensor) -> dict:
    """Tiles each Triton kernel computed vs tiles holding a visible pair (one forward + backward)."""
    from masklm_kernels.attention import reference
    from masklm_kernels.attention.triton_host import record_tiles

    q, k, v, grad = tensors
    with record_tiles() as launches:
        torch.autograd.grad(ours(q, k, v), (q, k, v), grad)
    full = vis.expand(q.shape[0], q.shape[1], -1, -1)
    return {f"tiles_{t.kernel}": f"{t.computed}/{reference.tiles_needed(full, t.block_m, t.block_n)}"
            for t in launches}


@functools.lru_cache(maxsize=1)
def _flex():
    from torch.nn.attention.flex_attention import flex_attention

    # One compiled graph per (shape, mask_mod): more than dynamo's default 8 recompiles of one function in a
    # full run, after which it would silently run flex_attention eagerly (unfused, not what a user measures).
    torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 256)
    return torch.compile(flex_attention, dynamic=False)


def _flex_call(q, k, v, *, block_mask, detach: bool):
    if detach:
        q, k, v = q.detach(), k.detach(), v.detach()
    return _flex()(q, k, v, block_mask=block_mask)


def _shapes(device: str, size: str):
    quick = size == "quick"
    if size == "smoke":
        return [(2, 2, 64, 16)]
    if device == "cuda":
        seqs, dims = ((1024, 4096), (128,)) if quick else ((128, 512, 1024, 2048, 4096, 8192), (64, 128))
        return [(16384 // S, 2048 // D, S, D) for D in dims for S in seqs]
    return [(8, 8, S, 64) for S in ((512,) if quick else (512, 1024))]


def cases(device: str, size: str) -> list[Case]:
    from masklm_kernels import fused_attention

    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    no_flash = missing_peer("flash_attn", "flash-attn", device)
    out: list[Case] = []
    for B, H, S, D in _shapes(device, size):
        g = torch.Generator().manual_seed(DATA_SEED + S + D)
        tensors = tuple(torch.randn(B, H, S, D, generator=g).to(device, dtype).requires_grad_(i < 3) for i in range(4))
        for kind in MASKS:
            meta = {n: (t.to(device) if isinstance(t, torch.Tensor) else t)
                    for n, t in _metadata(kind, B, S, g).items()}
            vis = _visibility(meta, B, S, device)
            pairs = int(vis.sum()) * H
            dense = vis | torch.eye(S, dtype=torch.bool, device=device)  # SDPA gives NaN on rows with no key
            ours = functools.partial(fused_attention, **meta, backend="auto")
            peers_fn = {"sdpa_dense": functools.partial(F.scaled_dot_product_attention, attn_mask=dense)}
            if kind == "none":
                peers_fn["sdpa"] = F.scaled_dot_product_attention
            elif meta.get("causal"):
                peers_fn["sdpa_causal"] = functools.partial(F.scaled_dot_product_attention, is_causal=True)
            from torch.nn.attention.flex_attention import create_block_mask

            mod = _mask_mod(meta)
            block_mask = None if mod is None else create_block_mask(mod, B, None, S, S, device=device)
            # on CPU (forward only) flex refuses inputs that require grad, even under no_grad: detach them
            peers_fn["flex"] = functools.partial(_flex_call, block_mask=block_mask, detach=device == "cpu")
            skipped = {}  # optional peers that cannot run here: recorded with the reason
            if kind in ("none", "causal"):
                if no_flash:
                    skipped["flash_attn"] = no_flash
                else:
                    from flash_attn import flash_attn_func

                    peers_fn["flash_attn"] = lambda q, k, v, c=kind == "causal": flash_attn_func(
                        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), causal=c).transpose(1, 2)
            if device == "cuda":
                peers_fn.update(_sdpa_backends(kind, dense))
            extra = _tiles(ours, tensors, vis) if device == "cuda" else {}
            for mode in MODES:
                case = {"B": B, "H": H, "S": S, "D": D, "mask": kind, "mode": mode}
                flops = 4.0 * D * pairs * FLOPS_FACTOR[mode]
                for name, fn in peers_fn.items():
                    note = {"sdpa_dense": "dense (B,1,S,S) bool mask, built untimed",
                            "sdpa_causal": "is_causal only: less masking than asked",
                            "flex": "compiled flex_attention, block mask built untimed"}.get(name)
                    skip = FLEX_CPU_BACKWARD if name == "flex" and device == "cpu" and mode != "fwd" else None
                    out.append(_case(name, fn, tensors, mode, case, device, flops, notes=note, skip=skip))
                out += [Case(OP, name, case, device=device, skip=why) for name, why in skipped.items()]
                out.append(_case("ours", ours, tensors, mode, case, device, flops, extra=extra,
                                 peers={n: (OP, n, case) for n in (*peers_fn, *skipped)},
                                 notes="backend=auto: triton on CUDA, cpu (blockwise) on CPU"))
            if kind == "causal_pad":
                out += _dropout_cases(tensors, meta, dense, device, 4.0 * D * pairs, {"B": B, "H": H, "S": S, "D": D,
                                                                                      "mask": kind})
                out += _varlen_cases(tensors, meta["kv_lengths"], case_base={"B": B, "H": H, "S": S, "D": D,
                                                                             "mask": kind}, flops=4.0 * D * pairs,
                                     device=device)
            if block_mask is not None:
                out.append(Case(OP, "flex_block_mask", {"B": B, "H": H, "S": S, "D": D, "mask": kind, "mode": "mask"},
                                fn=functools.partial(create_block_mask, _mask_mod(meta), B, None, S, S, device=device),
                                device=device, notes="FlexAttention create_block_mask, per new metadata"))
    from . import attention_positions

    return out + attention_positions.cases(device, size)
