"""The README's Python blocks run as written (each in a fresh namespace); a block whose first line is
`# needs a GPU` runs only where CUDA is available. The shell blocks name scripts and modules that exist."""
from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import pytest
import torch

README = Path(__file__).resolve().parent.parent / "README.md"


def _blocks(lang: str) -> list[str]:
    return re.findall(rf"```{lang}\n(.*?)```", README.read_text(encoding="utf-8"), flags=re.S)


PYTHON = _blocks("python")


def test_readme_has_python_blocks():
    assert len(PYTHON) >= 4


@pytest.mark.parametrize("index", range(len(PYTHON)))
def test_python_block_runs(index):
    code = PYTHON[index]
    if code.startswith("# needs a GPU") and not torch.cuda.is_available():
        pytest.skip("the block needs a CUDA device")
    if "transformers" in code:
        pytest.importorskip("transformers")
    exec(compile(code, f"README.md python block {index}", "exec"), {"__name__": "readme"})


def test_shell_blocks_name_what_exists():
    root = README.parent
    for block in _blocks("bash"):
        for script in re.findall(r"bash (scripts/\S+\.sh)", block):
            assert (root / script).is_file(), script
        for module in re.findall(r"python -m ([\w.]+)", block):
            if module in ("pytest", "pip"):
                continue
            assert importlib.util.find_spec(module) is not None, module


def test_results_readme_links_plots_that_exist():
    results = README.parent / "benchmarks" / "results"
    text = (results / "README.md").read_text(encoding="utf-8")
    for name in re.findall(r"plots/([\w.-]+\.png)", text):
        assert (results / "plots" / name).is_file(), name
