"""The converter imported into a heap the garbage collector leaves alone."""

from __future__ import annotations

import gc
from collections.abc import Iterator
from contextlib import contextmanager
from types import ModuleType


@contextmanager
def settled_heap() -> Iterator[ModuleType]:
    """Imports the converter (and torch): the objects the import makes outlive the conversion, so
    the garbage collector is off while they are made (the import ran 0.2-0.3 s faster), and then
    frozen, so that its passes while the conversion allocates need not walk them (profiled, the
    collector took 6-9% of an hf-to-megatron's CPU). Garbage is collected first, so that none is
    kept; the collector's state is restored afterwards. Frozen before a fork, the objects are
    never walked by the children's collectors either, which would copy every page holding one."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        from qwen35_codegen.cli import convert as conversion

        gc.collect()
        gc.freeze()
        if enabled:
            gc.enable()
        yield conversion
    finally:
        gc.unfreeze()
        if enabled:
            gc.enable()
