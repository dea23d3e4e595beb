"""BridgeBase: what every generated bridge is. The generated module supplies literal data (the
mapping table, the megatron-core config, GPTModel's arguments); this class supplies behaviour.
"""

from __future__ import annotations

from collections import Counter
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from codegen.runtime.mappings import ConvertOptions, Group, MappingBase

if TYPE_CHECKING:
    import torch


class BridgeBase:
    """Conversion between one model's HF checkpoint and megatron-core, driven by its mapping table."""

    model_id: ClassVar[str]
    hf_architecture: ClassVar[str]
    spec_sha256: ClassVar[str]
    mappings: ClassVar[tuple[MappingBase, ...]]
    gpt_model_args: ClassVar[dict[str, Any]]
    megatron_prefix: ClassVar[str]
    quantization: ClassVar[dict[str, Any] | None]

    def transformer_config(self, **overrides: Any) -> Any:
        raise NotImplementedError

    @cached_property
    def groups(self) -> tuple[Group, ...]:
        """Every concrete conversion group, in table order; each name appears in exactly one."""
        groups = tuple(g for m in self.mappings for g in m.groups())
        for side in ("hf", "megatron"):
            counts = Counter(name for g in groups for name in getattr(g, side))
            repeated = sorted(n for n, c in counts.items() if c > 1)
            if repeated:
                raise ValueError(
                    f"{self.model_id}: {side} tensor {repeated[0]} is mapped more than once"
                )
        return groups

    @cached_property
    def hf_shapes(self) -> dict[str, tuple[int, ...]]:
        """Every HF tensor of the checkpoint and its shape."""
        return {name: shape for g in self.groups for name, shape in g.hf.items()}

    @cached_property
    def megatron_shapes(self) -> dict[str, tuple[int, ...]]:
        """Every Megatron tensor (global, unsharded names) and its shape."""
        return {name: shape for g in self.groups for name, shape in g.megatron.items()}

    @property
    def hf_keys(self) -> frozenset[str]:
        return frozenset(self.hf_shapes)

    @property
    def megatron_keys(self) -> frozenset[str]:
        return frozenset(self.megatron_shapes)

    # -- Live megatron-core models -----------------------------------------------------------------

    def build_model(self, *, params_dtype: torch.dtype | None = None, **overrides: Any) -> Any:
        """This rank's megatron-core model. Initialise parallel state first
        (`codegen.runtime.parallel.init_parallel`, whose return value belongs in `overrides`).
        Without Transformer Engine, the CPU backend and its settings are used."""
        import torch

        from codegen.runtime.megatron_model import build_gpt_model, cpu_config_overrides
        from codegen.runtime.megatron_shims import transformer_engine_available

        params_dtype = params_dtype or torch.float32
        settings = {} if transformer_engine_available() else cpu_config_overrides()
        settings |= {
            "params_dtype": params_dtype,
            "pipeline_dtype": params_dtype,
            "bf16": params_dtype == torch.bfloat16,
        } | overrides
        return build_gpt_model(self.transformer_config(**settings), **self.gpt_model_args)

    def _prefix(self, model: Any) -> str:
        """A language model alone holds the `language_model.` part of a VL checkpoint."""
        return "" if hasattr(model, "vision_model") else self.megatron_prefix

    def load_hf(
        self, model: Any, hf_dir: str | Path, *, options: ConvertOptions = ConvertOptions()
    ) -> None:
        """Load an HF checkpoint folder into `model` (this rank's shard of it). The checkpoint must
        hold exactly the bridge's tensors, with the bridge's shapes."""
        from codegen.runtime import live
        from codegen.runtime.checkpoint import CheckpointReader
        from codegen.runtime.convert import check_source

        with CheckpointReader(Path(hf_dir)) as reader:
            check_source(reader, self.hf_shapes, "HF")
            live.load(self, model, reader.get, prefix=self._prefix(model), options=options)

    def load_megatron(self, model: Any, megatron_dir: str | Path) -> None:
        """Load the Megatron safetensors written by `codegen convert hf-to-megatron` into `model`."""
        from codegen.runtime import live
        from codegen.runtime.checkpoint import CheckpointReader
        from codegen.runtime.convert import check_source

        with CheckpointReader(Path(megatron_dir)) as reader:
            check_source(reader, self.megatron_shapes, "Megatron")
            live.load_megatron(self, model, reader.get, prefix=self._prefix(model))

    def export_megatron(self, model: Any) -> dict[str, torch.Tensor]:
        """Every tensor of `model`, unsharded, under the bridge's Megatron names (on every rank)."""
        from codegen.runtime import live

        return live.export(self, model, prefix=self._prefix(model))

    def export_hf(self, model: Any) -> dict[str, torch.Tensor]:
        """Every HF tensor of `model` (on every rank)."""
        from codegen.runtime import live

        return live.to_hf(self, self.export_megatron(model))

    # -- Vision-language models (set by VL bridges) ------------------------------------------------

    vision_model_args: ClassVar[dict[str, Any] | None] = None
    mrope_section: ClassVar[tuple[int, ...] | None] = None

    def vision_transformer_config(self, **overrides: Any) -> Any:
        """megatron-core's TransformerConfig of the vision layers (VL bridges define it)."""
        raise NotImplementedError(f"{self.model_id} has no vision tower")

    def build_vl_model(self, *, params_dtype: torch.dtype | None = None, **overrides: Any) -> Any:
        """This rank's megatron-core VL model (`codegen.runtime.vl_model.VLModel`): the vision tower
        as `vision_model`, and as `language_model` what `build_model` builds, fed with the vision
        tokens and interleaved mRoPE. Arguments as for `build_model`."""
        from codegen.runtime.vl_model import assemble, vision_settings

        if self.vision_model_args is None or self.mrope_section is None:
            raise ValueError(f"{self.model_id} is a text-only model: use build_model")
        language_model = self.build_model(params_dtype=params_dtype, **overrides)
        vision_config = self.vision_transformer_config(**vision_settings(language_model.config))
        return assemble(
            language_model,
            vision_config,
            self.vision_model_args,
            mrope_section=self.mrope_section,
            rotary_percent=self.gpt_model_args["rotary_percent"],
            rotary_base=self.gpt_model_args["rotary_base"],
        )
