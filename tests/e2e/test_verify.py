"""`codegen verify`: passes on a faithful conversion in either Megatron format, fails (exit 1) on a
tampered one, and turns every bad input into one line and exit 2 before building any model."""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import pytest
from safetensors.torch import load_file, save_file

from qwen35_codegen import catalog
from qwen35_codegen.cli.main import main
from tests.support import TinyCheckpoint, make_checkpoint


@dataclass(frozen=True)
class Converted:
    checkpoint: TinyCheckpoint
    safetensors: Path
    torch_dist: Path
    root: Path


@pytest.fixture(scope="module")
def converted(tmp_path_factory) -> Converted:
    root = tmp_path_factory.mktemp("verify")
    checkpoint = make_checkpoint(
        root / "hf",
        catalog.entry("Qwen/Qwen3.5-35B-A3B").config,
        seed=11,
        experts_layout="packed",
        mtp_experts_layout="per_expert",
    )
    cache = ["--bridge-dir", str(root / "bridges"), "--quiet"]
    for fmt in ("safetensors", "torch_dist"):
        args = ["convert", "hf-to-megatron", str(checkpoint.path), str(root / fmt), "--format", fmt]
        assert main(args + cache) == 0
    return Converted(checkpoint, root / "safetensors", root / "torch_dist", root)


@pytest.fixture(autouse=True)
def _bridge_cache(converted: Converted, monkeypatch) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(converted.root / "cache"))


@pytest.mark.parametrize("fmt", ["safetensors", "torch_dist"])
def test_verify_passes_on_a_faithful_conversion(converted: Converted, fmt: str, capsys) -> None:
    assert main(["verify", str(converted.checkpoint.path), str(converted.root / fmt)]) == 0
    out = capsys.readouterr().out
    assert "max |delta| logits:" in out and "max |delta| MTP layer 0 logits:" in out
    assert out.rstrip().splitlines()[-1].startswith("PASS")


def test_verify_catches_a_wrong_weight(converted: Converted, tmp_path: Path, capsys) -> None:
    # The GDN output norm copied without its -1 shift: the classic silent bug (docs/reference.md section 10).
    megatron = tmp_path / "megatron"
    shutil.copytree(converted.safetensors, megatron)
    index = json.loads((megatron / "model.safetensors.index.json").read_text())
    name = "language_model.decoder.layers.0.self_attention.out_norm.weight"
    shard = megatron / index["weight_map"][name]
    tensors = load_file(shard)
    tensors[name] = tensors[name] + 1
    save_file(tensors, shard, metadata={"format": "pt"})
    assert main(["verify", str(converted.checkpoint.path), str(megatron)]) == 1
    assert "FAIL" in capsys.readouterr().out


def _hf_without_weights(converted: Converted, tmp_path: Path) -> Path:
    folder = tmp_path / "config-only"
    folder.mkdir()
    shutil.copyfile(converted.checkpoint.path / "config.json", folder / "config.json")
    return folder


def _another_model(converted: Converted, tmp_path: Path) -> Path:
    config = catalog.entry("Qwen/Qwen3.6-27B").config
    return make_checkpoint(tmp_path / "dense", config, seed=1, text_only=True).path


def _bad_config(converted: Converted, tmp_path: Path) -> Path:
    folder = tmp_path / "bad-config"
    shutil.copytree(converted.checkpoint.path, folder)
    (folder / "config.json").write_text("{not json")
    return folder


@pytest.mark.parametrize(
    ("hf", "megatron", "message"),
    [
        (lambda c, t: t / "nowhere", lambda c: c.safetensors, "no config.json"),
        (_hf_without_weights, lambda c: c.safetensors, "no model.safetensors.index.json"),
        (_another_model, lambda c: c.safetensors, "missing from the HF checkpoint"),
        (_bad_config, lambda c: c.safetensors, "not valid JSON"),
        (
            lambda c, t: c.checkpoint.path,
            lambda c: c.checkpoint.path,
            "neither a Megatron checkpoint nor a Megatron run",
        ),
    ],
    ids=["missing-hf", "hf-without-weights", "another-model", "bad-config", "hf-as-megatron"],
)
def test_verify_bad_inputs_exit_2_with_one_line(
    converted: Converted, tmp_path: Path, capsys, hf, megatron, message: str
) -> None:
    assert main(["verify", str(hf(converted, tmp_path)), str(megatron(converted))]) == 2
    captured = capsys.readouterr()
    *before, error = captured.err.strip().splitlines()
    assert error.startswith("codegen verify: error: ") and message in error
    assert all(line.startswith("bridge: ") for line in before), before  # which bridge, at most
    assert captured.out == ""


@pytest.mark.parametrize("tokens", ["0", "-5"])
def test_verify_needs_a_prompt(converted: Converted, capsys, tokens: str) -> None:
    args = [
        "verify",
        str(converted.checkpoint.path),
        str(converted.safetensors),
        "--tokens",
        tokens,
    ]
    assert main(args) == 2
    assert f"--tokens {tokens}: a prompt needs at least one token" in capsys.readouterr().err
