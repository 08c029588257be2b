"""The torch.library contract of the masking ops (README, "Using it"): every op is a registered custom
op with a fake implementation, so that ``torch.library.opcheck`` passes and ``torch.compile(fullgraph=True)``
traces through the public functions; a ``step`` (or ``seed``) that is a 0-dim tensor advancing every
iteration reaches the kernel without recompiling (docs/MASKING.md: a pure function of seed, step and sample keys).

torch.compile on the CPU is slow: tensors are small, the Dynamo-only ``CompileCounter`` or ``aot_eager``
backends are used, and a single test goes through Inductor end to end.
"""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch
from torch._dynamo.testing import CompileCounter, CompileCounterWithBackend

from helpers import MASK_ID, SPECIAL_IDS, VOCAB_SIZE, assert_equal, make_batch, require_backend, rng_for

masklm = pytest.importorskip("masklm_kernels")
from masklm_kernels import mask_tokens, mass_mask  # noqa: E402
from masklm_kernels.masking.api import prepare_mask_tokens_args, prepare_mass_mask_args  # noqa: E402

B, S = 4, 24
COMMON = dict(mask_token_id=MASK_ID, vocab_size=VOCAB_SIZE)
N_STEPS = 5

# ------------------------------------------------------------------------------------------------
# Inputs: fresh random batches, one per mode
# ------------------------------------------------------------------------------------------------

def _rates(rng, shape) -> torch.Tensor:
    return torch.from_numpy(rng.uniform(0.05, 0.6, size=shape).astype(np.float32))


def _base_case(op: str, mode: str):
    """(rng, batch, common kwargs) of a fresh random case of `op` in the named mode."""
    rng = rng_for(f"compile {op}", mode)
    bt = make_batch(rng, B, S, dtype=torch.int32 if mode == "int32_ids" else torch.int64)
    kw = dict(COMMON, lengths=bt.lengths, special_token_ids=list(SPECIAL_IDS), seed=int(rng.integers(2**31)),
              step=int(rng.integers(1000)))
    return rng, bt, kw


def mask_tokens_case(mode: str):
    """(input_ids, kwargs) for `mask_tokens` in the named mode."""
    rng, bt, kw = _base_case("mask_tokens", mode)
    extra = {
        "token_float": dict(mlm_probability=0.3),
        "row_rates": dict(mlm_probability=_rates(rng, (B,))),
        "token_rates": dict(mlm_probability=_rates(rng, (B, S))),
        "exact": dict(exact=True, mlm_probability=0.25),
        "exact_token_rates": dict(exact=True, mlm_probability=_rates(rng, (B, S))),
        "word_ids": dict(word_ids=bt.word_ids, mlm_probability=0.3),
        "span": dict(span_lengths=True, word_ids=bt.word_ids),
        "masks": dict(lengths=None, special_token_ids=None, attention_mask=bt.attention_mask.bool(),
                      special_tokens_mask=bt.special_tokens_mask),
        "sample_ids": dict(sample_ids=torch.from_numpy(rng.integers(0, 2**40, size=B))),
        "int32_ids": dict(random_token_range=(5, 500)),
        "tensor_seed_step": dict(seed=torch.tensor(int(rng.integers(2**31))), step=torch.tensor(7)),
    }[mode]
    kw.update(extra)
    return bt.input_ids, kw


def mass_mask_case(mode: str):
    rng, bt, kw = _base_case("mass_mask", mode)
    extra = {
        "default": {},
        "ratio_pred_probs": dict(fragment_ratio=0.15, pred_probs=(0.6, 0.3, 0.1), pad_token_id=4),
        "sample_ids": dict(sample_ids=torch.from_numpy(rng.integers(0, 2**40, size=B))),
        "int32_ids": {},
        "tensor_seed_step": dict(seed=torch.tensor(int(rng.integers(2**31))), step=torch.tensor(7)),
    }[mode]
    kw.update(extra)
    return bt.input_ids, kw


