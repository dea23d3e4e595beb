"""A CPU stand-in for the Transformer Engine layers that megatron-core's Qwen3.5 spec asks for.

megatron-core 0.19.2 builds the hybrid (Gated DeltaNet + gated attention) model only from its
Transformer Engine spec, and Transformer Engine needs CUDA. These layers carry TE's class roles,
constructor signatures, parameter names (``weight``, ``layer_norm_weight``, ``weight{e}``,
``_extra_state``) and ``sharded_state_dict`` layouts, so the real spec builds unchanged, weights
map exactly as they would under TE, and ``torch_dist`` files written here load under real TE.
Under tensor parallelism they do the communication TE does; expert layers do none (the MoE token
dispatcher owns it). ``megatron_shims.install_cpu_shims`` wires :class:`CPUSpecProvider` in.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from functools import partial

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from megatron.core.dist_checkpointing.mapping import ShardedObject, ShardedStateDict
from megatron.core.dist_checkpointing.utils import replace_prefix_for_sharding
from megatron.core.models.backends import BackendSpecProvider
from megatron.core.packed_seq_params import PackedSeqParams
from megatron.core.process_groups_config import ProcessGroupCollection
from megatron.core.tensor_parallel.layers import set_tensor_model_parallel_attributes
from megatron.core.tensor_parallel.mappings import (
    copy_to_tensor_model_parallel_region,
    gather_from_sequence_parallel_region,
    reduce_from_tensor_model_parallel_region,
    reduce_scatter_to_sequence_parallel_region,
)
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.mlp import MLPSubmodules
from megatron.core.transformer.moe.experts import (
    GroupedMLPSubmodules,
    SequentialMLP,
    TEGroupedMLP,
)
from megatron.core.transformer.transformer_config import TransformerConfig
from megatron.core.transformer.utils import (
    ensure_metadata_has_dp_cp_group,
    make_sharded_tensors_for_checkpoint,
)
from megatron.core.utils import get_tensor_model_parallel_group_if_none

ProcessGroup = torch.distributed.ProcessGroup


class _TEExtraState:
    """TE modules carry an ``_extra_state`` entry (FP8 metadata); an empty byte tensor means none.

    Keeping the entry makes state-dict and ``torch_dist`` key sets identical to real TE's.
    """

    def get_extra_state(self) -> Tensor:
        return torch.empty(0, dtype=torch.uint8)

    def set_extra_state(self, state: object) -> None:
        if isinstance(state, Tensor) and state.numel() > 0:
            raise ValueError("FP8 extra state cannot be loaded by the CPU backend")


def _norm(x: Tensor, normalization: str, eps: float) -> Tensor:
    """RMSNorm or LayerNorm without affine parameters, in fp32 like TE's kernels."""
    x = x.float()
    if normalization == "RMSNorm":
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
    if normalization == "LayerNorm":
        return F.layer_norm(x, x.shape[-1:], eps=eps)
    raise ValueError(f"normalization {normalization!r}: expected 'RMSNorm' or 'LayerNorm'")


def _affine(
    y: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    zero_centered_gamma: bool,
    dtype: torch.dtype,
) -> Tensor:
    """Apply gamma (``1 + w`` when zero-centred, as TE does) and beta, then cast back."""
    gamma = weight.float() + 1 if zero_centered_gamma else weight.float()
    y = y * gamma
    if bias is not None:
        y = y + bias.float()
    return y.to(dtype)


def _norm_parameters(
    config: TransformerConfig, size: int, sequence_parallel: bool
) -> tuple[nn.Parameter, nn.Parameter | None]:
    """Gamma (ones, or zeros when zero-centred) and, for LayerNorm, a zero beta."""
    fill = 0.0 if config.layernorm_zero_centered_gamma else 1.0
    weight = nn.Parameter(torch.full((size,), fill, dtype=config.params_dtype))
    bias = None
    if config.normalization == "LayerNorm":
        bias = nn.Parameter(torch.zeros(size, dtype=config.params_dtype))
    for param in (weight, bias):
        if param is not None:
            param.sequence_parallel = sequence_parallel
    return weight, bias


