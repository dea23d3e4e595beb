"""Every patch that lets megatron-core's Qwen3.5 model run on a machine without CUDA or TE.

megatron-core 0.19.2 builds the hybrid Qwen3.5 model only from its Transformer Engine spec and
assumes CUDA in a few places on the way. The patches below swap in :mod:`.cpu_backend` and answer
the CUDA calls; each is pinned to the release it was written against and names the private
megatron-core attribute it relies on, so ``tests/test_megatron_shims.py`` fails when one moves.
With Transformer Engine installed nothing is patched: the real spec runs unchanged.
"""

from __future__ import annotations

import importlib
import logging
import os
import warnings
from collections.abc import Iterator
from contextlib import contextmanager

import torch

from qwen35_bridge.versions import require_pinned_megatron_core

_GPT_LAYER_SPECS = "megatron.core.models.gpt.gpt_layer_specs"
_HYBRID_SPECS = "megatron.core.models.gpt.experimental_attention_variant_module_specs"
_HYBRID_BLOCK = "megatron.core.models.hybrid.hybrid_block"
_ATTENTION = "megatron.core.transformer.attention"
_GDN_COMMON = "megatron.core.ssm.gated_delta_net.common"
_RNG = "megatron.core.tensor_parallel.random"

#: ``(module, attribute)``: megatron-core 0.19.2 names the shims replace; each must exist.
PATCHED_ATTRIBUTES: tuple[tuple[str, str], ...] = (
    # Looked up by get_gpt_layer_with_transformer_engine_submodules (the attention half of the
    # hybrid spec) and by get_gpt_mtp_block_spec; None without TE.
    (_GPT_LAYER_SPECS, "TESpecProvider"),
    # The final norm of get_gpt_decoder_block_spec(use_transformer_engine=True); None without TE.
    (_GPT_LAYER_SPECS, "TENorm"),
    # HybridModel's stack builds its final norm from this name (a stand-in without TE).
    (_HYBRID_BLOCK, "TENorm"),
    # SelfAttention's q/k norm when the spec names none, as HybridModel's attention layer spec
    # does; None without TE.
    (_ATTENTION, "TENorm"),
    # FLA's Triton l2norm, called on q and k by the GDN layer; it fails on CPU. The package
    # __init__ holds only a copy of the name: the call site looks it up here.
    (_GDN_COMMON, "l2norm"),
    # The RNG tracker's CUDA state access (fork() is used by the MTP layer under sequence
    # parallelism); redirected to the CPU generator.
    (_RNG, "_get_cuda_rng_state"),
    (_RNG, "_set_cuda_rng_state"),
)

#: ``(module, function, global)``: functions that look up a global the shims define. Without TE
#: the global does not exist (the module imports it inside ``try: import transformer_engine``).
PROVIDED_GLOBALS: tuple[tuple[str, str, str], ...] = (
    (_HYBRID_SPECS, "_get_backend_spec_provider", "TESpecProvider"),
)

#: Other megatron-core 0.19.2 names the CPU runtime reads: ``(module, attribute)``.
READ_ATTRIBUTES: tuple[tuple[str, str], ...] = (
    ("megatron.core.extensions.transformer_engine", "HAVE_TE"),
    (_RNG, "_MODEL_PARALLEL_RNG_TRACKER_NAME"),
)

_installed = False


#: Modules whose import- and build-time advice is about training on a GPU (Transformer Engine,
#: Apex or Triton absent, routing precision, CUDA-graph scopes), not about a model built to read
#: its layout or to compare logits.
_ADVISING_MODULES = r"(megatron\.core|fla)(\..*)?$"
#: Loggers with the same kind of notice: GPTModel's deprecation (once per build) and torch's
#: "No CUDA runtime is found" when megatron-core imports its extension builder.
_ADVISING_LOGGERS = ("megatron.core.models.gpt.gpt_model", "torch.utils.cpp_extension")


@contextmanager
def training_advice_silenced() -> Iterator[None]:
    """Keep megatron-core's and FLA's training advice off the console of a conversion.

    Only UserWarnings raised inside those packages and the notices above are held back (the
    loggers still pass errors); every other warning passes.
    """
    loggers = [logging.getLogger(name) for name in _ADVISING_LOGGERS]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", category=UserWarning, module=_ADVISING_MODULES)
            yield
    finally:
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)


def transformer_engine_available() -> bool:
    """Whether megatron-core found a usable Transformer Engine (then the real spec is used)."""
    require_pinned_megatron_core()
    from megatron.core.extensions import transformer_engine

    return bool(transformer_engine.HAVE_TE)


