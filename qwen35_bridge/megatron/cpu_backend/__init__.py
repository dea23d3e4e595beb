"""A CPU stand-in for the Transformer Engine layers that megatron-core's Qwen3.5 spec asks for.

megatron-core 0.19.2 builds the hybrid (Gated DeltaNet + gated attention) model only from its
Transformer Engine spec, and Transformer Engine needs CUDA. These layers carry TE's class roles,
constructor signatures, parameter names (``weight``, ``layer_norm_weight``, ``weight{e}``,
``_extra_state``) and ``sharded_state_dict`` layouts, so the real spec builds unchanged, weights
map exactly as they would under TE, and ``torch_dist`` files written here load under real TE.
Under tensor parallelism they do the communication TE does; expert layers do none (the MoE token
dispatcher owns it). ``qwen35_bridge.megatron.shims.install_cpu_shims`` wires
:class:`CPUSpecProvider` in.

One module per layer kind: `norm`, `linear` (plain, column- and row-parallel, norm + linear),
`grouped` (expert linears), `attention` (core attention), and `provider`, which hands them to the
spec; `common` holds what they share.
"""

from qwen35_bridge.megatron.cpu_backend.norm import CPUNorm
from qwen35_bridge.megatron.cpu_backend.provider import CPUSpecProvider

__all__ = ["CPUNorm", "CPUSpecProvider"]
