"""A trainer's checkpoint, made as Megatron-LM makes one: a model (its pipeline chunks) in
megatron-core's DDP, one step of megatron-core's own optimizer, and then either
`dist_checkpointing.save` of the model's and the optimizer's sharded state dicts (torch_dist), or
one `torch.save` per model-parallel rank of the plain state dicts (the legacy `torch` format),
into a run root with its tracker.

CPU note: megatron-core 0.19.2's optimizer allocates a few scalars with an explicit
`device="cuda"` (`FP32Optimizer._scale`, the grad-norm accumulator in `clip_grads`), and DDP's grad
sync asks for CUDA streams. `cuda_factories_on_cpu` answers the first for the optimizer's calls
only; the second is skipped (data-parallel size 1: the backward hooks already fill `main_grad`),
and the rest of Megatron-LM's `finalize_model_grads` is called piece by piece; gradient clipping
is off (it asserts CUDA tensors).
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch

FACTORIES = ("tensor", "zeros", "ones", "empty", "full")
ITERATION = 1
TORCH_DIST, LEGACY_TORCH = "torch_dist", "torch"


@contextmanager
def cuda_factories_on_cpu() -> Iterator[None]:
    """torch's tensor factories, with `device="cuda"` answered on the CPU, for the block only."""
    real = {name: getattr(torch, name) for name in FACTORIES}

    def on_cpu(factory):
        def make(*args, device=None, **kwargs):
            cuda = device is not None and str(device).startswith("cuda")
            return factory(*args, device="cpu" if cuda else device, **kwargs)

        return make

    for name, factory in real.items():
        setattr(torch, name, on_cpu(factory))
    try:
        yield
    finally:
        for name, factory in real.items():
            setattr(torch, name, factory)


def train_and_save_on_rank(
    hf_dir: Path,
    bridge_dir: Path,
    run_dir: Path,
    *,
    tp: int = 1,
    pp: int = 1,
    ep: int = 1,
    vpp: int | None = None,
    checkpoint_format: str = TORCH_DIST,
    broken: dict[str, str] | None = None,
    pad_vocab: int = 0,
) -> dict:
    """Load the HF checkpoint, take one optimizer step, save the run (tracker + iter_0000001).
    Returns, on the rank holding them: the trained weights under HF names (numpy, on global rank
    0) and the trained model's logits on `eval_ids` (on the last pipeline stage).
    `broken`: label -> name part; also save, as the run `<run_dir>-<label>`, the checkpoint
    without the model entries whose name contains that part (a broken run).
    `pad_vocab`: add this many padding rows to the saved vocabulary tensors, as Megatron-LM's
    `--make-vocab-size-divisible-by` does."""
    os.environ.setdefault("TORCHDYNAMO_DISABLE", "1")
    import torch.distributed as dist
    from megatron.core import parallel_state as ps
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.distributed.finalize_model_grads import (
        _allreduce_non_tensor_model_parallel_grads,
        _allreduce_word_embedding_grads,
    )
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

    from qwen35_bridge.mapping.kinds import ConvertOptions
    from qwen35_bridge.megatron.parallel import destroy_parallel, init_parallel
    from qwen35_codegen.registry.lookup import bridge_for_checkpoint
    from tests.support import pipeline

    bridge, spec, _ = bridge_for_checkpoint(Path(hf_dir), bridge_dir=Path(bridge_dir), quiet=True)
    # megatron-core refuses to train MoE under TP without sequence parallelism.
    parallel = init_parallel(tp, pp, ep, vpp=vpp, sequence_parallel=tp > 1)
    try:
        built = bridge.build_model(**parallel)
        chunks = built if isinstance(built, list) else [built]
        bridge.load_hf(built, hf_dir)
        ddp = [
            DistributedDataParallel(c.config, DistributedDataParallelConfig(), c) for c in chunks
        ]
        config = OptimizerConfig(optimizer="adam", lr=1e-2, clip_grad=0.0, bf16=False, fp16=False)
        with cuda_factories_on_cpu():
            optimizer = get_megatron_optimizer(config, ddp)
        ids = torch.randint(0, spec.vocab_size, (1, 32), generator=torch.Generator().manual_seed(3))
        pipeline.run(ddp, ids, train=True)
        # Megatron-LM's finalize_model_grads, but for the data-parallel sync (size 1 here, and
        # it needs CUDA streams): replicated norms' gradients summed over tensor ranks, the
        # shared word embedding's over the first and last stages.
        _allreduce_non_tensor_model_parallel_grads(ddp, chunks[0].config)
        _allreduce_word_embedding_grads(ddp, chunks[0].config)
        with cuda_factories_on_cpu():
            stepped, _norm, _zeros = optimizer.step()
        assert stepped, "the optimizer step was skipped"
        runs = {Path(run_dir): None}
        runs |= {Path(f"{run_dir}-{label}"): part for label, part in (broken or {}).items()}
        for root, drop in runs.items():
            folder = root / f"iter_{ITERATION:07d}"
            if checkpoint_format == TORCH_DIST:
                _save_torch_dist(chunks, optimizer, folder, drop, pad_vocab)
            else:
                _save_legacy(chunks, optimizer, folder, drop, pad_vocab, parallel)
            if dist.get_rank() == 0:
                (root / "latest_checkpointed_iteration.txt").write_text(str(ITERATION))
        eval_ids = torch.randint(
            0, spec.vocab_size, (1, 80), generator=torch.Generator().manual_seed(5)
        )
        _loss, heads = pipeline.run(chunks, eval_ids, train=False)
        logits = (
            [h.numpy() for h in heads]
            if heads and ps.get_tensor_model_parallel_rank() == 0
            else None
        )
        # A trained GDN norm g rarely has an exact g + 1 in fp32: the export must accept it.
        trained = bridge.export_hf(built, options=ConvertOptions(allow_norm_rounding=True))
        rank = dist.get_rank()
    finally:
        destroy_parallel()
    weights = {k: v.numpy() for k, v in trained.items()} if rank == 0 else None
    return {"weights": weights, "logits": logits, "eval_ids": eval_ids.numpy()}


