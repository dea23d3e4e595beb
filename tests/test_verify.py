"""`codegen verify` passes on a faithful conversion and fails (exit 1) on a tampered one."""

from __future__ import annotations

import json
from pathlib import Path

from safetensors.torch import load_file, save_file

from codegen import catalog
from codegen.cli import main
from codegen.testing import make_checkpoint


def test_verify_passes_then_catches_a_wrong_weight(tmp_path: Path, capsys, monkeypatch) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    checkpoint = make_checkpoint(
        tmp_path / "hf",
        catalog.entry("Qwen/Qwen3.5-35B-A3B").config,
        seed=11,
        experts_layout="packed",
        mtp_experts_layout="per_expert",
    )
    megatron = tmp_path / "megatron"
    assert main(["convert", "hf-to-megatron", str(checkpoint.path), str(megatron), "--quiet"]) == 0
    assert main(["verify", str(checkpoint.path), str(megatron)]) == 0
    out = capsys.readouterr().out
    assert (
        "max |delta| logits:" in out and "max |delta| MTP layer 0 logits:" in out and "PASS" in out
    )

    # The GDN output norm copied without its -1 shift: the classic silent bug (FACTS.md section 10).
    index = json.loads((megatron / "model.safetensors.index.json").read_text())
    name = "language_model.decoder.layers.0.self_attention.out_norm.weight"
    shard = megatron / index["weight_map"][name]
    tensors = load_file(shard)
    tensors[name] = tensors[name] + 1
    save_file(tensors, shard, metadata={"format": "pt"})
    assert main(["verify", str(checkpoint.path), str(megatron)]) == 1
    assert "FAIL" in capsys.readouterr().out
