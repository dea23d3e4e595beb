"""TE's linear layers on the CPU: plain, column- and row-parallel, and the norm fused in front of a
column-parallel GEMM. Under tensor parallelism they communicate as TE does."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from megatron.core.dist_checkpointing.mapping import ShardedStateDict
from megatron.core.tensor_parallel.layers import set_tensor_model_parallel_attributes
from megatron.core.tensor_parallel.mappings import (
    copy_to_tensor_model_parallel_region,
    gather_from_sequence_parallel_region,
    reduce_from_tensor_model_parallel_region,
    reduce_scatter_to_sequence_parallel_region,
)
from megatron.core.transformer.transformer_config import TransformerConfig
from megatron.core.transformer.utils import (
    ensure_metadata_has_dp_cp_group,
    make_sharded_tensors_for_checkpoint,
)
from megatron.core.utils import get_tensor_model_parallel_group_if_none
from torch import Tensor, nn

from qwen35_bridge.megatron.cpu_backend.common import (
    TEExtraState,
    affine,
    norm_parameters,
    normalize,
)

ProcessGroup = torch.distributed.ProcessGroup


class _CPULinear(TEExtraState, nn.Module):
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
        self.layer_norm_weight, self.layer_norm_bias = norm_parameters(
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
        y = normalize(x, self.config.normalization, self.config.layernorm_epsilon)
        y = affine(
            y,
            self.layer_norm_weight,
            self.layer_norm_bias,
            self.config.layernorm_zero_centered_gamma,
            x.dtype,
        )
        return self._linear(y)
