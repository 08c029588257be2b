"""What keeps the Triton kernels right across the Triton versions the library supports (3.6, the GPU
image's, to the newest; CI runs this file under both): the tile table's entries and its per-version
replacements, `force_tiles`, and the interpreter's scalar conversion, which is fixed for one launch and
put back."""
from __future__ import annotations

import pytest
import torch

triton = pytest.importorskip("triton")

from masklm_kernels.attention import triton_host  # noqa: E402
from masklm_kernels.attention.triton_host import BlockConfig  # noqa: E402


def test_every_table_entry_is_a_candidate_and_every_replacement_replaces_an_entry():
    kinds = {kind for _, _, kind in triton_host._CONFIGS}
    assert kinds == set(triton_host.TILE_KINDS)
    for (kernel, width, kind), rows in triton_host._CONFIGS.items():
        cands = triton_host.tile_candidates(kernel)
        assert len(set(cands)) == len(cands)
        for max_bd, cfg in rows:
            assert cfg in cands, (kernel, width, kind, max_bd, cfg)
    for (kernel, width, kind, max_bd), cfg in triton_host._BEFORE_TRITON_3_9.items():
        assert max_bd in dict(triton_host._CONFIGS[(kernel, width, kind)]), (kernel, width, kind, max_bd)
        assert cfg in triton_host.tile_candidates(kernel)


def test_table_entry_follows_the_installed_triton():
    key = next(iter(triton_host._BEFORE_TRITON_3_9))
    older = tuple(int(x) for x in triton.__version__.split(".")[:2]) < (3, 9)
    base = dict(triton_host._CONFIGS[key[:3]])[key[3]]
    expected = triton_host._BEFORE_TRITON_3_9[key] if older else base
    assert triton_host.table_entry(*key) == expected


def test_force_tiles_is_scoped():
    before = triton_host.block_config("fwd", 64, torch.bfloat16)
    forced = BlockConfig(16, 16, 4, 1)
    with triton_host.force_tiles(fwd=forced):
        assert triton_host.block_config("fwd", 64, torch.bfloat16) == forced
        assert triton_host.block_config("dq", 64, torch.bfloat16) != forced
    assert triton_host.block_config("fwd", 64, torch.bfloat16) == before
    with pytest.raises(ValueError, match="unknown kernel"):
        with triton_host.force_tiles(bwd=forced):
            pass


def test_forced_tiles_compute_the_same_attention():
    """Any candidate is a correct tiling (the table only picks the fast, spill-free one): a forced odd tile
    gives the default's result."""
    from masklm_kernels import fused_attention
    from masklm_kernels._backends import triton_interpreting

    if not (torch.cuda.is_available() or triton_interpreting()):
        pytest.skip("no CUDA device and no interpreter")
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(1, 2, 37, 16, generator=g, dtype=torch.float64 if dev == "cpu" else torch.float32)
               .to(dev).requires_grad_() for _ in range(3))
    lens = torch.tensor([29], device=dev)
    ref = fused_attention(q, k, v, causal=True, kv_lengths=lens, backend="triton")
    (dq,) = torch.autograd.grad(ref.sum(), (q,))
    with triton_host.force_tiles(fwd=BlockConfig(16, 32, 4, 1), dq=BlockConfig(32, 16, 4, 1)):
        out = fused_attention(q, k, v, causal=True, kv_lengths=lens, backend="triton")
        (dq2,) = torch.autograd.grad(out.sum(), (q,))
    torch.testing.assert_close(out, ref)
    torch.testing.assert_close(dq2, dq)


def test_interpreter_scalar_fix_is_undone_after_the_launch():
    from masklm_kernels import _triton_compat
    from masklm_kernels._backends import triton_interpreting

    if not triton_interpreting():
        pytest.skip("only the interpreter is patched")
    from triton.runtime import interpreter

    original = interpreter._patch_lang_tensor
    with _triton_compat.interpreter_scalars():
        if _triton_compat._needs_scalar_fix(interpreter):
            assert interpreter._patch_lang_tensor is not original
    assert interpreter._patch_lang_tensor is original
