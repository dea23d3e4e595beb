"""Test-checkpoint factory: tiny, fully random Qwen3.5-family HF checkpoints in the real layout.

Typical use in a test::

    ckpt = make_checkpoint(tmp_path / "hf", raw_config, seed=0, experts_layout="packed",
                           mtp_experts_layout="per_expert")
    # ckpt.path: config.json + shards + index; ckpt.state: exactly the tensors written;
    # ckpt.model: the HF model; reference_mtp_logits(ckpt.model, ckpt.mtp, ids): expected MTP logits.

Modules: `tiny` (config shrinking), `models` (random HF models), `layouts` (expert layouts,
prefixes), `mtp` (MTP tensors and reference forward), `checkpoints` (files), `fp8`.
"""

from codegen.testing.checkpoints import (
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
from codegen.testing.fp8 import dequantize_fp8_blockwise, quantize_fp8_blockwise
from codegen.testing.hf_cpu import use_torch_gdn_kernels
from codegen.testing.layouts import experts_layout_of, pack_experts, to_layout, unpack_experts
from codegen.testing.models import build_hf_model, hf_config, hf_model_class, randomize_
from codegen.testing.mtp import ReferenceMTP, load_reference_mtp, mtp_tensors, reference_mtp_logits
from codegen.testing.tiny import (
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
