"""A Triton kernel launch as data, shared by every op's Triton launchers: the launchers build `Launch`
objects and run them, and `benchmarks/compile_triton.py` compiles the same objects ahead of time for GPUs
that are not here, so that the static report sees exactly what runs (kernel, constexprs, argument types,
warps and stages)."""
from __future__ import annotations

import dataclasses

import triton

from ._triton_compat import interpreter_scalars


@dataclasses.dataclass(frozen=True)
class BlockConfig:
    """Tile shape (rows x columns of the kernel's main block) with its warps and pipeline stages."""
    block_m: int
    block_n: int
    num_warps: int
    num_stages: int


@dataclasses.dataclass
class Launch:
    """One kernel launch: grid, positional and keyword arguments, and its block configuration."""
    kernel: triton.runtime.JITFunction
    grid: tuple[int, ...]
    args: tuple
    kwargs: dict
    cfg: BlockConfig | None = None
    label: str = ""  # what the static report calls this configuration (attention derives its own)

    def __call__(self) -> None:
        if 0 in self.grid:
            return  # empty input: nothing to compute (and an empty CUDA grid is a launch error)
        opts = {} if self.cfg is None else dict(num_warps=self.cfg.num_warps, num_stages=self.cfg.num_stages)
        with interpreter_scalars():
            self.kernel[self.grid](*self.args, **self.kwargs, **opts)

    def bound(self) -> dict:
        """Every kernel parameter by name with the value this launch passes."""
        return {**dict(zip(self.kernel.arg_names, self.args)), **self.kwargs}