def _save_torch_dist(chunks, optimizer, folder: Path, drop, pad_vocab: int) -> None:
    """Megatron-LM's save: model (`model`, or `model0`, `model1`, ... per chunk) and optimizer
    sharded state dicts with the common state, by megatron-core's `dist_checkpointing.save`."""
    import torch.distributed as dist
    from megatron.core import dist_checkpointing
    from megatron.core import parallel_state as ps
    from megatron.core.dist_checkpointing.mapping import ShardedTensor

    names = ["model"] if len(chunks) == 1 else [f"model{i}" for i in range(len(chunks))]
    models = {name: chunk.sharded_state_dict() for name, chunk in zip(names, chunks)}
    state = {
        **models,
        "optimizer": optimizer.sharded_state_dict(models),
        "args": _args(chunks[0].config),
        "iteration": ITERATION,
        "checkpoint_version": 3.0,
    }
    for name in names:
        if drop is not None:
            state[name] = {k: v for k, v in state[name].items() if drop not in k}
        for key, sharded in list(state[name].items()) if pad_vocab else ():
            if _is_vocabulary(key):
                tp, rank = (
                    ps.get_tensor_model_parallel_world_size(),
                    ps.get_tensor_model_parallel_rank(),
                )
                state[name][key] = ShardedTensor.from_rank_offsets(
                    sharded.key,
                    _padded_slice(sharded.data, pad_vocab),
                    *([(0, rank, tp)] if tp > 1 else []),
                    replica_id=sharded.replica_id,
                    allow_shape_mismatch=True,
                )
    if dist.get_rank() == 0:
        folder.mkdir(parents=True)
    dist.barrier()
    dist_checkpointing.save(state, str(folder))


def _save_legacy(chunks, optimizer, folder: Path, drop, pad_vocab: int, parallel: dict) -> None:
    """Megatron-LM's legacy save: each model-parallel rank `torch.save`s its plain state dicts
    (TP slices, the stage's layers and the expert rank's experts numbered from 0), its optimizer
    state, RNG state and args into `mp_rank_TT[_PPP][_EEE]/model_optim_rng.pt`."""
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    tp, pp, ep = (
        ps.get_tensor_model_parallel_rank(),
        ps.get_pipeline_model_parallel_rank(),
        ps.get_expert_model_parallel_rank(),
    )
    name = f"mp_rank_{tp:02d}"
    if parallel["pipeline_model_parallel_size"] > 1:
        name += f"_{pp:03d}"
    if parallel["expert_model_parallel_size"] > 1:
        name += f"_{ep:03d}"
    models = {}
    for i, chunk in enumerate(chunks):
        plain = chunk.state_dict_for_save_checkpoint()
        if drop is not None:
            plain = {k: v for k, v in plain.items() if drop not in k}
        if pad_vocab:
            plain = {
                k: _padded_slice(v, pad_vocab) if _is_vocabulary(k) else v for k, v in plain.items()
            }
        models["model" if len(chunks) == 1 else f"model{i}"] = plain
    state = {
        "args": _args(chunks[0].config),
        "checkpoint_version": 3.0,
        "iteration": ITERATION,
        **models,
        "optimizer": optimizer.state_dict(),
        "opt_param_scheduler": {"num_steps": ITERATION},
        "rng_state": [
            {
                "random_rng_state": None,
                "np_rng_state": np.random.get_state(),
                "torch_rng_state": torch.get_rng_state(),
            }
        ],
        "num_floating_point_operations_so_far": 0,
    }
    (folder / name).mkdir(parents=True, exist_ok=True)
    torch.save(state, folder / name / "model_optim_rng.pt")
    dist.barrier()


def _is_vocabulary(name: str) -> bool:
    return name.endswith(("embedding.word_embeddings.weight", "output_layer.weight"))


