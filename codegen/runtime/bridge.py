"""BridgeBase: what every generated bridge is. The generated module supplies literal data (the
mapping table, the megatron-core config, GPTModel's arguments); this class supplies behaviour.
"""

from __future__ import annotations

from collections import Counter
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from codegen.errors import ConversionError
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

    def _prefix(self, model: Any, *, language_model_only: bool = False) -> str:
        """The part of the bridge's names `model` holds: all of them, or, for the language model of
        a VL bridge built alone, the `language_model.` part, which the caller must ask for, so that
        a vision tower is never left out unnoticed."""
        if hasattr(model, "vision_model"):
            return ""
        if self.vision_model_args is not None and not language_model_only:
            raise ConversionError(
                f"{self.model_id} is a vision-language model but this model has no vision tower: "
                "build it with build_vl_model(), or pass language_model_only=True to leave the "
                "vision tower's tensors out"
            )
        return self.megatron_prefix

    def load_hf(
        self,
        model: Any,
        hf_dir: str | Path,
        *,
        options: ConvertOptions = ConvertOptions(),
        language_model_only: bool = False,
    ) -> None:
        """Load an HF checkpoint folder into `model` (this rank's shard of it). The checkpoint must
        hold exactly the bridge's tensors, with the bridge's shapes."""
        from codegen.runtime import live
        from codegen.runtime.checkpoint import CheckpointReader
        from codegen.runtime.convert import check_source

        prefix = self._prefix(model, language_model_only=language_model_only)
        with CheckpointReader(Path(hf_dir)) as reader:
            check_source(reader, self.hf_shapes, "HF")
            live.load(self, model, reader.get, prefix=prefix, options=options)

    def load_megatron(
        self, model: Any, megatron_dir: str | Path, *, language_model_only: bool = False
    ) -> None:
        """Load a Megatron checkpoint written by `codegen convert hf-to-megatron` (either format)
        into `model`."""
        from codegen.runtime import live
        from codegen.runtime.convert import check_source, megatron_reader

        prefix = self._prefix(model, language_model_only=language_model_only)
        with megatron_reader(self, Path(megatron_dir)) as reader:
            check_source(reader, self.megatron_shapes, "Megatron")
            live.load_megatron(self, model, reader.get, prefix=prefix)

    def export_megatron(
        self, model: Any, *, language_model_only: bool = False
    ) -> dict[str, torch.Tensor]:
        """Every tensor of `model`, unsharded, under the bridge's Megatron names (on every rank)."""
        from codegen.runtime import live

        prefix = self._prefix(model, language_model_only=language_model_only)
        return live.export(self, model, prefix=prefix)

    def export_hf(
        self,
        model: Any,
        *,
        options: ConvertOptions = ConvertOptions(),
        language_model_only: bool = False,
    ) -> dict[str, torch.Tensor]:
        """Every HF tensor of `model` (on every rank). `options.allow_norm_rounding` accepts a GDN
        norm whose HF form `g + 1` rounds (a norm trained in bf16 can hold such values)."""
        from codegen.runtime import live

        megatron = self.export_megatron(model, language_model_only=language_model_only)
        prefix = self._prefix(model, language_model_only=language_model_only)
        return live.to_hf(self, megatron, prefix=prefix, options=options)

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
