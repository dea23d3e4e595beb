"""Megatron `torch_dist` checkpoints, written from HF tensors and read back, without the model's
weights in memory: megatron-core's layout (`layout`), written as PyTorch DCP writes it (`writer`),
read back one tensor at a time (`reader`). The files load with
`megatron.core.dist_checkpointing.load(model.sharded_state_dict(), path)` at any TP/EP.
"""

from qwen35_bridge.formats.torch_dist.layout import (
    Layout,
    Piece,
    compute_layout,
    layout,
    meta_model,
)
from qwen35_bridge.formats.torch_dist.reader import Reader
from qwen35_bridge.formats.torch_dist.writer import DATA_FILE, write

__all__ = [
    "DATA_FILE",
    "Layout",
    "Piece",
    "Reader",
    "compute_layout",
    "layout",
    "meta_model",
    "write",
]
