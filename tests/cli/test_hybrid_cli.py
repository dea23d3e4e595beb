"""The command line of the HybridModel target: what `convert` refuses for it, in one line with exit
2 and nothing written (docs/reference.md section 12). The conversions themselves are proven in
tests/e2e/test_hybrid.py."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from qwen35_codegen.cli.main import main


def test_retargeting_needs_a_checkpoint_written_by_codegen(tmp_path: Path, capsys) -> None:
    source = tmp_path / "trainer-run"
    source.mkdir()
    assert main(["convert", "gpt-to-hybrid", str(source), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"{source}: no codegen.json" in err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "option",
    [
        ["--experts", "packed"],
        ["--mtp-experts", "per_expert"],
        ["--target", "hybrid"],
        ["--fp8"],
        ["--iteration", "3"],
        ["--accept-norm-rounding"],
        ["--run-layout", "megatron-lm"],
    ],
)
def test_retargeting_refuses_options_that_would_change_the_tensors(
    tmp_path: Path, capsys, option: list[str]
) -> None:
    source = tmp_path / "megatron"
    source.mkdir()
    assert main(["convert", "hybrid-to-gpt", str(source), str(tmp_path / "out"), *option]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"{option[0]}: " in err and "hybrid-to-gpt" in err
    assert not (tmp_path / "out").exists()


def test_a_record_naming_an_unknown_target_is_refused(tmp_path: Path, capsys) -> None:
    source = tmp_path / "megatron"
    source.mkdir()
    record = {"model_id": "m", "spec": {}, "target": "mamba"}
    (source / "codegen.json").write_text(json.dumps(record))
    assert main(["convert", "megatron-to-hf", str(source), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "codegen.json: unknown target 'mamba'; expected one of gpt, hybrid" in err
    assert not (tmp_path / "out").exists()


def test_a_megatron_bridge_run_tree_is_written_for_gpt_only(tmp_path: Path, capsys) -> None:
    args = ["convert", "hf-to-megatron", str(tmp_path / "hf"), str(tmp_path / "out")]
    args += ["--target", "hybrid", "--format", "torch_dist", "--run-layout", "megatron-bridge"]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert (
        "--run-layout megatron-bridge: Megatron-Bridge's run tree is written for GPTModel only"
        in err
    )
    assert not (tmp_path / "out").exists()
