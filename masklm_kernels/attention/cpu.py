"""CPU backend of masked attention, forward and backward.

Never builds a (B, Sq, Sk) mask. The work is cut into (batch row, block of BLOCK_Q query rows) pieces.
For each piece, the visibility comes from the O(B) metadata (masks.py), and only the piece's visible
key range [k_lo, k_hi) is computed, so causal, prefix, padding and span masks skip their invisible key
blocks, and pieces with nothing visible are skipped whole. Each piece runs ATen's fused CPU flash
attention kernel (`_scaled_dot_product_flash_attention_for_cpu`, online softmax, GQA, fp32
accumulation for fp16/bf16) with the piece's additive mask. The backward is that kernel's backward
from the saved log-sum-exp, accumulated in a fixed order, so it is deterministic. Memory is
O(H x BLOCK_Q x Sk) per piece, plus a (B, BLOCK_Q, Sk) bool visibility per query block.

When every batch row sees the same pairs (no lengths, prefixes or spans: a sliding window, ALiBi, a
batch-broadcast dense mask), a query block is one piece for the whole batch: one kernel call instead of B
(measured, B=4 H=8 D=64 fp32, window (64, 64), fwd+bwd on 2 cores: S=1024 161 -> 99 ms, S=4096 773 ->
506 ms; SDPA with the dense band takes 340 and 4725 ms).

Rows with no visible key: the kernel returns 0 for them and gives them zero gradients; pieces leave out
the rows of their block that have none (padding rows, rows outside an "inside" span). Without any mask,
or with a plain causal mask and Sq == Sk, one call of the kernel covers the whole batch.

With attention dropout the same pieces are computed by cpu_dropout.py instead (ATen's kernel draws its
dropout from torch's generator, which the other backends cannot reproduce).
"""
from __future__ import annotations

import torch

from .._common import acc_dtype
from .cpu_dropout import piece_backward, piece_forward, piece_keep
from .inputs import NO_DROPOUT, Dropout, Mask
from .masks import diagonal_offset, visibility

# Query rows per piece. Measured on 2 cores (B=8, H=8, S=512, D=64, fp32, fwd+bwd): 64 rows was 10-35%
# slower than 128 (more pieces, more per-piece overhead) on every mask kind of the attention suite.
BLOCK_Q = 128

_FLASH = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
_FLASH_BWD = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward


# A piece's visible keys are gathered (index_select of K and V) rather than taken as the range
# [first, last] when fewer than this share of the range is visible: e.g. MASS cross-attention, whose
# visible keys surround the fragment (measured: 1.09x -> 0.6x SDPA time at S=1024, 50% fragment).
GATHER_BELOW = 0.75


def _keys(t: torch.Tensor, rows: slice, keys) -> torch.Tensor:
    """Batch rows `rows` of a (B, H, S, D) tensor, restricted to `keys` (a slice or an index tensor)."""
    return t[rows, :, keys] if isinstance(keys, slice) else t[rows].index_select(2, keys)