class CPUNorm(_TEExtraState, nn.Module):
    """``TENorm``: RMSNorm or LayerNorm chosen by ``config.normalization``, like TE's wrapper."""

    def __init__(
        self,
        config: TransformerConfig,
        hidden_size: int,
        eps: float = 1e-5,
        has_residual: bool = False,
    ) -> None:
        super().__init__()
        if config.fused_residual_rmsnorm and has_residual:
            raise NotImplementedError("fused_residual_rmsnorm needs Transformer Engine")
        self.normalization = config.normalization
        self.zero_centered_gamma = config.layernorm_zero_centered_gamma
        self.eps = eps
        self.weight, self.bias = _norm_parameters(config, hidden_size, config.sequence_parallel)

    def forward(self, x: Tensor) -> Tensor:
        y = _norm(x, self.normalization, self.eps)
        return _affine(y, self.weight, self.bias, self.zero_centered_gamma, x.dtype)


class _CPULinear(_TEExtraState, nn.Module):
    """``TELinear``: one GEMM whose TP mode is ``column``, ``row`` or ``duplicated``.

    Column mode gathers the sequence (sequence parallel) or marks the TP region on the way in;
    row mode all-reduces (or reduce-scatters the sequence) on the way out. Expert layers and
    ``duplicated`` layers communicate nothing; expert sizes are local to the expert-TP group.
    """

    def __init__(
        self,
        input_size: int,
        output_size: int,
        *,
        parallel_mode: str | None,
        config: TransformerConfig,
        init_method: Callable[[Tensor], None] | None,
        bias: bool,
        skip_bias_add: bool,
        is_expert: bool,
        tp_group: ProcessGroup | None,
    ) -> None:
        super().__init__()
        self.config = config
        self.parallel_mode = parallel_mode
        self.is_expert = is_expert
        self.skip_bias_add = skip_bias_add
        self.sequence_parallel = config.sequence_parallel and not is_expert
        if parallel_mode == "duplicated":
            self._tp_group, tp_size = None, 1
        else:
            self._tp_group = get_tensor_model_parallel_group_if_none(tp_group, is_expert=is_expert)
            tp_size = self._tp_group.size() if self._tp_group is not None else 1
        self.communicates = parallel_mode in ("column", "row") and not is_expert and tp_size > 1
        out_local = output_size // tp_size if parallel_mode == "column" else output_size
        in_local = input_size // tp_size if parallel_mode == "row" else input_size
        self.in_features, self.out_features = in_local, out_local
        self.weight = nn.Parameter(torch.empty(out_local, in_local, dtype=config.params_dtype))
        self.bias = (
            nn.Parameter(torch.zeros(out_local, dtype=config.params_dtype)) if bias else None
        )
        self._init_weight(init_method)
        self._mark_parameters()

    def _init_weight(self, init_method: Callable[[Tensor], None] | None) -> None:
        if self.config.perform_initialization and init_method is not None:
            init_method(self.weight)
        else:
            nn.init.zeros_(self.weight)

    def _mark_parameters(self) -> None:
        """Set the attributes Megatron's optimizer and grad reduction read, as TE does."""
        partition_dim = {"column": 0, "row": 1}.get(self.parallel_mode)
        for name, param in self.named_parameters(recurse=False):
            param.allreduce = not self.is_expert
            if partition_dim is not None and (name == "weight" or self.parallel_mode == "column"):
                set_tensor_model_parallel_attributes(param, True, partition_dim, 1)
            else:  # replicated over TP: sequence-parallel grads need the TP all-reduce
                param.sequence_parallel = self.sequence_parallel

    def _input(self, x: Tensor) -> Tensor:
        if self.communicates and self.parallel_mode == "column":
            if self.sequence_parallel:
                return gather_from_sequence_parallel_region(x, group=self._tp_group)
            return copy_to_tensor_model_parallel_region(x, group=self._tp_group)
        return x

    def _output(self, y: Tensor) -> Tensor:
        if self.communicates and self.parallel_mode == "row":
            if self.sequence_parallel:
                return reduce_scatter_to_sequence_parallel_region(y, group=self._tp_group)
            return reduce_from_tensor_model_parallel_region(y, group=self._tp_group)
        return y

    def _linear(self, x: Tensor) -> tuple[Tensor, Tensor | None]:
        y = self._output(F.linear(self._input(x), self.weight))
        if self.bias is None:
            return y, None
        if self.skip_bias_add:
            return y, self.bias
        return y + self.bias, None

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor | None]:
        return self._linear(x)

    def _tp_axis_map(self) -> dict[str, int]:
        if self.parallel_mode == "column":
            return {"weight": 0, "bias": 0}
        if self.parallel_mode == "row":
            return {"weight": 1}
        return {}

    def sharded_state_dict(
        self,
        prefix: str = "",
        sharded_offsets: tuple = (),
        metadata: dict | None = None,
    ) -> ShardedStateDict:
        """Shard along the TP axis like Megatron's TE wrappers (norm weights replicated)."""
        metadata = ensure_metadata_has_dp_cp_group(metadata)
        return make_sharded_tensors_for_checkpoint(
            self.state_dict(prefix="", keep_vars=True),
            prefix,
            self._tp_axis_map(),
            sharded_offsets,
            tp_group=self._tp_group,
            dp_cp_group=metadata["dp_cp_group"],
        )


