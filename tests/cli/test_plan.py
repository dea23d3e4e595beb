"""`convert --plan` at full size, from configs alone: Qwen3.8-2.4T-A95B (one layer's packed
gate_up_proj alone is 32 GiB) and Qwen3.5-397B-A17B as torch_dist (its layout derived on the meta
device). Nothing is read but the config, nothing is written, and the plan follows the
conversion's own rules: every byte in one worker's share, shards within the limit, no group held
whole beyond the memory budget."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from qwen35_bridge.generated import load_bridge
from qwen35_bridge.planning import plan_conversion
from qwen35_codegen import catalog
from qwen35_codegen.cli.main import main

BIG = "Qwen/Qwen3.8-2.4T-A95B"
GB = 1000**3


@pytest.mark.parametrize("workers", [1, 8, 64])
def test_the_plan_of_a_2_4t_model_holds_no_group_whole(workers: int) -> None:
    config = catalog.entry(BIG).config
    h, experts, inner = (
        config["hidden_size"],
        config["num_experts"],
        config["moe_intermediate_size"],
    )
    packed = experts * 2 * inner * h * 2  # bf16 gate_up_proj of one layer, from the config
    assert packed >= 32 * 1024**3
    bridge = load_bridge(BIG)()
    plan = plan_conversion(
        bridge.groups,
        lambda _name: torch.bfloat16,
        source_side="hf",
        target_side="megatron",
        output_format="safetensors",
        max_shard_bytes=5 * GB,
        budget=2 * GB,
        workers=workers,
    )
    every = sum(math.prod(s) * 2 for s in bridge.hf_shapes.values())
    assert plan.bytes == every and plan.bytes > 4 * 1024**4  # about 4.4 TiB
    assert sum(w.bytes for w in plan.workers) == plan.bytes
    assert sum(w.tensors for w in plan.workers) == plan.tensors == len(bridge.megatron_shapes)
    largest_group = max(sum(math.prod(s) * 2 for s in g.hf.values()) for g in bridge.groups)
    assert largest_group >= packed
    for w in plan.workers:  # equal shares, within one group
        assert abs(w.bytes - plan.bytes / workers) <= largest_group
    assert plan.held_bytes <= 2 * GB and plan.parts >= config["num_hidden_layers"]
    names = [f for w in plan.workers for f in w.files]
    assert len(names) == len(set(names)) == len(plan.files) - 1  # and the index
    assert all(n.endswith(f"-of-{len(names):05d}.safetensors") for n in names)


def test_convert_plan_from_a_config_alone_writes_nothing(tmp_path: Path, capsys) -> None:
    out = tmp_path / "never"
    args = ["convert", "hf-to-megatron", "catalog:Qwen/Qwen3.5-397B-A17B", str(out), "--plan"]
    assert main([*args, "--format", "torch_dist", "--workers", "4"]) == 0
    text = capsys.readouterr().out
    assert "a config alone: every tensor bfloat16" in text
    shapes = load_bridge("Qwen/Qwen3.5-397B-A17B")().hf_shapes.values()
    total = sum(math.prod(s) * 2 for s in shapes)  # bf16, about 800 GB
    assert f"{total / GB:.2f} GB written by 4 workers" in text
    for rank in range(4):
        assert f"release/__{rank}_0.distcp" in text
    # the most held: one part of a layer's packed gate_up_proj, read and converted; parts are
    # as even as whole experts allow, each reading at most half of the 2 GB budget
    config = catalog.entry("Qwen/Qwen3.5-397B-A17B").config["text_config"]
    expert = 2 * config["moe_intermediate_size"] * config["hidden_size"] * 2
    parts = math.ceil(config["num_experts"] / (GB // expert))
    part = math.ceil(config["num_experts"] / parts) * expert
    assert 2 * part <= 2 * GB
    assert f"held in memory at once: at most {2 * part / GB:.2f} GB" in text
    assert not out.exists() and not list(tmp_path.iterdir())
    code = main(["convert", "hf-to-megatron", f"catalog:{BIG}", str(out), "--plan", "--quiet"])
    assert code == 2 and "--mtp-experts" in capsys.readouterr().err
