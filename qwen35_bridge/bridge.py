"""BridgeBase: what every generated bridge is. The generated module supplies literal data (the
mapping table, the megatron-core config, the model class it targets and that class's arguments);
this class supplies behaviour: it builds the model, loads a checkpoint into it, and exports it, one
group of tensors at a time.
"""

from __future__ import annotations

from pathlib import Path
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any, ClassVar

from qwen35_bridge.errors import ConversionError
from qwen35_bridge.mapping.kinds import ConvertOptions
from qwen35_bridge.mapping.table import MappingTable

if TYPE_CHECKING:
    import torch


class BridgeBase(MappingTable):
    """Conversion between one model's HF checkpoint and megatron-core, driven by its mapping table."""

    hf_architecture: ClassVar[str]
    spec_sha256: ClassVar[str]
    quantization: ClassVar[dict[str, Any] | None]
    #: The megatron-core model class the table's names are those of (qwen35_bridge.targets):
    #: `gpt` bridges give `gpt_model_args`, `hybrid` bridges `hybrid_model_args` and the pattern.
    target: ClassVar[str] = "gpt"
    gpt_model_args: ClassVar[dict[str, Any] | None] = None
    hybrid_model_args: ClassVar[dict[str, Any] | None] = None
    hybrid_layer_pattern: ClassVar[str | None] = None

    @property
    def model_args(self) -> dict[str, Any]:
        """The arguments of the model class this bridge targets (vocabulary, rotary, tying)."""
        args = self.hybrid_model_args if self.target == "hybrid" else self.gpt_model_args
        if args is None:
            raise TypeError(f"{type(self).__name__} gives no arguments for its {self.target} model")
        return args

    def transformer_config(self, **overrides: Any) -> Any:
        raise NotImplementedError

    # -- Live megatron-core models -----------------------------------------------------------------

    def build_model(self, *, params_dtype: torch.dtype | None = None, **overrides: Any) -> Any:
        """This rank's megatron-core model, of the class the bridge targets: GPTModel or
        HybridModel (with virtual pipeline stages: the list of this rank's chunks). Initialise
        parallel state first (`qwen35_bridge.megatron.parallel.init_parallel`, whose return value
        belongs in `overrides`). Without Transformer Engine, the CPU backend and its settings are
        used."""
        import torch

        from qwen35_bridge.megatron.gpt import build_gpt_model, cpu_config_overrides
        from qwen35_bridge.megatron.shims import transformer_engine_available

        params_dtype = params_dtype or torch.float32
        settings = {} if transformer_engine_available() else cpu_config_overrides()
        settings |= {
            "params_dtype": params_dtype,
            "pipeline_dtype": params_dtype,
            "bf16": params_dtype == torch.bfloat16,
        } | overrides
        config = self.transformer_config(**settings)
        build, args = build_gpt_model, self.model_args
        if self.target == "hybrid":
            from qwen35_bridge.megatron.hybrid import build_hybrid_model

            build, args = build_hybrid_model, {
                **args,
                "hybrid_layer_pattern": self.hybrid_layer_pattern,
            }
        chunks = settings.get("virtual_pipeline_model_parallel_size")
        if not chunks:
            return build(config, **args)
        return [build(config, **args, vp_stage=i) for i in range(chunks)]

    def prefix_for(self, model: Any, *, language_model_only: bool = False) -> str:
        """The part of the bridge's names `model` holds: all of them, or, for the language model of
        a VL bridge built alone, the `language_model.` part, which the caller must ask for, so that
        a vision tower is never left out unnoticed."""
        if hasattr(model, "vision_model"):
            return ""
        if self.is_vl and not language_model_only:
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
        from qwen35_bridge.formats.safetensors.reader import CheckpointReader
        from qwen35_bridge.megatron import live
        from qwen35_bridge.offline import check_source

        prefix = self.prefix_for(_first_chunk(model), language_model_only=language_model_only)
        with CheckpointReader(Path(hf_dir)) as reader:
            check_source(reader, self.hf_shapes, "HF")
            live.load(self, model, reader.get, prefix=prefix, options=options)

    def load_megatron(
        self,
        model: Any,
        megatron_dir: str | Path,
        *,
        iteration: int | None = None,
        language_model_only: bool = False,
    ) -> None:
        """Load a Megatron checkpoint into `model` (this rank's shard of it): one written by
        `codegen convert hf-to-megatron` (either format), or a trainer's (a Megatron-LM or
        Megatron-Bridge run root or iteration folder, torch_dist or the legacy `torch` format, at
        any TP/PP/EP; `iteration` picks another than the tracked one). Its model tensors must be
        exactly the bridge's; a trainer's optimizer and RNG state are never read."""
        from qwen35_bridge.megatron import live
        from qwen35_bridge.offline import check_source, megatron_reader

        prefix = self.prefix_for(_first_chunk(model), language_model_only=language_model_only)
        with megatron_reader(self, Path(megatron_dir), iteration) as reader:
            check_source(reader, self.megatron_shapes, "Megatron")
            live.load_megatron(self, model, reader.get, prefix=prefix)

    def iter_hf(
        self,
        model: Any,
        *,
        experts: str | None = None,
        bucket_bytes: int | None = None,
        receiver: int | None = None,
        options: ConvertOptions = ConvertOptions(),
        language_model_only: bool = False,
    ) -> Iterator[Any]:
        """Stream `model`'s weights under HF names, one mapping group at a time, without ever
        holding the whole model: `(hf_name, tensor)` pairs, or with `bucket_bytes` lists of them
        totalling at most that many bytes (an engine's weight-update call).

        `model` is what training code holds: a model or its virtual-pipeline chunks, wrapped in
        megatron-core's DDP or Float16Module or not. Every rank of the job must iterate the
        stream to the end (the ranks holding a tensor send it as its turn comes); the tensors
        arrive on every rank, or only on the global rank `receiver`. `experts="per_expert"` sends
        packed experts one expert at a time under their per-expert names. Tensors are on the
        model's device and belong to the caller."""
        from qwen35_bridge.megatron import stream

        prefix = self.prefix_for(_first_chunk(model), language_model_only=language_model_only)
        pairs = stream.iter_hf(
            self, model, prefix=prefix, experts=experts, receiver=receiver, options=options
        )
        return stream.buckets(pairs, bucket_bytes) if bucket_bytes else pairs

    def iter_megatron(
        self,
        model: Any,
        *,
        receiver: int | None = None,
        language_model_only: bool = False,
    ) -> Iterator[tuple[str, torch.Tensor]]:
        """Stream `model`'s full tensors under the bridge's Megatron names (as `iter_hf`)."""
        from qwen35_bridge.megatron import stream

        prefix = self.prefix_for(_first_chunk(model), language_model_only=language_model_only)
        return stream.iter_megatron(self, model, prefix=prefix, receiver=receiver)

    def export_megatron(
        self, model: Any, *, language_model_only: bool = False
    ) -> dict[str, torch.Tensor]:
        """Every tensor of `model`, unsharded, under the bridge's Megatron names (on every rank).
        It holds the whole model: for a large one, stream with `iter_megatron`."""
        return dict(self.iter_megatron(model, language_model_only=language_model_only))

    def export_hf(
        self,
        model: Any,
        *,
        options: ConvertOptions = ConvertOptions(),
        language_model_only: bool = False,
    ) -> dict[str, torch.Tensor]:
        """Every HF tensor of `model` (on every rank). `options.allow_norm_rounding` accepts a GDN
        norm whose HF form `g + 1` rounds (a norm trained in bf16 can hold such values). It holds
        the whole model: for a large one, stream with `iter_hf`."""
        return dict(self.iter_hf(model, options=options, language_model_only=language_model_only))

    def save_hf(
        self,
        model: Any,
        destination: str | Path,
        *,
        config_dir: str | Path,
        receiver: int = 0,
        max_shard_bytes: int | None = None,
        force: bool = False,
        options: ConvertOptions = ConvertOptions(),
        language_model_only: bool = False,
    ) -> Any:
        """Write `model` (a live, sharded model, as for `iter_hf`) as an HF checkpoint folder:
        shards streamed by the global rank `receiver` as the tensors arrive, the index, and the
        config of the HF folder `config_dir`. Every rank must call it. The folder appears only
        when complete."""
        from qwen35_bridge.formats.safetensors.writer import DEFAULT_MAX_SHARD_BYTES
        from qwen35_bridge.offline import live_to_hf

        prefix = self.prefix_for(_first_chunk(model), language_model_only=language_model_only)
        return live_to_hf(
            self,
            model,
            Path(destination),
            config_dir=Path(config_dir),
            prefix=prefix,
            receiver=receiver,
            max_shard_bytes=max_shard_bytes or DEFAULT_MAX_SHARD_BYTES,
            force=force,
            options=options,
        )

    # -- Vision-language models (set by VL bridges) ------------------------------------------------

    vision_model_args: ClassVar[dict[str, Any] | None] = None
    mrope_section: ClassVar[tuple[int, ...] | None] = None

    def vision_transformer_config(self, **overrides: Any) -> Any:
        """megatron-core's TransformerConfig of the vision layers (VL bridges define it)."""
        raise NotImplementedError(f"{self.model_id} has no vision tower")

    def build_vl_model(self, *, params_dtype: torch.dtype | None = None, **overrides: Any) -> Any:
        """This rank's megatron-core VL model (`qwen35_bridge.megatron.vl.multimodal.VLModel`):
        the vision tower as `vision_model`, and as `language_model` what `build_model` builds, fed
        with the vision tokens and interleaved mRoPE. Arguments as for `build_model`."""
        from qwen35_bridge.megatron.vl.multimodal import assemble, vision_settings

        if self.vision_model_args is None or self.mrope_section is None:
            raise ValueError(f"{self.model_id} is a text-only model: use build_model")
        language_model = self.build_model(params_dtype=params_dtype, **overrides)
        vision_config = self.vision_transformer_config(**vision_settings(language_model.config))
        return assemble(
            language_model,
            vision_config,
            self.vision_model_args,
            mrope_section=self.mrope_section,
            rotary_percent=self.model_args["rotary_percent"],
            rotary_base=self.model_args["rotary_base"],
        )

    def build(self, **kwargs: Any) -> Any:
        """The whole model the bridge's table maps: `build_vl_model` for a VL bridge, else
        `build_model`."""
        return self.build_vl_model(**kwargs) if self.is_vl else self.build_model(**kwargs)


def _first_chunk(model: Any) -> Any:
    """The model itself, or the first of its virtual-pipeline chunks, unwrapped."""
    from qwen35_bridge.megatron.live import model_chunks

    return model_chunks(model)[0]