MASK_TOKENS_MODES = ["token_float", "row_rates", "token_rates", "exact", "exact_token_rates", "word_ids", "span",
                     "masks", "sample_ids", "int32_ids", "tensor_seed_step"]
MASS_MASK_MODES = ["default", "ratio_pred_probs", "sample_ids", "int32_ids", "tensor_seed_step"]


# ------------------------------------------------------------------------------------------------
# opcheck: schema, autograd registration, fake tensor, AOT dispatch with dynamic shapes
# ------------------------------------------------------------------------------------------------

def _op(name: str, kind: str):
    if kind == "native":
        require_backend("cpu")  # the C++ op is registered by the extension
        return getattr(torch.ops.masklm_kernels, name).default
    return getattr(torch.ops.masklm_kernels, name + "_reference").default


def _opcheck(op, args):
    result = torch.library.opcheck(op, args)
    assert all(v == "SUCCESS" for v in result.values()), result
    assert {"test_schema", "test_autograd_registration", "test_faketensor",
            "test_aot_dispatch_dynamic"} <= set(result)


@pytest.mark.parametrize("kind", ["native", "reference"])
@pytest.mark.parametrize("mode", MASK_TOKENS_MODES)
def test_opcheck_mask_tokens(mode, kind):
    op = _op("mask_tokens", kind)
    ids, kw = mask_tokens_case(mode)
    args = prepare_mask_tokens_args(ids, **kw)
    _opcheck(op, args)
    out, labels = op(*args)
    assert out.dtype == labels.dtype == ids.dtype and out.shape == labels.shape == ids.shape


@pytest.mark.parametrize("kind", ["native", "reference"])
@pytest.mark.parametrize("mode", MASS_MASK_MODES)
def test_opcheck_mass_mask(mode, kind):
    op = _op("mass_mask", kind)
    ids, kw = mass_mask_case(mode)
    args = prepare_mass_mask_args(ids, **kw)
    _opcheck(op, args)
    enc, dec, labels, spans = op(*args)
    assert enc.dtype == dec.dtype == labels.dtype == ids.dtype and spans.dtype == torch.int64
    assert spans.shape == (B, 2)


def t5_case(kind: str = "lengths"):
    """(input_ids, kwargs) for `t5_span_corruption`: padded rows (lengths, sample ids, int32) or full rows."""
    rng = rng_for("compile t5", kind)
    bt = make_batch(rng, B, S, dtype=torch.int32 if kind == "int32" else torch.int64)
    ids = bt.input_ids.clamp(max=VOCAB_SIZE - 101)  # below the sentinels
    kw = dict(vocab_size=VOCAB_SIZE, sentinel_start_id=VOCAB_SIZE - 1, eos_token_id=1, seed=int(rng.integers(2**31)),
              step=int(rng.integers(1000)))
    if kind != "full":
        kw.update(lengths=bt.lengths, sample_ids=torch.from_numpy(rng.integers(0, 2**40, size=B)))
    return ids, kw


@pytest.mark.parametrize("kind", ["native", "reference"])
@pytest.mark.parametrize("case", ["lengths", "full", "int32"])
def test_opcheck_t5_span_corruption(case, kind):
    from masklm_kernels.masking.denoising import prepare_t5_args

    op = _op("t5_span_corruption", kind)
    ids, kw = t5_case(case)
    args = prepare_t5_args(ids, **kw)
    _opcheck(op, args)
    enc, enc_len, dec, labels, dec_len = op(*args)
    assert enc.dtype == dec.dtype == labels.dtype == ids.dtype and enc_len.dtype == dec_len.dtype == torch.int64
    assert enc.shape == (B, args.enc_width) and dec.shape == labels.shape == (B, args.dec_width)