class CPULinear(_CPULinear):
    """``TELinear`` with an explicit ``parallel_mode`` (the spec uses ``duplicated``)."""

    def __init__(
        self,
        input_size: int,
        output_size: int,
        *,
        parallel_mode: str | None,
        config: TransformerConfig,
        init_method: Callable[[Tensor], None],
        bias: bool,
        skip_bias_add: bool,
        skip_weight_param_allocation: bool,
        tp_comm_buffer_name: str | None = None,
        is_expert: bool = False,
        symmetric_ar_type: str | None = None,
        tp_group: ProcessGroup | None = None,
        name: str | None = None,
    ) -> None:
        if skip_weight_param_allocation:
            raise ValueError("Transformer Engine linear layers allocate their own weights")
        super().__init__(
            input_size,
            output_size,
            parallel_mode=parallel_mode,
            config=config,
            init_method=init_method,
            bias=bias,
            skip_bias_add=skip_bias_add,
            is_expert=is_expert,
            tp_group=tp_group,
        )


class CPUColumnParallelLinear(_CPULinear):
    """``TEColumnParallelLinear``: output features split over TP ranks, output not gathered."""

    def __init__(
        self,
        input_size: int,
        output_size: int,
        *,
        config: TransformerConfig,
        init_method: Callable[[Tensor], None],
        gather_output: bool,
        bias: bool,
        skip_bias_add: bool,
        is_expert: bool,
        skip_weight_param_allocation: bool = False,
        tp_comm_buffer_name: str | None = None,
        tp_group: ProcessGroup | None = None,
        stride: int = 1,
        name: str | None = None,
    ) -> None:
        if gather_output or skip_weight_param_allocation:
            raise ValueError("Transformer Engine linear layers support neither option")
        super().__init__(
            input_size,
            output_size,
            parallel_mode="column",
            config=config,
            init_method=init_method,
            bias=bias,
            skip_bias_add=skip_bias_add,
            is_expert=is_expert,
            tp_group=tp_group,
        )


class CPURowParallelLinear(_CPULinear):
    """``TERowParallelLinear``: input features split over TP ranks, output all-reduced."""

    def __init__(
        self,
        input_size: int,
        output_size: int,
        *,
        config: TransformerConfig,
        init_method: Callable[[Tensor], None],
        bias: bool,
        input_is_parallel: bool,
        skip_bias_add: bool,
        is_expert: bool,
        tp_comm_buffer_name: str | None = None,
        tp_group: ProcessGroup | None = None,
        name: str | None = None,
    ) -> None:
        if not input_is_parallel:
            raise ValueError("Transformer Engine row-parallel layers need a parallel input")
        super().__init__(
            input_size,
            output_size,
            parallel_mode="row",
            config=config,
            init_method=init_method,
            bias=bias,
            skip_bias_add=skip_bias_add,
            is_expert=is_expert,
            tp_group=tp_group,
        )


