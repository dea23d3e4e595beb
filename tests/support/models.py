"""Build a tiny HF model for a config dict with every parameter random and seed-deterministic.

Default initialisation leaves norms at 0 or 1, `dt_bias` at 1 and routers at tiny values: a
conversion that drops or mis-maps such a tensor would still produce equal logits. So every
parameter gets a random value drawn by its role, with ranges that keep the model numerically sane
and make mistakes visible.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import transformers
from torch import nn

from qwen35_bridge.reference.hf_kernels import use_torch_gdn_kernels
from qwen35_bridge.reference.hf_models import hf_config, hf_model_class

# Zero-centred RMSNorm weights (`x_hat * (1 + w)`): random around 0.
ZERO_CENTRED_NORM = (-0.5, 0.5)
# GDN output norm (`w * x_hat * silu(z)`, plain w): the conversion stores w - 1, exact in [0.5, 2].
GATED_NORM = (0.5, 2.0)
# LayerNorm (vision tower): plain weight, random around 1.
LAYER_NORM = (0.5, 1.5)
BIAS_STD = 0.1
EMBEDDING_STD = 0.5
# Linear weights: std = LINEAR_GAIN / sqrt(fan_in), activations stay O(1) through the layers.
LINEAR_GAIN = 0.5
# Router: larger logits keep top-k choices far from ties, so fp32 rounding never flips a route.
ROUTER_GAIN = 2.0


def build_hf_model(
    config: dict[str, Any], *, seed: int, dtype: torch.dtype = torch.float32
) -> transformers.PreTrainedModel:
    """The HF model of `config` (VL, text-only Qwen3.5 or Qwen3-Next), every parameter random.

    Deterministic from `seed` (independent of the global RNG state, which is left untouched).
    Tied embeddings stay tied: the output layer is the embedding tensor itself. Also switches
    transformers' GDN to its torch kernels (`hf_cpu`), so the model runs on CPU.
    """
    use_torch_gdn_kernels()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = hf_model_class(config)._from_config(hf_config(config), dtype=torch.float32)
    randomize_(model, seed=seed)
    model.to(dtype)
    model.eval()
    _check_tie(model, config)
    return model


def _check_tie(model: nn.Module, config: dict[str, Any]) -> None:
    out = model.get_output_embeddings().weight
    emb = model.get_input_embeddings().weight
    tied = bool(config.get("tie_word_embeddings", False))
    if tied != (out is emb):
        raise AssertionError(
            f"tie_word_embeddings={tied} but output layer is embedding: {out is emb}"
        )


def randomize_(module: nn.Module, *, seed: int) -> None:
    """Give every parameter of `module` a random value chosen by its role, in place.

    Parameters are visited in `named_modules` order (fixed for a config), from one generator, so
    the result depends on the seed only. A parameter of a module kind not known here is an error:
    nothing may keep its default value unnoticed.
    """
    gen = torch.Generator().manual_seed(seed)
    seen: set[int] = set()
    with torch.no_grad():
        for name, sub in module.named_modules():
            for pname, param in sub.named_parameters(recurse=False):
                if id(param) in seen:
                    continue
                seen.add(id(param))
                param.copy_(_draw(sub, pname, param, gen, f"{name}.{pname}"))


def _draw(
    module: nn.Module, pname: str, param: torch.Tensor, gen: torch.Generator, full: str
) -> torch.Tensor:
    kind = type(module).__name__
    shape = tuple(param.shape)
    if kind.endswith("RMSNormGated"):
        return _uniform(shape, GATED_NORM, gen)
    if kind.endswith("RMSNorm"):
        return _uniform(shape, ZERO_CENTRED_NORM, gen)
    if isinstance(module, nn.LayerNorm):
        return (
            _uniform(shape, LAYER_NORM, gen) if pname == "weight" else _normal(shape, BIAS_STD, gen)
        )
    if isinstance(module, nn.Embedding):
        return _normal(shape, EMBEDDING_STD, gen)
    if isinstance(module, (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)):
        return _weight(shape, gen) if pname == "weight" else _normal(shape, BIAS_STD, gen)
    if kind.endswith("TopKRouter"):
        return _normal(shape, ROUTER_GAIN / math.sqrt(shape[-1]), gen)
    if kind.endswith("Experts"):
        return _normal(shape, LINEAR_GAIN / math.sqrt(shape[-1]), gen)
    if kind.endswith("GatedDeltaNet") and pname == "A_log":
        return _uniform(shape, (1.0, 16.0), gen).log()
    if kind.endswith("GatedDeltaNet") and pname == "dt_bias":
        return _normal(shape, 0.5, gen)
    raise TypeError(f"no random rule for parameter {full} of {kind}")


def _weight(shape: tuple[int, ...], gen: torch.Generator) -> torch.Tensor:
    fan_in = math.prod(shape[1:])
    return _normal(shape, LINEAR_GAIN / math.sqrt(fan_in), gen)


def _normal(shape: tuple[int, ...], std: float, gen: torch.Generator) -> torch.Tensor:
    return torch.randn(shape, generator=gen) * std


def _uniform(
    shape: tuple[int, ...], bounds: tuple[float, float], gen: torch.Generator
) -> torch.Tensor:
    low, high = bounds
    return low + (high - low) * torch.rand(shape, generator=gen)
