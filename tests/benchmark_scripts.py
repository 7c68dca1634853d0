"""The scripts of ``benchmarks/`` imported as modules, the way ``python benchmarks/NAME.py`` finds their siblings."""

from __future__ import annotations

import importlib
import sys
from pathlib import Path
from types import ModuleType

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"


def load_benchmark(name: str) -> ModuleType:
    """``benchmarks/<name>.py`` as a module. benchmarks/ goes at the end of sys.path (a script run directly has it
    first), so a script that imports a sibling (``import classifier_ceiling``) imports it here too, and no
    benchmark's name can shadow an installed module."""
    if str(BENCHMARKS) not in sys.path:
        sys.path.append(str(BENCHMARKS))
    return importlib.import_module(name)
