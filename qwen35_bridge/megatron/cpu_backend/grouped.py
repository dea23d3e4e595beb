"""TE's grouped expert linears on the CPU: one GEMM per local expert, and TE's stacked-expert
checkpoint layout, so torch_dist files written here load under real TE."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from megatron.core.dist_checkpointing.mapping import ShardedObject, ShardedStateDict
from megatron.core.dist_checkpointing.utils import replace_prefix_for_sharding
from megatron.core.process_groups_config import ProcessGroupCollection
from megatron.core.tensor_parallel.layers import set_tensor_model_parallel_attributes
from megatron.core.transformer.transformer_config import TransformerConfig
from megatron.core.transformer.utils import (
    ensure_metadata_has_dp_cp_group,
    make_sharded_tensors_for_checkpoint,
)
from torch import Tensor, nn

from qwen35_bridge.megatron.cpu_backend.common import TEExtraState


class _CPUGroupedLinear(TEExtraState, nn.Module):
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