def _pieces(q: torch.Tensor, k: torch.Tensor, mask: Mask, whole_rows: bool = True):
    """Yields (rows, i0, i1, keys, mask) for every piece with a visible pair: `rows` a slice of batch rows
    (one row, or with `whole_rows` and a mask that is the same for every row, all of them: one kernel call
    per query block instead of B, e.g. a sliding window without padding); `keys` is a slice of the key
    range holding every visible key, or an index tensor of them when the range is sparse; `mask` is the
    piece's additive mask (1 or len(rows), 1 or Hq, i1 - i0, n_keys): 0 / the attn_mask bias where
    visible, -inf elsewhere. Visibility and key ranges are computed for all batch rows of a query block
    at once (a (B, block, Sk) bool): per-piece Python work is then a few slices."""
    B, _, Sq, _ = q.shape
    Sk = k.shape[2]
    if Sk == 0:
        return  # no keys: every row is dead
    uniform = whole_rows and mask.same_for_every_row
    nb = 1 if uniform else B  # batch rows whose visibility is computed
    alibi = mask.alibi_slopes
    # ALiBi's bias is kept in the accumulation dtype (ATen's kernel takes an fp32 mask for fp16/bf16 inputs):
    # in bf16 the slopes times distances would be rounded to 8 bits
    bias_dtype = acc_dtype(q) if alibi is not None else q.dtype
    if alibi is not None:
        off = diagonal_offset(B, Sq, Sk, mask.kv_lengths, mask.q_lengths)
        offs = off.view(B).tolist() if isinstance(off, torch.Tensor) else [off] * B
    for i0 in range(0, Sq, BLOCK_Q):
        i1 = min(i0 + BLOCK_Q, Sq)
        kwargs = mask.visibility_kwargs()
        vis = visibility(nb, Sq, Sk, device=q.device, rows=(i0, i1), **kwargs)
        bias = None
        attn_mask = mask.attn_mask
        if attn_mask is not None:
            m = attn_mask[..., i0:i1, :] if attn_mask.shape[-2] != 1 else attn_mask
            if m.dtype == torch.bool:
                vis = vis & m
            else:
                bias = m
                vis = vis & (m != float("-inf"))
        # amax over a uint8 view: 30-60x faster than Tensor.any on bool (measured, torch 2.13 CPU, 8x128x512)
        u8 = vis.view(torch.uint8)
        key_any = u8.amax(dim=2).amax(dim=1).bool().expand(nb, Sk)  # (nb, Sk): keys visible to some row of the block
        row_any = u8.amax(dim=3).amax(dim=1).bool().expand(nb, i1 - i0)  # (nb, rows): rows with a visible key
        lo, hi = _extent(key_any)
        r_lo, r_hi = _extent(row_any)
        count = key_any.sum(dim=1).tolist()
        for b in range(nb):
            if hi[b] <= lo[b]:
                continue  # nothing visible in this piece
            batch = slice(0, B) if uniform else slice(b, b + 1)
            keys = slice(lo[b], hi[b])
            if count[b] < GATHER_BELOW * (hi[b] - lo[b]):
                keys = key_any[b].nonzero().squeeze(1)
            rows = slice(r_lo[b], r_hi[b])  # rows with no visible key (padding, outside a span) are left out
            vb = vis[b if vis.shape[0] > 1 else 0][None][..., rows, :]
            vb = vb[..., keys] if isinstance(keys, slice) else vb.index_select(-1, keys)
            additive = None
            if bias is not None:
                bb = bias[batch] if bias.shape[0] > 1 else bias
                bb = bb[..., rows, :] if bb.shape[-2] != 1 else bb
                additive = (bb[..., keys] if isinstance(keys, slice) else bb.index_select(-1, keys)).to(bias_dtype)
            if alibi is not None:
                j = torch.arange(Sk)[keys]
                i = torch.arange(i0 + r_lo[b], i0 + r_hi[b])
                dist = (i[:, None] + offs[b] - j[None, :]).abs().to(bias_dtype)  # uniform: one offset for all
                term = dist * (-alibi[batch]).to(bias_dtype)[:, :, None, None]  # (rows of the batch, Hq, r, n)
                additive = term if additive is None else additive + term
            if additive is None:
                additive = torch.zeros(vb.shape, dtype=bias_dtype)
            # -inf where hidden; a piece whose key range is all visible (padding, a window) needs no pass:
            # with ALiBi's (Hq, rows, keys) bias that pass was a fifth of the time (measured, S=1024)
            if not bool(vb.view(torch.uint8).amin()):
                additive = additive.masked_fill(~vb, float("-inf"))
            yield batch, i0 + r_lo[b], i0 + r_hi[b], keys, additive


def _extent(any_: torch.Tensor) -> tuple[list[int], list[int]]:
    """Per batch row, [first, last + 1) of the True entries of a (B, n) bool (empty: first >= last + 1)."""
    n = any_.shape[1]
    idx = torch.arange(n, device=any_.device)
    return torch.where(any_, idx, n).amin(dim=1).tolist(), (torch.where(any_, idx, -1).amax(dim=1) + 1).tolist()


