"""`codegen verify`: run the HF model and the converted megatron-core model on the same prompt and
report how far apart their logits (and MTP logits) are. A vision-language model's prompt holds a
small synthetic image, so the vision tower and the multimodal rotary positions are checked too."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from qwen35_bridge.paths import CONFIG_NAME
from qwen35_codegen.errors import CodegenError

if TYPE_CHECKING:
    import torch

    from qwen35_bridge.megatron.vl.multimodal import MultimodalInputs
    from qwen35_codegen.spec import ModelSpec

DEFAULT_TOLERANCE = 1e-4
#: The image in a VL prompt, in merged vision tokens: (temporal patches, rows, columns).
IMAGE_TOKENS_THW = (1, 2, 3)


@dataclass(frozen=True)
class Verdict:
    logits_delta: float
    mtp_deltas: tuple[float, ...]
    tolerance: float

    @property
    def passed(self) -> bool:
        return max((self.logits_delta, *self.mtp_deltas)) <= self.tolerance


def verify(
    hf_dir: Path,
    megatron_dir: Path,
    *,
    tokens: int = 80,
    seed: int = 0,
    tolerance: float = DEFAULT_TOLERANCE,
    iteration: int | None = None,
    target: str | None = None,
    quiet: bool = False,
) -> Verdict:
    """Both models in fp32 on a prompt of `tokens` tokens (longer than GDN's chunk of 64 by
    default): random text, and for a VL model one synthetic image within it. Both checkpoints are
    checked against the bridge before either model is built. The Megatron side is one `codegen
    convert` wrote (its record names the model class, GPTModel or HybridModel), or a trainer's
    checkpoint of the HF folder's model (`iteration` picks one, `target` its model class)."""
    os.environ.setdefault("TORCHDYNAMO_DISABLE", "1")
    import torch

    from qwen35_bridge.formats.safetensors.reader import CheckpointReader
    from qwen35_bridge.megatron.gpt import forward_logits
    from qwen35_bridge.megatron.parallel import destroy_parallel, init_parallel
    from qwen35_bridge.offline import check_source, megatron_reader, record_root
    from qwen35_bridge.reference.hf_kernels import use_torch_gdn_kernels
    from qwen35_bridge.reference.hf_models import hf_model_class
    from qwen35_codegen.cli.convert import bridge_for_model
    from qwen35_codegen.registry.lookup import bridge_for_spec, recorded_spec

    hf_dir, megatron_dir = Path(hf_dir), Path(megatron_dir)
    if tokens < 1:
        raise CodegenError(f"--tokens {tokens}: a prompt needs at least one token")
    if not (hf_dir / CONFIG_NAME).is_file():
        raise CodegenError(f"{hf_dir}: no config.json; not an HF checkpoint folder")
    root = record_root(megatron_dir)
    if root is not None:
        if iteration is not None:
            raise CodegenError(f"--iteration: {megatron_dir} was written by codegen convert")
        record, spec = recorded_spec(root)
        if spec.quantization is not None:
            raise CodegenError(
                "verify runs the HF model in fp32: FP8 checkpoints are not supported"
            )
        if target is not None and target != record.target:
            raise CodegenError(
                f"--target {target}: {megatron_dir} holds {record.target} tensors, as its record says"
            )
        bridge = bridge_for_spec(spec, record.model_id, quiet=quiet, target=record.target)
    else:  # a trainer's checkpoint of the HF folder's model
        bridge, spec, _source = bridge_for_model(
            megatron_dir, str(hf_dir), quiet=quiet, target=target or "gpt"
        )
    with CheckpointReader(hf_dir) as reader:
        check_source(reader, bridge.hf_shapes, "HF")
        mtp = {name: reader.get(name).float() for name in reader.names() if name.startswith("mtp.")}
    with megatron_reader(bridge, megatron_dir, iteration) as reader:
        check_source(reader, bridge.megatron_shapes, "Megatron")

    try:
        config = json.loads((hf_dir / CONFIG_NAME).read_bytes())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CodegenError(f"{hf_dir / 'config.json'}: not valid JSON ({e})") from None
    if spec.is_vl:
        prompt: MultimodalInputs | torch.Tensor = _vl_prompt(
            config, spec.vision.spatial_merge_size, tokens=tokens, seed=seed
        )
    else:
        prompt = torch.randint(
            0, spec.vocab_size, (1, tokens), generator=torch.Generator().manual_seed(seed)
        )
    use_torch_gdn_kernels()
    with _transformers_quiet():
        expected, expected_mtp = _hf_logits(hf_model_class(config), hf_dir, mtp, prompt, spec)
    if spec.is_vl:
        from qwen35_bridge.megatron.vl.multimodal import vl_forward_logits

        build, forward = bridge.build_vl_model, vl_forward_logits
    else:
        build, forward = bridge.build_model, forward_logits

    parallel = init_parallel()
    try:
        model = build(**parallel)
        bridge.load_megatron(model, megatron_dir, iteration=iteration)
        logits, mtp_logits = forward(model, prompt)
    finally:
        destroy_parallel()
    deltas = tuple((got - want).abs().max().item() for got, want in zip(mtp_logits, expected_mtp))
    return Verdict((logits - expected).abs().max().item(), deltas, tolerance)


def _hf_logits(
    model_class: Any,
    hf_dir: Path,
    mtp: dict[str, torch.Tensor],
    prompt: MultimodalInputs | torch.Tensor,
    spec: ModelSpec,
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """HF's logits on the prompt, and the MTP layer's, computed from the HF checkpoint's tensors."""
    import torch

    from qwen35_bridge.reference.mtp import reference_mtp_logits

    hf = model_class.from_pretrained(hf_dir, dtype=torch.float32).eval()
    if spec.is_vl:
        from qwen35_bridge.reference.vl import hf_vl_logits, reference_vl_mtp_logits

        mtp_logits = [reference_vl_mtp_logits(hf, mtp, prompt)] if spec.mtp_layers else []
        return hf_vl_logits(hf, prompt), mtp_logits
    with torch.no_grad():
        mtp_logits = [reference_mtp_logits(hf, mtp, prompt)] if spec.mtp_layers else []
        return hf(input_ids=prompt).logits, mtp_logits


def _vl_prompt(config: dict[str, Any], merge: int, *, tokens: int, seed: int) -> MultimodalInputs:
    """`tokens` tokens: random text around one synthetic image of IMAGE_TOKENS_THW vision tokens."""
    from qwen35_bridge.reference.vl import synthetic_prompt

    t, rows, cols = IMAGE_TOKENS_THW
    image_tokens = t * rows * cols + 2  # and its start and end markers
    if tokens <= image_tokens:
        raise CodegenError(
            f"--tokens {tokens}: a VL prompt needs more than {image_tokens} tokens (the image and its markers)"
        )
    return synthetic_prompt(
        config, [(t, rows * merge, cols * merge)], text_tokens=tokens - image_tokens, seed=seed
    )


@contextmanager
def _transformers_quiet() -> Iterator[None]:
    """transformers' loading bar and notices (such as the one a standalone MTP expert module gives)
    say nothing about the comparison; errors still show."""
    from transformers.utils import logging as hf_logging

    verbosity, bar = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if bar:
            hf_logging.enable_progress_bar()
