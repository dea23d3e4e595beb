"""What each rank of the HybridModel target's multi-process test runs: several parallel layouts one
after the other in the same two spawned processes (a spawn costs more than a tiny model's run).

Each case builds this rank's HybridModel (or the VL model around it) through a `hybrid` bridge,
fills it from the HF checkpoint (each rank takes its slices) or restores a torch_dist checkpoint
with megatron-core's own `dist_checkpointing.load`, runs the forward, and reports the logits, the
MTP logits, the decoder's global layer numbers and, from rank 0, the export back to HF.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np


@dataclass(frozen=True)
class Case:
    name: str
    hf_dir: Path
    bridge_dir: Path
    inputs: Any  # token ids [b, s], or MultimodalInputs for a VL case
    parallel: dict[str, Any] = field(default_factory=dict)  # init_parallel's arguments
    torch_dist: Path | None = None  # restore this checkpoint instead of loading the HF one
    vl: bool = False


@dataclass(frozen=True)
class CaseResult:
    logits: np.ndarray
    mtp_logits: list[np.ndarray]
    layer_numbers: list[int]
    exported: dict[str, np.ndarray] | None  # rank 0, for cases that load from HF


def run_cases(cases: list[Case]) -> dict[str, CaseResult]:
    """Every case on this rank, in order (every rank runs the same list)."""
    os.environ.setdefault("TORCHDYNAMO_DISABLE", "1")
    return {case.name: _run(case) for case in cases}


def _run(case: Case) -> CaseResult:
    import torch.distributed as dist

    from qwen35_bridge.megatron.gpt import forward_logits
    from qwen35_bridge.megatron.parallel import destroy_parallel, init_parallel
    from qwen35_bridge.megatron.vl.multimodal import vl_forward_logits
    from qwen35_codegen.registry.lookup import bridge_for_checkpoint

    bridge, _spec, _source = bridge_for_checkpoint(
        case.hf_dir, bridge_dir=case.bridge_dir, quiet=True, target="hybrid"
    )
    assert bridge.target == "hybrid"
    parallel = init_parallel(**case.parallel)
    try:
        model = (bridge.build_vl_model if case.vl else bridge.build_model)(**parallel)
        exported = None
        if case.torch_dist is None:
            bridge.load_hf(model, case.hf_dir, language_model_only=not case.vl)
            exported = bridge.export_hf(model, language_model_only=not case.vl)
        else:
            _restore(model, case.torch_dist)
        logits, mtp = (vl_forward_logits if case.vl else forward_logits)(model, case.inputs)
        language_model = model.language_model if case.vl else model
        layers = [layer.layer_number - 1 for layer in language_model.decoder.layers]
        if dist.get_rank() != 0:
            exported = None
    finally:
        destroy_parallel()
    return CaseResult(
        logits.numpy(),
        [m.numpy() for m in mtp],
        layers,
        None if exported is None else {k: v.numpy() for k, v in exported.items()},
    )


def _restore(model: Any, checkpoint: Path) -> None:
    from megatron.core import dist_checkpointing

    # As Megatron-LM loads it: the model's state under "model", beside the common state.
    state = dist_checkpointing.load({"model": model.sharded_state_dict()}, str(checkpoint))
    result = model.load_state_dict(state["model"], strict=False)
    missing = [k for k in result.missing_keys if not k.endswith("_extra_state")]
    if missing or result.unexpected_keys:
        raise AssertionError(
            f"restore left missing {missing[:3]} / unexpected {result.unexpected_keys[:3]}"
        )