class CPULayerNormColumnParallelLinear(CPUColumnParallelLinear):
    """``TELayerNormColumnParallelLinear``: the norm fused in front of a column-parallel GEMM.

    TE registers ``layer_norm_weight`` (and ``layer_norm_bias`` for LayerNorm) before
    ``weight``/``bias``; the order is kept so state dicts list keys as TE does.
    """

    def __init__(
        self,
        input_size: int,
        output_size: int,
        *,
        config: TransformerConfig,
        init_method: Callable[[Tensor], None],
        gather_output: bool,
        bias: bool,
        skip_bias_add: bool,
        is_expert: bool,
        skip_weight_param_allocation: bool = False,
        tp_comm_buffer_name: str | None = None,
        tp_group: ProcessGroup | None = None,
        stride: int = 1,
        name: str | None = None,
    ) -> None:
        if is_expert:
            raise ValueError("Transformer Engine layer-norm linear layers do not support MoE")
        super().__init__(
            input_size,
            output_size,
            config=config,
            init_method=init_method,
            gather_output=gather_output,
            bias=bias,
            skip_bias_add=skip_bias_add,
            is_expert=is_expert,
            skip_weight_param_allocation=skip_weight_param_allocation,
            tp_group=tp_group,
        )
        self.layer_norm_weight, self.layer_norm_bias = _norm_parameters(
            config, input_size, config.sequence_parallel
        )
        for param in (self.layer_norm_weight, self.layer_norm_bias):
            if param is not None:
                param.allreduce = True
        # TE registers the norm first: move the GEMM's parameters behind it (state-dict order).
        for name in ("weight", "bias"):
            if name in self._parameters:
                self._parameters[name] = self._parameters.pop(name)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor | None]:
        y = _norm(x, self.config.normalization, self.config.layernorm_epsilon)
        y = _affine(
            y,
            self.layer_norm_weight,
            self.layer_norm_bias,
            self.config.layernorm_zero_centered_gamma,
            x.dtype,
        )
        return self._linear(y)


