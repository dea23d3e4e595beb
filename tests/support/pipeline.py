"""One training step (or one evaluation) through a pipelined model on gloo ranks, as Megatron's
schedule runs it but without CUDA: its own schedule hard-codes CUDA streams, so the chunks run
here in order, each sending its hidden states to the next stage and, in the backward pass, the
gradient of its input back. Chunk `v` of every stage comes before chunk `v + 1` (Megatron's
interleaved order), so a stage holding several chunks runs them as their turns come.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.distributed as dist
from torch import Tensor


def _order(stages: int, chunks: int) -> list[tuple[int, int]]:
    """(chunk, stage) in the order the model's layers run."""
    return [(v, p) for v in range(chunks) for p in range(stages)]


def _hidden_shape(model: torch.nn.Module, batch: int, seq: int) -> tuple[int, int, int]:
    config = model.config
    local_seq = seq // config.tensor_model_parallel_size if config.sequence_parallel else seq
    return (local_seq, batch, config.hidden_size)


def run(
    chunks: Sequence[torch.nn.Module], input_ids: Tensor, *, train: bool
) -> tuple[Tensor | None, list[Tensor]]:
    """Every pipeline rank calls it with its chunks (wrapped in DDP or not). With `train`, the
    loss is back-propagated through every chunk (gradients land where DDP puts them) and the last
    stage returns the loss; otherwise the last stage returns the gathered logits of every output
    layer call (each MTP layer's, then the main head's). Other ranks return (None, [])."""
    from megatron.core import parallel_state as ps
    from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region
    from megatron.core.utils import unwrap_model

    models = [unwrap_model(c) for c in chunks]
    for model in models:
        model.train(train)
    stages, stage = (
        ps.get_pipeline_model_parallel_world_size(),
        ps.get_pipeline_model_parallel_rank(),
    )
    following, previous = (
        ps.get_pipeline_model_parallel_next_rank(),
        ps.get_pipeline_model_parallel_prev_rank(),
    )
    order = _order(stages, len(chunks))
    batch, seq = input_ids.shape
    positions = torch.arange(seq).unsqueeze(0).expand(batch, -1)
    inputs: dict[int, Tensor] = {}
    outputs: dict[int, Tensor] = {}
    loss, logits = None, []
    for step, (v, p) in enumerate(order):
        if p != stage:
            continue
        model, last = models[v], step == len(order) - 1
        if step > 0:
            hidden = torch.empty(_hidden_shape(model, batch, seq), dtype=model.config.params_dtype)
            dist.recv(hidden, previous)
            inputs[step] = hidden.requires_grad_(train)
            model.set_input_tensor(hidden)
        handle = None
        if last and not train:
            handle = model.output_layer.register_forward_hook(
                lambda _m, _i, out: logits.append(out[0].detach().clone())
            )
        with torch.set_grad_enabled(train):
            out = chunks[v](
                input_ids=input_ids,
                position_ids=positions,
                attention_mask=None,
                labels=input_ids if train and last else None,
            )
        if handle is not None:
            handle.remove()
        if last:
            loss = out.float().mean() if train else None
        else:
            dist.send(out.detach().contiguous(), following)
            outputs[step] = out
    if train:
        for step in reversed(range(len(order))):
            if order[step][1] != stage:
                continue
            if step == len(order) - 1:
                loss.backward()
            else:
                grad = torch.empty_like(outputs[step])
                dist.recv(grad, following)
                outputs[step].backward(grad)
            if step > 0:
                dist.send(inputs[step].grad.contiguous(), previous)
    gathered = [
        gather_from_tensor_model_parallel_region(t).transpose(0, 1).contiguous() for t in logits
    ]
    return loss, gathered
