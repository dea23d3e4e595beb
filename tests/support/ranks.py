"""What each rank of a multi-process conversion test runs (spawned processes import it by name).

A rank builds its shard of the megatron-core model through the bridge, loads the HF checkpoint
sharded (each rank takes its own slices), runs the forward, and exports the model back to HF.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from qwen35_bridge.mapping.splits import COLUMN

if TYPE_CHECKING:
    from qwen35_bridge.megatron.vl.multimodal import MultimodalInputs


@dataclass(frozen=True)
class RankResult:
    logits: torch.Tensor
    mtp_logits: list[torch.Tensor]
    exported: dict[str, torch.Tensor] | None
    layer_numbers: list[int]
    local_experts: int


def convert_and_run(
    hf_dir: Path,
    bridge_dir: Path,
    input_ids: torch.Tensor,
    *,
    tp: int = 1,
    pp: int = 1,
    ep: int = 1,
    sequence_parallel: bool = False,
    naive_gdn_split: bool = False,
) -> RankResult:
    """This rank's logits (full vocabulary, as every rank sees them) and, on rank 0, the export."""
    os.environ.setdefault("TORCHDYNAMO_DISABLE", "1")
    import torch.distributed as dist

    from qwen35_bridge.megatron.gpt import forward_logits
    from qwen35_bridge.megatron.parallel import destroy_parallel, init_parallel
    from qwen35_codegen.registry.lookup import bridge_for_checkpoint

    bridge, _spec, _source = bridge_for_checkpoint(
        Path(hf_dir), bridge_dir=Path(bridge_dir), quiet=True
    )
    parallel = init_parallel(tp, pp, ep, sequence_parallel=sequence_parallel)
    try:
        model = bridge.build_model(**parallel)
        bridge.load_hf(model, hf_dir, language_model_only=True)
        if naive_gdn_split:
            _split_gdn_in_proj_naively(bridge, model, hf_dir)
        logits, mtp = forward_logits(model, input_ids)
        exported = bridge.export_hf(model, language_model_only=True)
        layers = [layer.layer_number - 1 for layer in model.decoder.layers]
        local_experts = getattr(model.config, "num_moe_experts", None) or 0
        local_experts //= parallel["expert_model_parallel_size"]
        rank = dist.get_rank()
    finally:
        destroy_parallel()
    return RankResult(logits, mtp, exported if rank == 0 else None, layers, local_experts)


@torch.no_grad()
def _split_gdn_in_proj_naively(bridge, model, hf_dir: Path) -> None:
    """The negative control: cut GDN in_proj contiguously instead of section by section."""
    from megatron.core import parallel_state

    from qwen35_bridge.formats.safetensors.reader import CheckpointReader
    from qwen35_bridge.mapping.kinds import ConvertOptions
    from qwen35_bridge.megatron.live import global_parameters

    params = global_parameters(model, bridge.prefix_for(model, language_model_only=True))
    rank, size = (
        parallel_state.get_tensor_model_parallel_rank(),
        parallel_state.get_tensor_model_parallel_world_size(),
    )
    with CheckpointReader(Path(hf_dir)) as reader:
        for group in bridge.groups:
            if group.kind.startswith("GDNInProj"):
                (name,) = group.megatron
                if name in params:
                    full = group.to_megatron(
                        {n: reader.get(n) for n in group.hf}, ConvertOptions()
                    )[name]
                    params[name][0].copy_(COLUMN.shard(full, rank, size))


def restore_and_run(
    checkpoint: Path,
    hf_dir: Path,
    bridge_dir: Path,
    input_ids: torch.Tensor,
    *,
    tp: int = 1,
    ep: int = 1,
) -> RankResult:
    """Restore a torch_dist checkpoint with megatron-core's own `dist_checkpointing.load` into
    this rank's shard of the model, then run the forward."""
    os.environ.setdefault("TORCHDYNAMO_DISABLE", "1")
    from megatron.core import dist_checkpointing

    from qwen35_bridge.megatron.gpt import forward_logits
    from qwen35_bridge.megatron.parallel import destroy_parallel, init_parallel
    from qwen35_codegen.registry.lookup import bridge_for_checkpoint

    bridge, _spec, _source = bridge_for_checkpoint(
        Path(hf_dir), bridge_dir=Path(bridge_dir), quiet=True
    )
    parallel = init_parallel(tp, 1, ep)
    try:
        model = bridge.build_model(**parallel)
        # As Megatron-LM loads it: the model's state under "model", beside the common state.
        state = dist_checkpointing.load({"model": model.sharded_state_dict()}, str(checkpoint))
        common = {k: v for k, v in state.items() if k != "model"}
        if common.get("checkpoint_version") != 3.0 or common["args"].num_layers != len(
            model.decoder.layers
        ):
            raise AssertionError(f"not Megatron-LM's common state: {common}")
        result = model.load_state_dict(state["model"], strict=False)
        missing = [k for k in result.missing_keys if not k.endswith("_extra_state")]
        if missing or result.unexpected_keys:
            raise AssertionError(
                f"restore left missing {missing[:3]} / unexpected {result.unexpected_keys[:3]}"
            )
        logits, mtp = forward_logits(model, input_ids)
    finally:
        destroy_parallel()
    return RankResult(logits, mtp, None, [], 0)


