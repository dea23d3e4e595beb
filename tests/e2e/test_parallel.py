"""Sharded load and sharded export over 2 gloo processes: TP=2, TP=2 with sequence parallel, EP=2,
PP=2 (layer offsets, MTP on the last stage). Logits equal HF's; the export is bit-identical; a
naive contiguous split of GDN in_proj is shown to fail."""

from __future__ import annotations

from functools import partial
from pathlib import Path

import pytest
import torch

from qwen35_bridge.megatron.ranks import run_ranks
from qwen35_codegen import catalog
from qwen35_codegen.registry.lookup import bridge_for_checkpoint
from tests.support import make_checkpoint, reference_mtp_logits
from tests.support.ranks import convert_and_run

TOLERANCE = 1e-4
CASES = {
    "tp2-dense-vl": ("Qwen/Qwen3.6-27B", {}, dict(tp=2)),
    "tp2-sp-moe": (
        "Qwen/Qwen3.5-35B-A3B",
        {"experts_layout": "packed", "mtp_experts_layout": "per_expert"},
        dict(tp=2, sequence_parallel=True),
    ),
    "tp2-qwen3-next": (
        "Qwen/Qwen3-Next-80B-A3B-Instruct",
        {"experts_layout": "per_expert"},
        dict(tp=2),
    ),
    "ep2-moe": (
        "Qwen/Qwen3.5-35B-A3B",
        {"experts_layout": "packed", "mtp_experts_layout": "packed"},
        dict(ep=2),
    ),
    "pp2-dense-text": ("Qwen/Qwen3.6-27B", {"text_only": True}, dict(pp=2)),
    "pp2-tied-moe": (
        "Qwen/Qwen3.5-35B-A3B",
        {"tie": True, "experts_layout": "packed", "mtp_experts_layout": "per_expert"},
        dict(pp=2),
    ),
}


def prepare(
    tmp_path: Path, model_id: str, options: dict
) -> tuple[Path, Path, torch.Tensor, torch.Tensor, torch.Tensor, dict]:
    checkpoint = make_checkpoint(tmp_path / "hf", catalog.entry(model_id).config, seed=5, **options)
    bridges = tmp_path / "bridges"
    _bridge, spec, _ = bridge_for_checkpoint(
        checkpoint.path, bridge_dir=bridges, quiet=True
    )  # generated once, in the parent
    ids = torch.randint(0, spec.vocab_size, (2, 80), generator=torch.Generator().manual_seed(1))
    model = checkpoint.model.eval()
    with torch.no_grad():
        expected, expected_mtp = model(input_ids=ids).logits, reference_mtp_logits(
            model, checkpoint.mtp, ids
        )
    return checkpoint.path, bridges, ids, expected, expected_mtp, checkpoint.state


@pytest.mark.parametrize("case", sorted(CASES))
def test_sharded_load_forward_and_export(case: str, tmp_path: Path) -> None:
    model_id, options, parallel = CASES[case]
    hf_dir, bridges, ids, expected, expected_mtp, state = prepare(tmp_path, model_id, options)
    results = run_ranks(partial(convert_and_run, **parallel), 2, hf_dir, bridges, ids)
    for result in results:
        assert (result.logits - expected).abs().max().item() <= TOLERANCE
        assert (result.mtp_logits[0] - expected_mtp).abs().max().item() <= TOLERANCE
    exported = results[0].exported
    language_model = {k: v for k, v in state.items() if not k.startswith("model.visual.")}
    assert set(exported) == set(language_model)
    for name, tensor in language_model.items():
        assert exported[name].dtype == tensor.dtype and torch.equal(exported[name], tensor), name
    if parallel.get("pp"):
        # Layer offsets: each stage holds its half of the decoder, in order.
        first, second = results[0].layer_numbers, results[1].layer_numbers
        assert first == list(range(len(first))) and second == list(
            range(len(first), len(first) + len(second))
        )
    if parallel.get("ep"):
        assert results[0].local_experts == results[1].local_experts == 2


def test_naive_gdn_in_proj_split_gives_wrong_logits(tmp_path: Path) -> None:
    hf_dir, bridges, ids, expected, _mtp, _state = prepare(tmp_path, "Qwen/Qwen3.6-27B", {})
    results = run_ranks(
        partial(convert_and_run, tp=2, naive_gdn_split=True), 2, hf_dir, bridges, ids
    )
    assert (results[0].logits - expected).abs().max().item() > 0.1