def _padded_slice(local, rows: int):
    """This tensor rank's slice of the vocabulary tensor padded with `rows` rows after its last
    token, as a trainer with a padded vocabulary holds it (padding random: nobody's token)."""
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    group, tp = ps.get_tensor_model_parallel_group(), ps.get_tensor_model_parallel_world_size()
    slices = [torch.empty_like(local) for _ in range(tp)]
    dist.all_gather(slices, local.detach().contiguous(), group=group)
    padding = torch.randn((rows, *local.shape[1:]), generator=torch.Generator().manual_seed(9))
    padded = torch.cat([*slices, padding.to(local.dtype)])
    return padded.chunk(tp)[ps.get_tensor_model_parallel_rank()].contiguous()


def _args(config) -> argparse.Namespace:
    """Megatron-LM's args as a run pickles them: sizes, and values of its own classes."""
    from megatron.core.transformer.enums import AttnBackend

    return argparse.Namespace(
        num_layers=config.num_layers,
        hidden_size=config.hidden_size,
        num_attention_heads=config.num_attention_heads,
        tensor_model_parallel_size=config.tensor_model_parallel_size,
        pipeline_model_parallel_size=config.pipeline_model_parallel_size,
        expert_model_parallel_size=config.expert_model_parallel_size,
        virtual_pipeline_model_parallel_size=config.virtual_pipeline_model_parallel_size,
        params_dtype=config.params_dtype,
        attention_backend=AttnBackend.auto,
    )


def resume_on_rank(
    run: Path, hf_dir: Path, bridge_dir: Path, *, tp: int = 1, padded_vocab: int | None = None
) -> dict:
    """Start training from a converted run as Megatron-LM's `load_checkpoint` does: the tracker
    names the iteration (`release`: no optimizer or RNG state to load), the common state gives
    args, checkpoint version and iteration, the model's sharded state dict (under `model`) is
    restored by `dist_checkpointing.load` into a model whose optimizer is fresh. With
    `padded_vocab`, the model's vocabulary is padded as Megatron-LM pads it for its TP size.
    Returns the restored model's logits (model vocabulary only), the loss of one training step
    after it, and the common state's values."""
    os.environ.setdefault("TORCHDYNAMO_DISABLE", "1")
    from megatron.core import dist_checkpointing
    from megatron.core import parallel_state as ps
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

    from qwen35_bridge.megatron.gpt import build_gpt_model
    from qwen35_bridge.megatron.parallel import destroy_parallel, init_parallel
    from qwen35_codegen.registry.lookup import bridge_for_checkpoint
    from tests.support import pipeline

    bridge, spec, _ = bridge_for_checkpoint(Path(hf_dir), bridge_dir=Path(bridge_dir), quiet=True)
    folder = Path(run) / (Path(run) / "latest_checkpointed_iteration.txt").read_text().strip()
    common = dist_checkpointing.load_common_state_dict(str(folder))
    parallel = init_parallel(tp, sequence_parallel=tp > 1)
    try:
        config = bridge.transformer_config(**gpt_cpu_settings(), **parallel)
        args = bridge.gpt_model_args | ({"vocab_size": padded_vocab} if padded_vocab else {})
        model = build_gpt_model(config, **args)
        ddp = DistributedDataParallel(config, DistributedDataParallelConfig(), model)
        with cuda_factories_on_cpu():
            optimizer = get_megatron_optimizer(
                OptimizerConfig(optimizer="adam", lr=1e-3, clip_grad=0.0), [ddp]
            )
        state = dist_checkpointing.load({"model": model.sharded_state_dict()}, str(folder))
        result = model.load_state_dict(state["model"], strict=False)
        missing = [k for k in result.missing_keys if not k.endswith("_extra_state")]
        assert not missing and not result.unexpected_keys, (missing, result.unexpected_keys)
        ids = torch.randint(0, spec.vocab_size, (1, 80), generator=torch.Generator().manual_seed(5))
        _loss, heads = pipeline.run([model], ids, train=False)
        loss, _ = pipeline.run([ddp], ids[:, :32], train=True)
        with cuda_factories_on_cpu():
            stepped, _norm, _zeros = optimizer.step()
        tp_rank = ps.get_tensor_model_parallel_rank()
    finally:
        destroy_parallel()
    return {
        "logits": [h[..., : spec.vocab_size].numpy() for h in heads] if tp_rank == 0 else None,
        "loss": float(loss),
        "stepped": stepped,
        "common": {k: v for k, v in common.items() if k != "args"},
        "args": vars(common["args"]),
    }


def gpt_cpu_settings() -> dict:
    """The settings `build_model` gives a CPU-built model (fp32)."""
    from qwen35_bridge.megatron.gpt import cpu_config_overrides

    return cpu_config_overrides() | {
        "params_dtype": torch.float32,
        "pipeline_dtype": torch.float32,
        "bf16": False,
    }
