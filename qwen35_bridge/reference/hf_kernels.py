"""Make transformers' Gated DeltaNet run on CPU when flash-linear-attention is installed.

transformers binds its GDN kernels at import time: with `fla` importable (megatron-core needs it)
`torch_chunk_gated_delta_rule` dispatches to fla's Triton kernel, which fails on a CPU tensor
(`torch.cpu.device` does not exist). The pure-torch reference implementations are still there
underneath the decorators; this rebinds the modeling modules' names to them, process-wide.
They are the reference semantics anyway, so tests on a GPU machine lose nothing but speed.
"""

from __future__ import annotations

import importlib
import inspect

from qwen35_bridge.families import FAMILIES

KERNEL_FUNCTIONS = (
    "torch_chunk_gated_delta_rule",
    "torch_recurrent_gated_delta_rule",
    "causal_conv1d_fn",
    "causal_conv1d_update",
)


def use_torch_gdn_kernels() -> None:
    """Rebind the GDN kernel names of the Qwen3.5-family modeling modules to their torch
    implementations (idempotent)."""
    for family in FAMILIES.values():
        module = importlib.import_module(family.modeling_module)
        for name in KERNEL_FUNCTIONS:
            fn = getattr(module, name, None)
            if fn is not None:
                setattr(module, name, inspect.unwrap(fn))