class _CPUGroupedLinear(_TEExtraState, nn.Module):
    """``TEGroupedLinear``: one GEMM per local expert, weights ``weight0..weight{E_local-1}``.

    Sizes are local to the expert-TP group; no communication (the token dispatcher does it).
    ``sharded_state_dict`` emits each expert at its global index on an extra axis, which
    ``TEGroupedMLP`` turns into TE's stacked ``experts.linear_fc{1,2}.weight [E, ...]`` layout.
    """

    parallel_mode: str  # "column" (linear_fc1) or "row" (linear_fc2), set by the subclasses

    def __init__(
        self,
        num_gemms: int,
        input_size: int,
        output_size: int,
        *,
        config: TransformerConfig,
        init_method: Callable[[Tensor], None],
        bias: bool,
        skip_bias_add: bool,
        is_expert: bool,
        tp_comm_buffer_name: str | None = None,
        pg_collection: ProcessGroupCollection | None = None,
        name: str | None = None,
    ) -> None:
        super().__init__()
        if not is_expert:
            raise ValueError("TEGroupedLinear only supports expert parallelism")
        parallel_mode = self.parallel_mode
        self.config = config
        self.num_gemms = num_gemms
        self.skip_bias_add = skip_bias_add
        self.use_bias = bias
        if pg_collection is None:
            pg_collection = ProcessGroupCollection.use_mpu_process_groups()
        self._pg_collection = pg_collection
        self._tp_group = pg_collection.expt_tp
        tp_size = self._tp_group.size()
        out_local = output_size // tp_size if parallel_mode == "column" else output_size
        in_local = input_size // tp_size if parallel_mode == "row" else input_size
        self.in_features, self.out_features = in_local, out_local
        for i in range(num_gemms):
            weight = nn.Parameter(torch.empty(out_local, in_local, dtype=config.params_dtype))
            if config.perform_initialization:
                init_method(weight)
            else:
                nn.init.zeros_(weight)
            weight.allreduce = False
            set_tensor_model_parallel_attributes(weight, True, self._tp_axis, 1)
            self.register_parameter(f"weight{i}", weight)
        for i in range(num_gemms if bias else 0):
            bias_param = nn.Parameter(torch.zeros(out_local, dtype=config.params_dtype))
            bias_param.allreduce = False
            if parallel_mode == "column":
                set_tensor_model_parallel_attributes(bias_param, True, 0, 1)
            self.register_parameter(f"bias{i}", bias_param)
        self.register_load_state_dict_pre_hook(_take_per_expert_extra_states)

    @property
    def _tp_axis(self) -> int:
        return 0 if self.parallel_mode == "column" else 1

    def forward(self, x: Tensor, m_splits: list[int]) -> tuple[Tensor, list[Tensor] | None]:
        chunks = torch.split(x, m_splits)
        outs = [F.linear(chunk, getattr(self, f"weight{i}")) for i, chunk in enumerate(chunks)]
        biases = [getattr(self, f"bias{i}") for i in range(self.num_gemms)] if self.use_bias else []
        if biases and not self.skip_bias_add:
            outs = [out + b for out, b in zip(outs, biases)]
        return torch.cat(outs), (biases if biases and self.skip_bias_add else None)

    def _expert_state(self, i: int) -> dict[str, object]:
        state: dict[str, object] = {
            f"{i}.weight": getattr(self, f"weight{i}"),
            f"{i}._extra_state": self.get_extra_state(),
        }
        if self.use_bias:
            state[f"{i}.bias"] = getattr(self, f"bias{i}")
        return state

    def sharded_state_dict(
        self,
        prefix: str = "",
        sharded_offsets: tuple = (),
        metadata: dict | None = None,
    ) -> ShardedStateDict:
        """Per expert: TP-sharded weight at its global expert index, as TE's grouped layers do."""
        metadata = ensure_metadata_has_dp_cp_group(metadata)
        singleton_local_shards = metadata.get("singleton_local_shards", False)
        ep = self._pg_collection.ep
        num_global = ep.size() * self.num_gemms
        first_global = ep.rank() * self.num_gemms
        result: ShardedStateDict = {}
        for i in range(self.num_gemms):
            expert = first_global + i
            if singleton_local_shards:
                expert_prefix, offsets = f"{expert}.{prefix}", sharded_offsets
            else:
                expert_offset = (len(sharded_offsets), expert, num_global)
                expert_prefix, offsets = prefix, (*sharded_offsets, expert_offset)
            axis_map = {f"{i}.weight": self._tp_axis}
            if self.parallel_mode == "column":
                axis_map[f"{i}.bias"] = 0
            sub = make_sharded_tensors_for_checkpoint(
                self._expert_state(i),
                "",
                axis_map,
                offsets,
                tp_group=self._tp_group,
                dp_cp_group=metadata["dp_cp_group"],
            )
            replace_prefix_for_sharding(sub, f"{i}.", expert_prefix)
            result[f"{prefix}weight{i}"] = sub[f"{i}.weight"]
            result[f"{prefix}_extra_state{'' if i == 0 else i}"] = sub[f"{i}._extra_state"]
            if self.use_bias:
                result[f"{prefix}bias{i}"] = sub[f"{i}.bias"]
        self._set_expert_data_parallel_replica_ids(result)
        return result

    def _set_expert_data_parallel_replica_ids(self, sharded: ShardedStateDict) -> None:
        """Expert weights are replicated over expert-DP, not DP: elect writers there."""
        weight_rank = self._pg_collection.expt_dp.rank()
        object_rank = self._pg_collection.expt_dp_gtp_remat.rank()
        for entry in sharded.values():
            rank = object_rank if isinstance(entry, ShardedObject) else weight_rank
            entry.replica_id = (*entry.replica_id[:2], rank)


def _take_per_expert_extra_states(
    module: _CPUGroupedLinear, state_dict: dict, prefix: str, *_args: object
) -> None:
    """torch_dist stores ``_extra_state{i}`` per expert; like TE, fold them into the one entry."""
    for i in range(1, module.num_gemms):
        module.set_extra_state(state_dict.pop(f"{prefix}_extra_state{i}", None))