@pytest.mark.parametrize("kind", ["native", "reference"])
@pytest.mark.parametrize("case", ["lengths", "full", "int32"])
def test_opcheck_bart_infill(case, kind):
    from masklm_kernels.masking.denoising import prepare_bart_args

    op = _op("bart_infill", kind)
    ids, kw = t5_case(case)
    kw = dict(_bart_kwargs(kw), replace_length=-1 if case == "full" else 1, random_ratio=0.2)
    args = prepare_bart_args(ids, **kw)
    _opcheck(op, args)
    out, out_len, dec, labels, label_len = op(*args)
    assert out.dtype == dec.dtype == labels.dtype == ids.dtype and out.shape == (B, args.width)


def _bart_kwargs(kw: dict) -> dict:
    """t5_case's kwargs for bart_infill."""
    kw = dict(kw, mask_token_id=4, decoder_start_token_id=2)
    for name in ("sentinel_start_id", "eos_token_id"):
        kw.pop(name)
    return kw


@pytest.mark.parametrize("backend", ["cpu", "reference"])
@pytest.mark.parametrize("op", ["t5_span_corruption", "bart_infill"])
def test_compiled_denoising_equals_eager(op, backend):
    import masklm_kernels

    if backend == "cpu":
        require_backend("cpu")
    ids, kw = t5_case()
    kw = _bart_kwargs(kw) if op == "bart_infill" else kw
    kw.pop("step")
    public = getattr(masklm_kernels, op)

    def fn(ids, step):
        return tuple(public(ids, **kw, step=step, backend=backend))

    compiled, cnt = _compiled(fn)
    for i in range(3):
        step = torch.tensor(i)
        _equal_outputs(compiled(ids, step), fn(ids, step), f"{op} step {i}")
    assert cnt.frame_count == 1


@pytest.mark.parametrize("name", ["mask_tokens", "mass_mask", "t5_span_corruption", "bart_infill"])
def test_native_and_reference_ops_share_a_schema(name):
    require_backend("cpu")
    native = getattr(torch.ops.masklm_kernels, name).default._schema
    ref = getattr(torch.ops.masklm_kernels, name + "_reference").default._schema
    assert [(a.name, str(a.type)) for a in native.arguments] == [(a.name, str(a.type)) for a in ref.arguments]
    assert [str(r.type) for r in native.returns] == [str(r.type) for r in ref.returns]
    assert not any(a.alias_info for a in native.arguments)  # functional: no argument is mutated


# ------------------------------------------------------------------------------------------------
# torch.compile(fullgraph=True) of the public functions equals eager
# ------------------------------------------------------------------------------------------------

def _equal_outputs(got, expected, what):
    assert len(got) == len(expected)
    for i, (g, e) in enumerate(zip(got, expected)):
        assert_equal(g, e, msg=f"{what}: output {i}")


def _compiled(fn, backend="eager"):
    """`fn` compiled with fullgraph=True and a counting backend: (compiled fn, counter)."""
    torch._dynamo.reset()
    cnt = CompileCounter() if backend == "eager" else CompileCounterWithBackend(backend)
    return torch.compile(fn, backend=cnt, fullgraph=True), cnt


@pytest.mark.parametrize("backend", ["cpu", "reference", "auto"])
@pytest.mark.parametrize("mode", ["token_rates", "span"])
def test_compiled_mask_tokens_equals_eager(mode, backend):
    if backend == "cpu":
        require_backend("cpu")
    ids, kw = mask_tokens_case(mode)
    kw.pop("step")
    step = torch.tensor(int(rng_for("step", mode).integers(1000)))

    def fn(ids, step):
        return mask_tokens(ids, step=step, backend=backend, **kw)

    compiled, cnt = _compiled(fn)
    _equal_outputs(compiled(ids, step), fn(ids, step), f"mask_tokens {mode} backend={backend}")
    assert cnt.frame_count == 1


