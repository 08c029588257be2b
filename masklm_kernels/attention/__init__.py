"""Masked attention (BRIEF.md, "Attention semantics"). So far the specification, `reference.py`; the
public `fused_attention` and its Triton / CPU backends are built on it (issue 3)."""
