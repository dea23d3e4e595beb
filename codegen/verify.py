"""`codegen verify`: run the HF model and the converted megatron-core model on the same tokens and
report how far apart their logits (and MTP logits) are."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from codegen.errors import CodegenError

DEFAULT_TOLERANCE = 1e-4


@dataclass(frozen=True)
class Verdict:
    logits_delta: float
    mtp_deltas: tuple[float, ...]
    tolerance: float

    @property
    def passed(self) -> bool:
        return max((self.logits_delta, *self.mtp_deltas)) <= self.tolerance


def verify(hf_dir: Path, megatron_dir: Path, *, tokens: int = 80, seed: int = 0, tolerance: float = DEFAULT_TOLERANCE, quiet: bool = False) -> Verdict:
    """Both models in fp32 on `tokens` random tokens (longer than GDN's chunk of 64 by default)."""
    os.environ.setdefault("TORCHDYNAMO_DISABLE", "1")
    import torch

    from codegen.conversion import bridge_for_spec
    from codegen.runtime.checkpoint import CheckpointReader
    from codegen.runtime.convert import read_record
    from codegen.runtime.megatron_model import forward_logits
    from codegen.runtime.parallel import destroy_parallel, init_parallel
    from codegen.spec import ModelSpec
    from codegen.testing import hf_model_class, reference_mtp_logits, use_torch_gdn_kernels

    record = read_record(megatron_dir)
    spec = ModelSpec.from_dict(record["spec"])
    if spec.quantization is not None:
        raise CodegenError("verify runs the HF model in fp32: FP8 checkpoints are not supported")
    bridge = bridge_for_spec(spec, record["model_id"], quiet=quiet)
    ids = torch.randint(0, spec.vocab_size, (1, tokens), generator=torch.Generator().manual_seed(seed))

    use_torch_gdn_kernels()
    config = json.loads((Path(hf_dir) / "config.json").read_text())
    hf = hf_model_class(config).from_pretrained(hf_dir, dtype=torch.float32).eval()
    with CheckpointReader(Path(hf_dir)) as reader:
        mtp = {name: reader.get(name).float() for name in reader.names() if name.startswith("mtp.")}
    with torch.no_grad():
        expected = hf(input_ids=ids).logits
        expected_mtp = [reference_mtp_logits(hf, mtp, ids)] if spec.mtp_layers else []

    parallel = init_parallel()
    try:
        model = bridge.build_model(**parallel)
        bridge.load_megatron(model, megatron_dir)
        logits, mtp_logits = forward_logits(model, ids)
    finally:
        destroy_parallel()
    deltas = tuple((got - want).abs().max().item() for got, want in zip(mtp_logits, expected_mtp))
    return Verdict((logits - expected).abs().max().item(), deltas, tolerance)