def vl_logits_on_rank(
    hf_dir: Path,
    megatron_dir: Path,
    bridge_dir: Path,
    inputs: MultimodalInputs,
    *,
    tp: int,
    sequence_parallel: bool = False,
) -> tuple[np.ndarray, list[np.ndarray]]:
    """One rank of a tensor-parallel run (for `run_ranks`): the VL model built at `tp` (with
    `sequence_parallel` in the language model), loaded from converted Megatron files, and its
    gathered logits and MTP logits on `inputs`. They come back as numpy arrays: a tensor put on
    the results queue lives in shared memory whose handle dies with the rank, which may exit
    before the parent has read it."""
    from qwen35_bridge.megatron.parallel import destroy_parallel, init_parallel
    from qwen35_bridge.megatron.vl.multimodal import vl_forward_logits
    from qwen35_codegen.registry.lookup import bridge_for_checkpoint

    bridge, _spec, _source = bridge_for_checkpoint(
        Path(hf_dir), bridge_dir=Path(bridge_dir), quiet=True
    )
    parallel = init_parallel(tp, sequence_parallel=sequence_parallel)
    try:
        model = bridge.build_vl_model(**parallel)
        bridge.load_megatron(model, megatron_dir)
        logits, mtp = vl_forward_logits(model, inputs)
    finally:
        destroy_parallel()
    return logits.numpy(), [m.numpy() for m in mtp]


@dataclass(frozen=True)
class StreamResult:
    """What one rank received from `iter_hf`: names in arrival order, those whose tensor is not
    bit-identical to the source checkpoint's (in the layout asked for), and bucket sizes."""

    rank: int
    names: list[str]
    mismatched: list[str]
    bucket_bytes: list[int]
    chunks: int


def stream_on_rank(
    hf_dir: Path,
    bridge_dir: Path,
    *,
    tp: int = 1,
    pp: int = 1,
    ep: int = 1,
    vpp: int | None = None,
    wrapped: bool = False,
    experts: str | None = None,
    receiver: int | None = None,
    bucket_bytes: int | None = None,
) -> StreamResult:
    """Build the model at the given parallelism (bf16 inside megatron-core's DDP and
    Float16Module when `wrapped`), load the HF checkpoint, and stream it back with `iter_hf`."""
    os.environ.setdefault("TORCHDYNAMO_DISABLE", "1")
    import torch.distributed as dist

    from qwen35_bridge.formats.safetensors.reader import CheckpointReader
    from qwen35_bridge.megatron.parallel import destroy_parallel, init_parallel
    from qwen35_bridge.reference.expert_layouts import unpack_experts
    from qwen35_codegen.registry.lookup import bridge_for_checkpoint

    bridge, _spec, _source = bridge_for_checkpoint(
        Path(hf_dir), bridge_dir=Path(bridge_dir), quiet=True
    )
    with CheckpointReader(Path(hf_dir)) as reader:
        expected = {name: reader.get(name).clone() for name in sorted(reader.names())}
    if experts == "per_expert":
        expected = unpack_experts(expected)
    parallel = init_parallel(tp, pp, ep, vpp=vpp)
    try:
        dtype = torch.bfloat16 if wrapped else torch.float32
        model = bridge.build_model(params_dtype=dtype, **parallel)
        chunks = model if isinstance(model, list) else [model]
        bridge.load_hf(model, hf_dir)
        if wrapped:  # as the trainer holds it: each chunk wrapped, a list only for VPP
            wrapped_chunks = [_wrap_for_training(chunk) for chunk in chunks]
            model = wrapped_chunks if isinstance(model, list) else wrapped_chunks[0]
        names, mismatched, sizes = [], [], []
        stream = bridge.iter_hf(
            model, experts=experts, receiver=receiver, bucket_bytes=bucket_bytes
        )
        for item in stream:
            pairs = item if bucket_bytes else [item]
            if bucket_bytes:
                sizes.append(sum(t.numel() * t.element_size() for _, t in pairs))
            for name, tensor in pairs:
                names.append(name)
                want = expected.get(name)
                if want is None or tensor.dtype != want.dtype or not torch.equal(tensor, want):
                    mismatched.append(name)
        rank = dist.get_rank()
    finally:
        destroy_parallel()
    return StreamResult(rank, names, mismatched, sizes, len(chunks))


def _wrap_for_training(chunk: torch.nn.Module) -> torch.nn.Module:
    """A model chunk as a Megatron trainer holds it: Float16Module inside megatron-core's DDP."""
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.transformer.module import Float16Module

    config = chunk.config
    return DistributedDataParallel(
        config, DistributedDataParallelConfig(), Float16Module(config, chunk)
    )


def save_on_rank(hf_dir: Path, bridge_dir: Path, destination: Path, *, pp: int = 1, ep: int = 1):
    """Load the checkpoint at the given parallelism and write it back with `save_hf` (rank 0)."""
    os.environ.setdefault("TORCHDYNAMO_DISABLE", "1")
    from qwen35_bridge.megatron.parallel import destroy_parallel, init_parallel
    from qwen35_codegen.registry.lookup import bridge_for_checkpoint

    bridge, _spec, _source = bridge_for_checkpoint(
        Path(hf_dir), bridge_dir=Path(bridge_dir), quiet=True
    )
    parallel = init_parallel(1, pp, ep)
    try:
        model = bridge.build_model(**parallel)
        bridge.load_hf(model, hf_dir)
        report = bridge.save_hf(model, destination, config_dir=hf_dir, max_shard_bytes=300_000)
    finally:
        destroy_parallel()
    return None if report is None else report.tensors_written
