"""Suite registry: every public module in this package is a suite.

A suite module exposes `cases(device: str, size: str) -> list[harness.Case]`, where `device` is
"cpu" or "cuda" (the run's device; peers that a user would run on the CPU may still return CPU cases)
and `size` is one of `SIZES`: "full", "quick" (the main shapes only) or "smoke" (tiny shapes that only
prove the suite runs, e.g. in the GPU check's CPU dry run; their times mean nothing). Adding `attention.py`,
`losses.py` or `e2e.py` here is all it takes to register a suite; modules whose name starts with "_" are
helpers, not suites.
Suites are imported lazily, so listing them imports nothing heavy.
"""
from __future__ import annotations

import importlib
import pkgutil
from types import ModuleType

SIZES = ("smoke", "quick", "full")


def suite_names() -> list[str]:
    """Names of the registered suites, sorted."""
    return sorted(m.name for m in pkgutil.iter_modules(__path__) if not m.name.startswith("_"))


def load_suite(name: str) -> ModuleType:
    """Import suite `name`; ValueError if it is not registered or does not expose `cases`."""
    if name not in suite_names():
        raise ValueError(f"unknown suite {name!r}; registered suites: {', '.join(suite_names())}")
    module = importlib.import_module(f"{__name__}.{name}")
    if not callable(getattr(module, "cases", None)):
        raise ValueError(f"suite module {module.__name__} does not define cases(device, size)")
    return module
