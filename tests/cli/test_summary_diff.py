"""`codegen summary` and `codegen diff`: what a reviewer reads in a pull request.

Expected facts are typed from the catalog configs (Qwen3.5-35B-A3B: hidden 2048, 40 layers, 16
heads, 32 GDN value heads, experts of 512; Qwen3.5-122B-A10B: 3072, 48, 32, 64, 1024; both: 2 KV
heads of 256, 256 experts, top-8, attention every 4th layer), not from the generator's output.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from qwen35_codegen import checkout, pipeline
from qwen35_codegen.cli.main import main
from qwen35_codegen.errors import CodegenError
from qwen35_codegen.registry import index as bridge_index
from qwen35_codegen.review.spec_changes import spec_changes


@pytest.fixture(autouse=True)
def offline(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> str:
    assert main(list(argv)) == 0
    return capsys.readouterr().out


def sections(out: str) -> tuple[list[str], list[str], list[str]]:
    """Spec lines, key-manifest lines, code-diff lines."""
    spec, rest = out.split("## Key manifest\n")
    keys, code = rest.split("## Generated code\n")
    return spec.splitlines(), keys.splitlines(), code.splitlines()


def gdn_layers(n: int) -> str:
    return ",".join(f"{a}-{a + 2}" for a in range(0, n, 4))


def attention_layers(n: int) -> str:
    return ",".join(str(i) for i in range(3, n, 4))


# -- diff ----------------------------------------------------------------------------------------


def test_diff_of_a_re_release_shows_only_its_record(capsys) -> None:
    spec, keys, code = sections(run(capsys, "diff", "Qwen/Qwen3.5-27B", "Qwen/Qwen3.6-27B"))
    assert "- source: catalog:Qwen/Qwen3.5-27B -> catalog:Qwen/Qwen3.6-27B" in spec
    assert any(
        line.startswith("- provenance: catalog, verbatim: the original config.json as ")
        and line.endswith("-> catalog, verbatim: the original config.json")
        for line in spec
    )
    assert any(line.startswith("- architecture and layouts: identical") for line in spec)
    assert [line.split(":")[0] for line in keys if line.startswith("- ")] == ["- HF", "- Megatron"]
    assert all(": identical (" in line for line in keys if line.startswith("- "))
    changed = [
        line[1:] for line in code if line[:1] in "+-" and not line.startswith(("+++", "---"))
    ]
    assert changed and all(
        # the model id, the config's checksum, and the Config paragraph (wrapped over lines)
        re.search(r"Qwen3\.[56]-27B|^# config sha256: |^Config: |^0b077da5e; |^the Hub\.$", line)
        for line in changed
    ), changed
    assert {'MODEL_ID = "Qwen/Qwen3.5-27B"', 'MODEL_ID = "Qwen/Qwen3.6-27B"'} <= set(changed)


def test_diff_of_two_moe_sizes(capsys) -> None:
    out = run(capsys, "diff", "Qwen/Qwen3.5-35B-A3B", "Qwen/Qwen3.5-122B-A10B")
    spec, keys, code = sections(out)
    fields = {line for line in spec if re.match(r"- [a-z_.]+: ", line)} - {
        line
        for line in spec
        if line.startswith(("- source:", "- provenance:", "- config sha256:", "- schedule:"))
    }
    assert fields == {
        "- hidden_size: 2048 -> 3072",
        "- num_layers: 40 -> 48",
        "- attention.num_heads: 16 -> 32",
        "- gdn.num_value_heads: 32 -> 64",
        "- moe.expert_intermediate_size: 512 -> 1024",
        "- moe.shared_expert_intermediate_size: 512 -> 1024",
        "- vision.out_hidden_size: 2048 -> 3072",
    }
    schedule = "40 layers = 10 x (3 x GatedDeltaNet + 1 x gated attention) -> 48 layers = 12 x (3 x GatedDeltaNet + 1 x gated attention)"
    assert f"- schedule: {schedule}" in spec
    assert not [line for line in keys if line.strip().startswith(("added", "removed"))]
    text = "\n".join(keys)
    assert f"index ranges i {gdn_layers(40)} -> i {gdn_layers(48)} in" in text
    assert f"index ranges i {attention_layers(40)} -> i {attention_layers(48)} in" in text
    assert "index ranges i 0-39 -> i 0-47 in" in text
    assert "index ranges i 0-39, e 0-255 -> i 0-47, e 0-255 in 2 families" in text
    for family, old, new in (
        (
            "model.language_model.layers.{i}.mlp.experts.gate_up_proj",
            (256, 2 * 512, 2048),
            (256, 2 * 1024, 3072),
        ),
        (
            "model.language_model.layers.{i}.linear_attn.in_proj_z.weight",
            (32 * 128, 2048),
            (64 * 128, 3072),
        ),
        (
            "model.language_model.layers.{i}.self_attn.q_proj.weight",
            (16 * 2 * 256, 2048),
            (32 * 2 * 256, 3072),
        ),
        (
            "model.language_model.layers.{i}.self_attn.k_proj.weight",
            (2 * 256, 2048),
            (2 * 256, 3072),
        ),
        ("mtp.layers.{i}.mlp.experts.{e}.down_proj.weight", (2048, 512), (3072, 1024)),
        (
            "language_model.decoder.layers.{i}.mlp.experts.linear_fc1.weight{e}",
            (2 * 512, 2048),
            (2 * 1024, 3072),
        ),
        ("model.visual.merger.linear_fc2.weight", (2048, 4608), (3072, 4608)),
    ):
        assert f"  re-shaped {family}: {old} -> {new}" in keys
    assert "model.visual.blocks." not in text, "the vision tower itself is the same"
    assert len(out.split("## Generated code")[0].splitlines()) < 130
    assert "-        hidden_size=2048," in code and "+        hidden_size=3072," in code


def test_diff_of_module_files_reads_their_tables_as_written(
    capsys, tmp_path: Path, monkeypatch
) -> None:
    monkeypatch.chdir(checkout.REPO_ROOT)
    edited = tmp_path / "qwen3_5_27b.py"
    text = Path("qwen35_bridge/generated/qwen3_5_27b.py").read_text(encoding="utf-8")
    edited.write_text(
        re.sub(
            r'    Rename\(\n        "language_model\.decoder\.layers\.\{i\}\.self_attention\.q_layernorm\.weight",\n.*?\n    \),\n',
            "",
            text,
            flags=re.S,
        )
    )
    spec, keys, code = sections(
        run(capsys, "diff", "qwen35_bridge/generated/qwen3_5_27b.py", str(edited))
    )
    assert any(line.startswith("- architecture and layouts: identical") for line in spec)
    removed = [line.strip() for line in keys if line.strip().startswith(("added", "removed"))]
    assert removed == [
        f"removed model.language_model.layers.{{i}}.self_attn.q_norm.weight (i {attention_layers(64)}, 16 tensors, shape (256,))",
        f"removed language_model.decoder.layers.{{i}}.self_attention.q_layernorm.weight (i {attention_layers(64)}, 16 tensors, shape (256,))",
    ]
    assert "  attention_layers: " in keys[keys.index("- parameters:") + 1]


def test_diff_notes_a_file_whose_source_no_longer_gives_its_spec(
    capsys, tmp_path: Path, monkeypatch
) -> None:
    monkeypatch.chdir(checkout.REPO_ROOT)
    old = tmp_path / "qwen3_5_27b.py"
    old.write_text(
        re.sub(
            r'SPEC_SHA256 = "[0-9a-f]{64}"',
            f'SPEC_SHA256 = "{"0" * 64}"',
            Path("qwen35_bridge/generated/qwen3_5_27b.py").read_text(),
        )
    )
    spec, _, _ = sections(run(capsys, "diff", str(old), "qwen35_bridge/generated/qwen3_5_27b.py"))
    assert any(
        line.startswith(
            f"- warning: {old} records spec sha256 000000000000, but its source now gives "
        )
        for line in spec
    ), spec


def _git(repo: Path, *args: str) -> str:
    identity = ["-c", "user.name=test", "-c", "user.email=test@example.com"]
    done = subprocess.run(
        ["git", "-C", str(repo), *identity, *args], capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr
    return done.stdout


def _codegen(repo: Path, *args: str) -> str:
    env = dict(os.environ, PYTHONPATH=str(repo), HF_HUB_OFFLINE="1")
    done = subprocess.run(
        [sys.executable, "-m", "qwen35_codegen", *args],
        cwd=repo,
        env=env,
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_diff_against_a_revision_shows_the_config_fields_a_pull_request_changed(
    tmp_path: Path,
) -> None:
    """A pull request edits a catalog config and regenerates: the old module's source, read today,
    already gives the new spec, so only `REV:PATH` can show which fields the edit changed."""
    repo = tmp_path / "repo"
    skip = shutil.ignore_patterns(".git", ".venv", "__pycache__", "*.egg-info", ".pytest_cache")
    shutil.copytree(checkout.REPO_ROOT, repo, ignore=skip)
    _git(repo, "init", "-q")
    _git(repo, "add", "-A")
    _git(repo, "commit", "-qm", "before")
    config_path = repo / "qwen35_codegen/catalog/Qwen__Qwen3.6-27B.json"
    config = json.loads(config_path.read_text())
    assert config["text_config"]["vocab_size"] == 248320
    config["text_config"]["vocab_size"] = 151936
    config_path.write_text(json.dumps(config, indent=2) + "\n")
    _codegen(repo, "generate", "catalog:Qwen/Qwen3.6-27B")
    _git(repo, "commit", "-qam", "after")

    module = "qwen35_bridge/generated/qwen3_6_27b.py"
    spec, keys, _ = sections(_codegen(repo, "diff", f"HEAD~1:{module}", module))
    assert "- vocab_size: 248320 -> 151936" in spec, spec
    assert not any(line.startswith("- warning:") for line in spec), spec
    reshaped = (
        "  re-shaped model.language_model.embed_tokens.weight: (248320, 5120) -> (151936, 5120)"
    )
    assert reshaped in keys, keys

    # The same module taken out of git by hand cannot know its old source: the diff says so.
    (tmp_path / "old.py").write_text(_git(repo, "show", f"HEAD~1:{module}"))
    spec, _, _ = sections(_codegen(repo, "diff", str(tmp_path / "old.py"), module))
    assert any(line.startswith(f"- warning: {tmp_path / 'old.py'} records spec") for line in spec)
    assert "- vocab_size: 248320 -> 151936" not in spec


def test_diff_names_a_revision_git_does_not_know(capsys) -> None:
    assert (
        main(["diff", "no-such-rev:qwen35_bridge/generated/qwen3_5_27b.py", "Qwen/Qwen3.5-27B"])
        == 2
    )
    assert "git show no-such-rev:qwen35_bridge/generated/qwen3_5_27b.py" in capsys.readouterr().err


def test_diff_of_committed_files_equals_diff_of_references(capsys, monkeypatch) -> None:
    monkeypatch.chdir(checkout.REPO_ROOT)
    by_file = run(
        capsys,
        "diff",
        "qwen35_bridge/generated/qwen3_5_35b_a3b.py",
        "qwen35_bridge/generated/qwen3_5_122b_a10b.py",
    )
    assert by_file == run(capsys, "diff", "Qwen/Qwen3.5-35B-A3B", "Qwen/Qwen3.5-122B-A10B")


def test_diff_of_a_file_that_is_not_a_bridge(capsys, tmp_path: Path) -> None:
    (tmp_path / "x.py").write_text("x = 1\n")
    assert main(["diff", str(tmp_path / "x.py"), "Qwen/Qwen3.5-27B"]) == 2
    assert "x.py: no `# Regenerate:` line" in capsys.readouterr().err


def test_spec_changes_name_layers_and_layouts() -> None:
    _, spec = pipeline.infer(pipeline.Request("catalog:Qwen/Qwen3.5-35B-A3B"))
    kinds = list(spec.layer_types)
    kinds[3], kinds[4] = "gdn", "attention"
    changed = dataclasses.replace(spec, layer_types=tuple(kinds), mtp_experts_layout="packed")
    changes = spec_changes(spec, changed)
    assert changes.fields == []
    assert changes.layers == [
        "layer 3: gated attention -> GatedDeltaNet",
        "layer 4: GatedDeltaNet -> gated attention",
    ]
    assert changes.layouts == ["mtp_experts_layout: per_expert -> packed"]
    assert not spec_changes(spec, spec)


def test_recorded_command_gives_back_the_request() -> None:
    options = {"experts": "per_expert", "mtp_experts": "packed", "name": "my model"}
    request = pipeline.request_of_command(pipeline.command_of("some/dir", options))
    assert (request.ref, request.name) == ("some/dir", "my model")
    assert (request.choices.experts, request.choices.mtp_experts, request.choices.hf_prefix) == (
        "per_expert",
        "packed",
        None,
    )
    with pytest.raises(CodegenError, match="not a command"):
        pipeline.request_of_command("codegen inspect x")


# -- summary -------------------------------------------------------------------------------------


def test_summary_of_a_dense_model(capsys) -> None:
    out = run(capsys, "summary", "Qwen/Qwen3.5-27B")
    assert out.startswith(
        "## Bridge for Qwen/Qwen3.5-27B: `qwen35_bridge/generated/qwen3_5_27b.py`\n"
    )
    assert "**Config:** catalog, verbatim: the original config.json as ai-dynamo" in out
    assert (
        "64 layers = 16 x (3 x GatedDeltaNet + 1 x gated attention), dense SwiGLU MLP 17408" in out
    )
    assert "Hidden size 5120, vocabulary 248320. Attention: 24 query heads" in out
    assert f"| GatedDeltaNet + dense MLP | 48 | {gdn_layers(64)} |" in out
    assert f"| gated attention + dense MLP | 16 | {attention_layers(64)} |" in out
    assert "| MTP: gated attention + dense MLP | 1 | 0 |" in out
    assert "| vision blocks (1152 wide) | 27 | 0-26 |" in out
    assert (
        "| routed experts (decoder) | none (dense) |" in out and "| output layer | untied |" in out
    )
    assert (
        f"| embedding | {248320 * 5120:,} |" in out
        and f"| output layer | {248320 * 5120:,} |" in out
    )
    assert (
        "routed experts |" not in out.split("| Component |")[1]
    ), "no expert parameters in a dense model"
    assert out.rstrip().endswith("**Regenerate:** `codegen generate catalog:Qwen/Qwen3.5-27B`")


def test_summary_of_a_moe_model(capsys) -> None:
    out = run(capsys, "summary", "catalog:Qwen/Qwen3.5-35B-A3B")
    assert "**Config:** catalog, verbatim:" in out
    assert "MoE (every layer): 256 experts, top-8, expert 512, gated shared expert 512" in out
    assert f"| GatedDeltaNet + MoE | 30 | {gdn_layers(40)} |" in out
    assert f"| gated attention + MoE | 10 | {attention_layers(40)} |" in out
    assert "| MTP: gated attention + MoE | 1 | 0 |" in out
    assert "| routed experts (decoder) | packed |" in out and "| MTP experts | per_expert |" in out
    assert "| HF prefix | `model.language_model.` |" in out and "| quantization | none |" in out
    assert f"| routed experts | {40 * 256 * 3 * 512 * 2048:,} |" in out
    assert "- mtp_experts_layout per_expert: stated by the catalog" in out
    assert out.rstrip().endswith("**Regenerate:** `codegen generate catalog:Qwen/Qwen3.5-35B-A3B`")


def test_summary_of_an_fp8_model_says_what_the_manifest_leaves_out(capsys) -> None:
    out = run(capsys, "summary", "catalog:Qwen/Qwen3-Next-80B-A3B-Instruct-FP8")
    assert "| quantization | FP8 e4m3 in 128x128 blocks;" in out and "text only" in out


def test_summary_refuses_what_generate_refuses(capsys, tmp_path: Path) -> None:
    shutil.copy(
        Path(checkout.REPO_ROOT / "qwen35_codegen/catalog/Qwen__Qwen3.5-35B-A3B.json"),
        tmp_path / "config.json",
    )
    assert main(["summary", str(tmp_path)]) == 2
    assert "pass --mtp-experts" in capsys.readouterr().err


def test_committed_summaries_are_what_summary_prints(capsys) -> None:
    """Every committed bridge has its summary beside it, the same as `codegen summary` prints."""
    from qwen35_codegen import catalog

    entries = bridge_index.read(checkout.GENERATED)
    assert set(bridge_index.by_model(entries)) == set(catalog.model_ids())
    for entry in entries.values():
        options = [w for k, v in entry.options.items() for w in (f"--{k.replace('_', '-')}", v)]
        assert main(["summary", entry.source, *options]) == 0
        committed = (checkout.GENERATED / f"{entry.module}.md").read_text()
        assert capsys.readouterr().out == committed, entry.module