class CPUColumnParallelGroupedLinear(_CPUGroupedLinear):
    """``TEColumnParallelGroupedLinear`` (expert ``linear_fc1``)."""

    parallel_mode = "column"


class CPURowParallelGroupedLinear(_CPUGroupedLinear):
    """``TERowParallelGroupedLinear`` (expert ``linear_fc2``)."""

    parallel_mode = "row"


_CAUSAL_TOP_LEFT = (AttnMaskType.causal, AttnMaskType.padding_causal)
_USES_MASK_TENSOR = (
    AttnMaskType.padding,
    AttnMaskType.padding_causal,
    AttnMaskType.arbitrary,
)


def _attend(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    mask: Tensor | None,
    mask_type: AttnMaskType,
    scale: float,
    p: float,
) -> Tensor:
    """Softmax attention over ``[b, h, s, d]``; ``mask`` is Megatron's (True = masked out).

    Causal masks are aligned top-left, ``causal_bottom_right`` bottom-right, as in TE.
    """
    sq, sk = q.shape[-2], k.shape[-2]
    allowed = None
    if mask_type in _CAUSAL_TOP_LEFT or mask_type == AttnMaskType.causal_bottom_right:
        diagonal = sk - sq if mask_type == AttnMaskType.causal_bottom_right else 0
        allowed = torch.ones(sq, sk, dtype=torch.bool, device=q.device).tril(diagonal)
    if mask is not None and mask_type in _USES_MASK_TENSOR:
        allowed = ~mask if allowed is None else allowed & ~mask
    return F.scaled_dot_product_attention(q, k, v, attn_mask=allowed, dropout_p=p, scale=scale)