@pytest.mark.parametrize("backend", ["cpu", "reference", "auto"])
def test_compiled_mass_mask_equals_eager(backend):
    if backend == "cpu":
        require_backend("cpu")
    ids, kw = mass_mask_case("ratio_pred_probs")
    kw.pop("step")
    step = torch.tensor(int(rng_for("mass step").integers(1000)))

    def fn(ids, step):
        return mass_mask(ids, step=step, backend=backend, **kw)

    compiled, cnt = _compiled(fn)
    _equal_outputs(compiled(ids, step), fn(ids, step), f"mass_mask backend={backend}")
    assert cnt.frame_count == 1


# ------------------------------------------------------------------------------------------------
# A compiled training step with a device-side step counter: no recompilation, fresh masks
# ------------------------------------------------------------------------------------------------

def _labels_of(out, op):
    return out[1] if op == "mask_tokens" else out[2]


def _run_steps(op: str, backend: str, variant: str, compile_backend: str = "aot_eager"):
    """Run N_STEPS iterations of a compiled step whose `step` (or `seed`) is a 0-dim int64 tensor that
    advances every iteration; check against eager calls with the same counter value, that the masks
    change, and that Dynamo compiled exactly one frame.

    Variants: the step counter advanced in place inside the compiled step (`counter.add_(1)`), in place
    between calls (`counter += 1`), or a new tensor each iteration; or the seed advanced in place.
    """
    fn_eager = mask_tokens if op == "mask_tokens" else mass_mask
    ids, kw = (mask_tokens_case if op == "mask_tokens" else mass_mask_case)("token_float" if op == "mask_tokens"
                                                                            else "default")
    start = int(rng_for("train step start", op, variant).integers(10**6))
    counter_arg = "seed" if variant == "seed_tensor" else "step"
    kw.pop(counter_arg)

    if variant == "inplace_in_graph":
        def train_step(ids, counter):
            out = fn_eager(ids, backend=backend, **{counter_arg: counter}, **kw)
            counter.add_(1)  # the training loop's counter advances inside the compiled step
            return out
    else:
        def train_step(ids, counter):
            return fn_eager(ids, backend=backend, **{counter_arg: counter}, **kw)

    compiled, cnt = _compiled(train_step, compile_backend)
    counter = torch.tensor(start, dtype=torch.int64)
    seen = []
    for i in range(N_STEPS):
        if variant == "new_tensor":
            counter = torch.tensor(start + i, dtype=torch.int64)
        out = compiled(ids, counter)
        expected = fn_eager(ids, backend=backend, **{counter_arg: start + i}, **kw)
        _equal_outputs(out, expected, f"{op} {variant} backend={backend} iteration {i}")
        if variant in ("inplace_between_calls", "seed_tensor"):
            counter += 1
        seen.append(_labels_of(out, op))
    if variant != "new_tensor":
        assert int(counter) == start + N_STEPS
    assert cnt.frame_count == 1, f"recompiled: {cnt.frame_count} frames for {N_STEPS} iterations"
    # the counter really reaches the kernel: consecutive iterations mask differently
    for i in range(1, N_STEPS):
        assert not torch.equal(seen[i], seen[i - 1]), f"iterations {i - 1} and {i} gave the same mask"


VARIANTS = ["inplace_in_graph", "inplace_between_calls", "new_tensor", "seed_tensor"]


@pytest.mark.parametrize("backend", ["cpu", "reference", "auto"])
@pytest.mark.parametrize("variant", VARIANTS)
def test_training_step_mask_tokens_does_not_recompile(variant, backend):
    if backend == "cpu":
        require_backend("cpu")
    _run_steps("mask_tokens", backend, variant)


@pytest.mark.parametrize("backend", ["cpu", "reference"])
@pytest.mark.parametrize("variant", ["inplace_in_graph", "seed_tensor"])
def test_training_step_mass_mask_does_not_recompile(variant, backend):
    if backend == "cpu":
        require_backend("cpu")
    _run_steps("mass_mask", backend, variant)


