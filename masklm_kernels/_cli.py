"""Shared by the command-line entry points (the package's and the benchmarks')."""
from __future__ import annotations


def description(doc: str | None) -> str:
    """The first paragraph of a module docstring as one line: an argparse description that is whole
    sentences (a docstring's first line may stop mid-sentence)."""
    paragraph = (doc or "").strip().split("\n\n")[0]
    return " ".join(paragraph.split())