def torch_l2norm(
    x: torch.Tensor,
    dim: int = -1,
    eps: float = 1e-6,
    output_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """FLA's ``l2norm`` in torch: ``x / sqrt(sum(x^2) + eps)`` computed in fp32.

    Accepts both FLA's signature ``(x, eps, output_dtype)`` and the ``dim=`` keyword that
    megatron-core's torch delta rule passes.
    """
    xf = x.float()
    y = xf * torch.rsqrt(xf.pow(2).sum(dim=dim, keepdim=True) + eps)
    return y.to(output_dtype or x.dtype)


def _cpu_rng_state(
    device: object = "cuda", clone: bool = False, graph_safe: bool = False
) -> torch.Tensor:
    """Stands in for megatron's ``_get_cuda_rng_state``: the CPU generator's state."""
    return torch.get_rng_state()


def _set_cpu_rng_state(new_state: torch.Tensor, device: int = -1, graph_safe: bool = False) -> None:
    """Stands in for megatron's ``_set_cuda_rng_state``: sets the CPU generator's state."""
    torch.set_rng_state(new_state)


def _cpu_current_device() -> torch.device:
    """``torch.cuda.current_device`` for code that allocates on "the current device"."""
    return torch.device("cpu")


def _no_synchronize(device: object = None) -> None:
    """``torch.cuda.synchronize`` has nothing to wait for without CUDA."""


def _tensor_stays(self: torch.Tensor, *args: object, **kwargs: object) -> torch.Tensor:
    """``Tensor.cuda`` moves to the current device, which is the CPU here. megatron-core calls
    it when the last pipeline stage holds a copy of the embedding (tied output layer or MTP) and
    in dist_checkpointing's exchanges.
    """
    return self


def _patch(module_name: str, attribute: str, value: object) -> None:
    """Rebind one declared megatron-core name (undeclared ones would escape the test)."""
    declared = {(m, a) for m, a in PATCHED_ATTRIBUTES} | {(m, g) for m, _, g in PROVIDED_GLOBALS}
    if (module_name, attribute) not in declared:
        raise AssertionError(f"{module_name}.{attribute} is not declared in megatron_shims")
    setattr(importlib.import_module(module_name), attribute, value)


def _install_backend() -> None:
    """Point the TE spec providers and TE norm the Qwen3.5 spec looks up at the CPU backend."""
    from qwen35_bridge.megatron.cpu_backend import CPUNorm, CPUSpecProvider

    _patch(_GPT_LAYER_SPECS, "TESpecProvider", CPUSpecProvider)
    _patch(_GPT_LAYER_SPECS, "TENorm", CPUNorm)
    _patch(_HYBRID_SPECS, "TESpecProvider", CPUSpecProvider)
    _patch(_HYBRID_BLOCK, "TENorm", CPUNorm)
    _patch(_ATTENTION, "TENorm", CPUNorm)
    _patch(_GDN_COMMON, "l2norm", torch_l2norm)


def _install_cuda_stand_ins() -> None:
    """Answer the CUDA calls megatron-core makes while building, running and checkpointing."""
    torch.cuda.current_device = _cpu_current_device
    torch.cuda.synchronize = _no_synchronize
    torch.Tensor.cuda = _tensor_stays
    _patch(_RNG, "_get_cuda_rng_state", _cpu_rng_state)
    _patch(_RNG, "_set_cuda_rng_state", _set_cpu_rng_state)


def _disable_torch_compile() -> None:
    """megatron-core wraps small fused helpers in ``torch.compile``: about 20 s on the first CPU
    forward, for identical results. The env var reaches spawned ranks; the flag also covers
    functions already decorated before this call."""
    os.environ["TORCHDYNAMO_DISABLE"] = "1"
    import torch._dynamo

    torch._dynamo.config.disable = True


def install_cpu_shims() -> bool:
    """Patch megatron-core for a machine without Transformer Engine; idempotent.

    Returns True when the CPU backend is in use, False when TE is present (nothing patched).
    Call it before building a model. The CPU backend means running on the CPU, also on a machine
    with CUDA: megatron-core would otherwise put some parameters (GDN's conv1d) on the GPU and
    the rest on the CPU, so the CUDA stand-ins come with the backend.
    """
    global _installed
    if _installed:
        return True
    if transformer_engine_available():
        return False
    _install_backend()
    _install_cuda_stand_ins()
    _disable_torch_compile()
    _installed = True
    return True
