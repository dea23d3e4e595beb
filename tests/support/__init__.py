"""Test-checkpoint factory: tiny, fully random Qwen3.5-family HF checkpoints in the real layout.

Typical use in a test::

    ckpt = make_checkpoint(tmp_path / "hf", raw_config, seed=0, experts_layout="packed",
                           mtp_experts_layout="per_expert")
    # ckpt.path: config.json + shards + index; ckpt.state: exactly the tensors written;
    # ckpt.model: the HF model; reference_mtp_logits(ckpt.model, ckpt.mtp, ids): expected MTP logits.

Modules: `tiny` (config shrinking), `models` (random HF models), `mtp` (random MTP tensors),
`checkpoints` (files), `fp8` (blockwise quantisation), `ranks` (per-rank bodies of multi-rank
tests). The HF reference forwards they rely on are the runtime's (`qwen35_bridge.reference`),
the same ones `verify` uses.
"""

from qwen35_bridge.reference.expert_layouts import (
    experts_layout_of,
    pack_experts,
    to_layout,
    unpack_experts,
)
from qwen35_bridge.reference.hf_kernels import use_torch_gdn_kernels
from qwen35_bridge.reference.hf_models import hf_config, hf_model_class
from qwen35_bridge.reference.mtp import (
    ReferenceMTP,
    load_reference_mtp,
    reference_mtp_logits,
)
from tests.support.checkpoints import (
    TinyCheckpoint,
    checkpoint_state,
    load_into_model,
    make_checkpoint,
    read_checkpoint,
    read_index,
    shard_name,
    write_checkpoint,
    write_state,
)
from tests.support.fp8 import dequantize_fp8_blockwise, quantize_fp8_blockwise
from tests.support.models import build_hf_model, randomize_
from tests.support.mtp import mtp_tensors
from tests.support.tiny import (
    TinyDims,
    layer_types,
    moe_layers,
    scale_mrope_section,
    text_only_config,
    tiny_config,
)

__all__ = [
    "ReferenceMTP",
    "TinyCheckpoint",
    "TinyDims",
    "build_hf_model",
    "checkpoint_state",
    "dequantize_fp8_blockwise",
    "experts_layout_of",
    "hf_config",
    "hf_model_class",
    "layer_types",
    "load_into_model",
    "load_reference_mtp",
    "make_checkpoint",
    "moe_layers",
    "mtp_tensors",
    "pack_experts",
    "quantize_fp8_blockwise",
    "randomize_",
    "read_checkpoint",
    "read_index",
    "reference_mtp_logits",
    "scale_mrope_section",
    "shard_name",
    "text_only_config",
    "tiny_config",
    "to_layout",
    "unpack_experts",
    "use_torch_gdn_kernels",
    "write_checkpoint",
    "write_state",
]