def test_inductor_end_to_end():
    """The default backend (Inductor) compiles a masking step that feeds further tensor code."""
    require_backend("cpu")
    ids, kw = mask_tokens_case("row_rates")
    kw.pop("step")

    def step_fn(ids, step):
        out, labels = mask_tokens(ids, step=step, backend="cpu", **kw)
        n_labels = (labels != -100).sum(dim=1)
        return out, labels, n_labels * 2 + 1

    torch._dynamo.reset()
    compiled = torch.compile(step_fn, fullgraph=True)
    for i in (3, 4):
        step = torch.tensor(i)
        _equal_outputs(compiled(ids, step), step_fn(ids, step), f"inductor step {i}")


@pytest.mark.parametrize("op, args_type", [("mask_tokens", "MaskTokensArgs"), ("mass_mask", "MassMaskArgs"),
                                           ("t5_span_corruption", "T5SpanCorruptionArgs"),
                                           ("bart_infill", "BartInfillArgs")])
def test_python_arguments_are_the_schema_the_cpp_kernels_register_under(op, args_type):
    """masking/inputs.py's typed tuples define the schemas: the same names, types and order for the native
    op (whose C++ kernels register under it: a C++ signature that disagreed would fail to load) and for
    the reference op."""
    from masklm_kernels import _ext
    from masklm_kernels.masking import inputs

    fields = getattr(inputs, args_type)._fields
    for name in (op, op + "_reference"):
        schema = getattr(torch.ops.masklm_kernels, name).default._schema
        assert tuple(a.name for a in schema.arguments) == fields, name
    native = getattr(torch.ops.masklm_kernels, op).default._schema
    reference = getattr(torch.ops.masklm_kernels, op + "_reference").default._schema
    assert [str(a.type) for a in native.arguments] == [str(a.type) for a in reference.arguments]
    assert [str(r.type) for r in native.returns] == [str(r.type) for r in reference.returns]
    if not _ext.available():
        pytest.skip(f"the C++ extension is not built: {_ext.load_error()}")
    assert torch._C._dispatch_has_kernel_for_dispatch_key(f"masklm_kernels::{op}", "CPU")


def test_the_extension_is_loaded_on_first_use_and_compiles_from_a_fresh_process():
    """Importing the package does not import `_C`; a compiled function whose first masking call is traced
    (nothing has loaded `_C` yet) runs and equals eager; so does a first call straight through torch.ops."""
    from masklm_kernels import _ext

    if not _ext.available():
        pytest.skip(f"the C++ extension is not built: {_ext.load_error()}")
    code = """
import sys, torch
import masklm_kernels
from masklm_kernels import mask_tokens
assert "masklm_kernels._C" not in sys.modules
fn = lambda ids, step: mask_tokens(ids, mask_token_id=4, vocab_size=100, seed=1, step=step, backend="cpu")
ids = torch.randint(5, 100, (3, 17))
got = torch.compile(fn, fullgraph=True, backend="eager")(ids, torch.tensor(2))
assert "masklm_kernels._C" in sys.modules
want = fn(ids, torch.tensor(2))
assert all(torch.equal(g, w) for g, w in zip(got, want))
print("ok")
"""
    direct = """
import sys, torch
import masklm_kernels
from masklm_kernels import mask_tokens
from masklm_kernels.masking.api import prepare_mask_tokens_args
ids = torch.randint(5, 100, (3, 17))
args = prepare_mask_tokens_args(ids, mask_token_id=4, vocab_size=100, seed=1)
assert "masklm_kernels._C" not in sys.modules
got = torch.ops.masklm_kernels.mask_tokens.default(*args)  # straight through torch.ops: loads the kernels
assert "masklm_kernels._C" in sys.modules
want = mask_tokens(ids, mask_token_id=4, vocab_size=100, seed=1, backend="cpu")
assert all(torch.equal(g, w) for g, w in zip(got, want))
print("ok")
"""
    for snippet in (code, direct):
        out = subprocess.run([sys.executable, "-c", snippet], capture_output=True, text=True, timeout=300)
        assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-3000:]
