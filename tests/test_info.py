"""`python -m masklm_kernels.info` and the package without its extension."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from masklm_kernels import info


def test_info_lists_every_op_and_backend_with_reasons():
    data = info.collect()
    assert data["versions"]["torch"] == torch.__version__
    kernels = ["cpu", "triton", "reference"]
    expected = {"fused_attention": kernels, "fused_attention_varlen": kernels,
                "masked_cross_entropy": kernels,
                "fused_linear_cross_entropy": kernels, "mask_tokens": ["cuda", "cpu", "reference"],
                "mass_mask": ["cuda", "cpu", "reference"]}
    assert {op: [b["backend"] for b in bs] for op, bs in data["ops"].items()} == expected
    for op, backends in data["ops"].items():
        for b in backends:
            assert isinstance(b["reasons"], list)
            if b["backend"] == "cuda":
                assert (not b["reasons"]) == (torch.cuda.is_available() and data["extension"].get("cuda_kernels"))
            if b["backend"] == "triton":  # the test run sets TRITON_INTERPRET=1 without a GPU (conftest.py)
                assert (not b["reasons"]) == (data["versions"]["triton"][0].isdigit()), b["reasons"]
    text = info.format_report(data)
    assert "mask_tokens" in text and "reference  available" in text


def _run(args, **env):
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=300,
                          env={**os.environ, **env})


def test_info_cli_json():
    r = _run(["-m", "masklm_kernels.info", "--json"])
    assert r.returncode == 0, r.stderr
    assert "mask_tokens" in json.loads(r.stdout)["ops"]


def test_package_works_without_extension_and_says_why():
    """MASKLM_NO_EXTENSION=1: the import works, info names the reason, the reference backend runs and
    an explicit backend="cpu" is refused (never a silent fallback)."""
    code = (
        "import torch, masklm_kernels as m\n"
        "ids = torch.randint(5, 100, (2, 9))\n"
        "out, lab = m.mask_tokens(ids, mask_token_id=4, vocab_size=100, mlm_probability=0.5)\n"
        "assert out.shape == ids.shape\n"
        "try:\n"
        "    m.mask_tokens(ids, mask_token_id=4, vocab_size=100, backend='cpu')\n"
        "    raise SystemExit('cpu backend ran without the extension')\n"
        "except m.BackendUnavailableError as e:\n"
        "    assert 'MASKLM_NO_EXTENSION' in str(e), e\n"
        "from masklm_kernels import info\n"
        "print(info.format_report(info.collect()))\n"
    )
    r = _run(["-c", code], MASKLM_NO_EXTENSION="1")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "loaded           no: MASKLM_NO_EXTENSION" in r.stdout
    assert "cpu        unavailable" in r.stdout


@pytest.mark.parametrize("module", ["masklm_kernels.train", "masklm_kernels.info", "masklm_kernels.demo",
                                    "benchmarks.__main__", "benchmarks.report", "benchmarks.compare",
                                    "benchmarks.plot", "benchmarks.tile_sweep", "benchmarks.tile_search",
                                    "benchmarks.compile_report"])
def test_command_line_descriptions_are_whole_sentences(module):
    """`--help` shows each command's first docstring paragraph, never a line cut mid-sentence."""
    import importlib

    from masklm_kernels._cli import description

    text = description(importlib.import_module(module).__doc__)
    assert len(text) > 20 and text.rstrip("`").endswith((".", ")", ":")), text
