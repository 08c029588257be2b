"""`python -m masklm_kernels.info`: versions, device, and per op which backends run here and why the
others do not (each backend's `not_supported_reasons`, in the manner of `python -m xformers.info`)."""
from __future__ import annotations

import argparse
import importlib
import json
import platform
import sys

import torch

from . import __version__, _env, _ext
from ._backends import Backend
from ._cli import description


def _ops() -> dict[str, tuple[Backend, ...]]:
    """Every public op and its backends, in order of preference (what backend="auto" tries)."""
    from .attention import api as attention
    from .losses import api as losses
    from .masking import api as masking

    return {"fused_attention": attention.BACKENDS, "fused_attention_varlen": attention.BACKENDS,
            "masked_cross_entropy": losses.BACKENDS,
            "fused_linear_cross_entropy": losses.BACKENDS, "mask_tokens": masking.BACKENDS,
            "mass_mask": masking.BACKENDS}


def _version(module: str) -> str:
    try:
        return getattr(importlib.import_module(module), "__version__", "installed")
    except Exception as exc:  # noqa: BLE001 - any import failure means "not usable"
        return f"not available ({type(exc).__name__})"


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def collect() -> dict:
    cuda = torch.cuda.is_available()
    devices = [f"cuda:{i} {torch.cuda.get_device_name(i)} (sm_{''.join(map(str, torch.cuda.get_device_capability(i)))})"
               for i in range(torch.cuda.device_count())] if cuda else []
    try:
        ext = {"loaded": _ext.available(), "error": _ext.load_error()}
    except ValueError as e:  # an invalid environment switch: shown, not a crash of the report
        ext = {"loaded": False, "error": str(e)}
    if ext["loaded"]:
        from . import _C

        ext["cuda_kernels"] = _ext.has_cuda_kernels()
        ext["cpu_simd"] = _C.cpu_isa()
    ops = {}
    for op, backends in _ops().items():
        ops[op] = [{"backend": b.name, "tensors": list(b.device_types), "description": b.description,
                    "reasons": _reasons(b)} for b in backends]
    return {
        "versions": {"masklm_kernels": __version__, "python": platform.python_version(), "torch": torch.__version__,
                     "torch_cuda": torch.version.cuda, "triton": _version("triton"), "numpy": _version("numpy")},
        "device": {"cpu": _cpu_name(), "cpu_threads": torch.get_num_threads(),
                   "cuda_available": cuda, "gpus": devices},
        "extension": ext,
        "environment": {name: {"value": value, "meaning": meaning} for name, value, meaning in _env.describe()},
        "ops": ops,
    }


def _reasons(backend) -> list[str]:
    try:
        return backend.not_supported_reasons()
    except ValueError as e:
        return [str(e)]


def format_report(info: dict) -> str:
    lines = ["masklm_kernels " + info["versions"]["masklm_kernels"], "", "versions:"]
    lines += [f"  {k:<16} {v}" for k, v in info["versions"].items() if k != "masklm_kernels"]
    dev = info["device"]
    lines += ["", "device:", f"  {'cpu':<16} {dev['cpu']}, {dev['cpu_threads']} torch threads",
              f"  {'cuda':<16} " + ("; ".join(dev["gpus"]) if dev["gpus"] else "no CUDA device")]
    ext = info["extension"]
    lines += ["", "extension masklm_kernels._C:"]
    if ext["loaded"]:
        lines += [f"  {'loaded':<16} yes", f"  {'cuda kernels':<16} {'yes' if ext['cuda_kernels'] else 'no'}",
                  f"  {'cpu simd':<16} {ext['cpu_simd']}"]
    else:
        lines += [f"  {'loaded':<16} no: {ext['error']}"]
    lines += ["", "environment:"]
    lines += [f"  {name:<20} {v['value']}  -- {v['meaning']}" for name, v in info["environment"].items()]
    lines += ["", "ops (backends in the order backend=\"auto\" tries them):"]
    for op, backends in info["ops"].items():
        lines.append(f"  {op}")
        for b in backends:
            status = "available" if not b["reasons"] else "unavailable: " + "; ".join(b["reasons"])
            lines.append(f"    {b['backend']:<10} {status}  [{'/'.join(b['tensors'])} tensors] {b['description']}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m masklm_kernels.info", description=description(__doc__))
    p.add_argument("--json", action="store_true", help="machine-readable output")
    args = p.parse_args(argv)
    info = collect()
    print(json.dumps(info, indent=2) if args.json else format_report(info))
    return 0


if __name__ == "__main__":
    sys.exit(main())