class CPUDotProductAttention(_TEExtraState, nn.Module):
    """``TEDotProductAttention`` in ``sbhd`` (or packed ``thd``) layout, GQA-aware.

    The mask type decides the pattern: causal for the language model, ``no_mask``/``padding``
    for a bidirectional vision tower, where packed ``cu_seqlens`` keep images apart.
    """

    def __init__(
        self,
        config: TransformerConfig,
        layer_number: int,
        attn_mask_type: AttnMaskType,
        attention_type: str,
        attention_dropout: float | None = None,
        softmax_scale: float | None = None,
        k_channels: int | None = None,
        v_channels: int | None = None,
        num_splits: int | None = None,
        cp_comm_type: str | None = "p2p",
        pg_collection: ProcessGroupCollection | None = None,
    ) -> None:
        super().__init__()
        if config.context_parallel_size > 1 or config.window_size is not None:
            raise NotImplementedError("context parallelism and sliding windows need TE")
        if config.softmax_type != "vanilla":
            raise NotImplementedError(f"softmax_type {config.softmax_type!r} needs TE")
        self.config = config
        self.attn_mask_type = attn_mask_type
        kv_channels = k_channels or config.kv_channels
        self.softmax_scale = softmax_scale or 1.0 / math.sqrt(kv_channels)
        self.dropout = config.attention_dropout if attention_dropout is None else attention_dropout

    def forward(
        self,
        query: Tensor,
        key: Tensor,
        value: Tensor,
        attention_mask: Tensor | None,
        attn_mask_type: AttnMaskType | None = None,
        attention_bias: Tensor | None = None,
        packed_seq_params: PackedSeqParams | None = None,
        num_splits: int | None = None,
    ) -> Tensor:
        if attention_bias is not None:
            raise NotImplementedError("attention_bias needs Transformer Engine")
        mask_type = attn_mask_type or self.attn_mask_type
        if packed_seq_params is not None and packed_seq_params.qkv_format == "thd":
            return self._packed(query, key, value, packed_seq_params, mask_type)
        # [s, b, h, d] -> [b, h, s, d]
        q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))
        k, v = self._expand_groups(q, k), self._expand_groups(q, v)
        out = _attend(q, k, v, attention_mask, mask_type, self.softmax_scale, self._dropout_p())
        s, b = query.shape[0], query.shape[1]
        return out.permute(2, 0, 1, 3).reshape(s, b, -1)

    def _dropout_p(self) -> float:
        return self.dropout if self.training else 0.0

    @staticmethod
    def _expand_groups(q: Tensor, kv: Tensor) -> Tensor:
        """Repeat each KV head for the query heads of its group (``dim`` = heads)."""
        return kv.repeat_interleave(q.shape[1] // kv.shape[1], dim=1)

    def _packed(
        self,
        query: Tensor,
        key: Tensor,
        value: Tensor,
        params: PackedSeqParams,
        mask_type: AttnMaskType,
    ) -> Tensor:
        """``thd`` layout: attend within each sequence; padding slots between them stay zero."""
        starts_q = _segment_starts(params.cu_seqlens_q, params.cu_seqlens_q_padded)
        starts_kv = _segment_starts(params.cu_seqlens_kv, params.cu_seqlens_kv_padded)
        lengths_q = (params.cu_seqlens_q[1:] - params.cu_seqlens_q[:-1]).tolist()
        lengths_kv = (params.cu_seqlens_kv[1:] - params.cu_seqlens_kv[:-1]).tolist()
        out = query.new_zeros(query.shape[0], query.shape[1], value.shape[-1])
        for sq0, lq, skv0, lkv in zip(starts_q, lengths_q, starts_kv, lengths_kv):
            # [t, h, d] -> [1, h, t, d]
            q = query[sq0 : sq0 + lq].transpose(0, 1).unsqueeze(0)
            k = key[skv0 : skv0 + lkv].transpose(0, 1).unsqueeze(0)
            v = value[skv0 : skv0 + lkv].transpose(0, 1).unsqueeze(0)
            k, v = self._expand_groups(q, k), self._expand_groups(q, v)
            seg = _attend(q, k, v, None, mask_type, self.softmax_scale, self._dropout_p())
            out[sq0 : sq0 + lq] = seg.squeeze(0).transpose(0, 1)
        return out.reshape(out.shape[0], -1)

    def sharded_state_dict(
        self,
        prefix: str = "",
        sharded_offsets: tuple = (),
        metadata: dict | None = None,
    ) -> ShardedStateDict:
        """Nothing to checkpoint: Megatron's TE wrapper saves only a learnable softmax offset."""
        return {}


def _segment_starts(cu_seqlens: Tensor, cu_seqlens_padded: Tensor | None) -> list[int]:
    """Memory offset of each packed sequence (the padded boundaries when given)."""
    bounds = cu_seqlens_padded if cu_seqlens_padded is not None else cu_seqlens
    return bounds[:-1].tolist()


class CPUSpecProvider(BackendSpecProvider):
    """``TESpecProvider`` answering with the CPU layers above."""

    def linear(self) -> type:
        return CPULinear

    def column_parallel_linear(self) -> type:
        return CPUColumnParallelLinear

    def row_parallel_linear(self) -> type:
        return CPURowParallelLinear

    def fuse_layernorm_and_linear(self) -> bool:
        return True

    def column_parallel_layer_norm_linear(self) -> type:
        return CPULayerNormColumnParallelLinear

    def layer_norm(
        self, rms_norm: bool = False, for_qk: bool = False, has_residual: bool = False
    ) -> Callable[..., CPUNorm]:
        return partial(CPUNorm, has_residual=has_residual) if has_residual else CPUNorm

    def core_attention(self) -> type:
        return CPUDotProductAttention

    def grouped_mlp_modules(self, moe_use_grouped_gemm: bool) -> Callable[..., nn.Module]:
        if moe_use_grouped_gemm:
            return partial(
                TEGroupedMLP,
                submodules=GroupedMLPSubmodules(
                    linear_fc1=CPUColumnParallelGroupedLinear,
                    linear_fc2=CPURowParallelGroupedLinear,
                    activation_func=None,
                ),
            )
        return partial(
            SequentialMLP,
            submodules=MLPSubmodules(
                linear_fc1=CPUColumnParallelLinear,
                linear_fc2=CPURowParallelLinear,
                activation_func=None,
            ),
        )

    def activation_func(self) -> None:
        """TE's fused activation op does not exist here; layers use ``config.activation_func``."""
        return None