def _whole_batch(q, k, mask: Mask):
    """ATen's kernel over the whole batch in one call when the mask is none or plain causal with Sq == Sk
    (its own causal mask is top-left aligned; it skips the causal blocks itself): is_causal, else None."""
    if mask.attn_mask is not None or q.numel() == 0 or k.numel() == 0:
        return None  # ATen's kernel divides by the sizes: an empty input would kill the process (SIGFPE)
    if mask.has_metadata:
        return None
    if mask.causal:
        return True if q.shape[2] == k.shape[2] else None
    return False


def _samples(drop: Dropout, B: int) -> torch.Tensor:
    """(B,) int64 CPU sample keys of the dropout mask."""
    return drop.sample_ids.cpu() if drop.sample_ids is not None else torch.arange(B)


def forward(q, k, v, mask: Mask, scale: float, dropout: Dropout = NO_DROPOUT) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns (out (B, Hq, Sq, D) in q's dtype, lse (B, Hq, Sq), the kernel's log-sum-exp)."""
    B, Hq, Sq, D = q.shape
    lse_dtype = acc_dtype(q)
    is_causal = None if dropout.active else _whole_batch(q, k, mask)
    if is_causal is not None:
        out, lse = _FLASH(q, k, v, 0.0, is_causal, scale=scale)
        return out.contiguous(), lse.to(lse_dtype).contiguous()  # ATen returns them (B, S, H)-strided
    out = torch.zeros_like(q)
    lse = torch.zeros(B, Hq, Sq, dtype=lse_dtype)
    samples = _samples(dropout, B) if dropout.active else None
    # with dropout, one batch row per piece: its keep mask is drawn per sample (cpu_dropout.py)
    for rows, i0, i1, keys, bias in _pieces(q, k, mask, whole_rows=not dropout.active):
        if dropout.active:
            b = rows.start
            z = piece_keep(dropout, samples[rows], Hq, i0, i1, keys, lse_dtype)
            o, l = piece_forward(q[b, :, i0:i1].to(lse_dtype), _keys(k, rows, keys)[0].to(lse_dtype),
                                 _keys(v, rows, keys)[0].to(lse_dtype), bias[0], z, scale)
        else:
            o, l = _FLASH(q[rows, :, i0:i1], _keys(k, rows, keys), _keys(v, rows, keys), 0.0, False,
                          attn_mask=bias, scale=scale)
        out[rows, :, i0:i1] = o
        lse[rows, :, i0:i1] = l
    return out, lse


def backward(dout, q, k, v, out, lse, mask: Mask, scale: float, dropout: Dropout = NO_DROPOUT):
    """Gradients (dq, dk, dv) in the inputs' dtypes; rows with no visible key contribute nothing.
    dk and dv sum over the query pieces in fp32 (fp64 for fp64 inputs)."""
    is_causal = None if dropout.active else _whole_batch(q, k, mask)
    if is_causal is not None:
        return tuple(g.contiguous() for g in _FLASH_BWD(dout, q, k, v, out, lse, 0.0, is_causal, scale=scale))
    acc = acc_dtype(q)
    dq = torch.zeros_like(q)
    dk = torch.zeros(k.shape, dtype=acc)
    dv = torch.zeros(v.shape, dtype=acc)
    samples = _samples(dropout, q.shape[0]) if dropout.active else None
    for rows, i0, i1, keys, bias in _pieces(q, k, mask, whole_rows=not dropout.active):
        if dropout.active:
            b = rows.start
            z = piece_keep(dropout, samples[rows], q.shape[1], i0, i1, keys, acc)
            g_q, g_k, g_v = piece_backward(*(t[b, :, i0:i1].to(acc) for t in (dout, q)),
                                           _keys(k, rows, keys)[0].to(acc), _keys(v, rows, keys)[0].to(acc),
                                           out[b, :, i0:i1].to(acc), lse[b, :, i0:i1], bias[0], z, scale)
            g_q, g_k, g_v = g_q[None], g_k[None], g_v[None]
        else:
            g_q, g_k, g_v = _FLASH_BWD(dout[rows, :, i0:i1], q[rows, :, i0:i1], _keys(k, rows, keys),
                                       _keys(v, rows, keys), out[rows, :, i0:i1], lse[rows, :, i0:i1],
                                       0.0, False, attn_mask=bias, scale=scale)
        dq[rows, :, i0:i1] = g_q
        if isinstance(keys, slice):
            dk[rows, :, keys] += g_k
            dv[rows, :, keys] += g_v
        else:  # distinct indices, sequential on the CPU: deterministic
            dk[rows].index_add_(2, keys, g_k.to(acc))
            dv[rows].index_add_(2, keys, g_v.to(acc))
    return dq, dk.to(k.dtype), dv.to(v.dtype)


# ------------------------------------------------------------------------------------------------
# Packed (varlen) layout: each sequence is a batch row of its own
# ------------------------------------------------------------------------------------------------

def _sequences(cu_q: torch.Tensor, cu_k: torch.Tensor):
    """(q0, q1, k0, k1) of each packed sequence (CPU tensors: reading them syncs nothing)."""
    return zip(cu_q[:-1].tolist(), cu_q[1:].tolist(), cu_k[:-1].tolist(), cu_k[1:].tolist())


def _row(t: torch.Tensor, a: int, b: int) -> torch.Tensor:
    """Tokens [a, b) of a packed (total, H, D) tensor as a (1, H, b - a, D) batch row."""
    return t[a:b].transpose(0, 1).unsqueeze(0).contiguous()


def _sequence_dropout(drop: Dropout, index: int) -> Dropout:
    """The dropout of packed sequence `index` as a batch of one: keyed by its sample id."""
    if not drop.active:
        return drop
    sample = drop.sample_ids[index:index + 1].cpu() if drop.sample_ids is not None else torch.tensor([index])
    return Dropout(drop.p, drop.seed, drop.offset, sample)


def _sequence_mask(causal: bool, left: int, right: int, alibi, index: int) -> Mask:
    """The mask of packed sequence `index` as a batch row of its own."""
    return Mask(causal=causal, window_left=left, window_right=right,
                alibi_slopes=None if alibi is None else alibi[index:index + 1])


def varlen_forward(q, k, v, cu_q, cu_k, max_q: int, max_k: int, causal: bool, left: int, right: int, alibi,
                   scale: float, dropout: Dropout = NO_DROPOUT):
    """(out (total_q, Hq, D), lse (Hq, total_q)); causal and the window bottom-right aligned per sequence."""
    out = torch.zeros_like(q)
    lse = torch.zeros(q.shape[1], q.shape[0], dtype=acc_dtype(q))
    for n, (q0, q1, k0, k1) in enumerate(_sequences(cu_q, cu_k)):
        if q1 > q0:
            o, l = forward(_row(q, q0, q1), _row(k, k0, k1), _row(v, k0, k1),
                           _sequence_mask(causal, left, right, alibi, n), scale, _sequence_dropout(dropout, n))
            out[q0:q1] = o[0].transpose(0, 1)
            lse[:, q0:q1] = l[0]
    return out, lse


def varlen_backward(dout, q, k, v, out, lse, cu_q, cu_k, max_q: int, max_k: int, causal: bool, left: int,
                    right: int, alibi, scale: float, dropout: Dropout = NO_DROPOUT):
    dq, dk, dv = torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
    for n, (q0, q1, k0, k1) in enumerate(_sequences(cu_q, cu_k)):
        if q1 > q0:
            g_q, g_k, g_v = backward(_row(dout, q0, q1), _row(q, q0, q1), _row(k, k0, k1), _row(v, k0, k1),
                                     _row(out, q0, q1), lse[None, :, q0:q1].contiguous(),
                                     _sequence_mask(causal, left, right, alibi, n), scale,
                                     _sequence_dropout(dropout, n))
            dq[q0:q1] = g_q[0].transpose(0, 1)
            dk[k0:k1] = g_k[0].transpose(0, 1)
            dv[k0:k1] = g_v[0].transpose(0, 1)
    return dq, dk, dv
