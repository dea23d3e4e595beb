"""`codegen generate` and `codegen check`: sources, reproducible bytes, no torch, drift detection."""

from __future__ import annotations

import hashlib
import http.server
import json
import os
import shutil
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from qwen35_codegen import catalog, checkout, pipeline
from qwen35_codegen.cli.main import main
from qwen35_codegen.registry import index as bridge_index
from qwen35_codegen.review.manifest import load_bridge

REPO = checkout.REPO_ROOT
CONFIG_27B = catalog.entry("Qwen/Qwen3.6-27B").config


def run_codegen(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    full_env = {**os.environ, **(env or {})}
    return subprocess.run(
        [sys.executable, *args], capture_output=True, text=True, env=full_env, cwd=REPO
    )


def test_generate_is_reproducible_and_never_imports_torch(tmp_path: Path) -> None:
    outputs = []
    for attempt in range(2):
        out = tmp_path / f"out{attempt}"
        result = run_codegen(
            "-X",
            "importtime",
            "-m",
            "qwen35_codegen",
            "generate",
            "Qwen/Qwen3.5-27B",
            "--out",
            str(out),
            env={"HF_HUB_OFFLINE": "1"},
        )
        assert result.returncode == 0, result.stderr
        imported = {
            line.split("|")[-1].strip()
            for line in result.stderr.splitlines()
            if line.startswith("import time:")
        }
        assert not {m for m in imported if m.split(".")[0] in {"torch", "megatron", "transformers"}}
        outputs.append((out / "qwen3_5_27b.py").read_bytes())
        assert not (out / "index.json").exists(), "--out elsewhere writes the module only"
    assert outputs[0] == outputs[1]
    assert outputs[0] == (checkout.GENERATED / "qwen3_5_27b.py").read_bytes()


def test_committed_bridges_match_the_generator() -> None:
    assert pipeline.check() == []


def test_every_catalog_model_has_a_committed_bridge() -> None:
    entries = bridge_index.read(checkout.GENERATED)
    assert set(bridge_index.by_model(entries)) == set(catalog.model_ids())
    assert set(bridge_index.by_model(entries, "hybrid")) <= set(catalog.model_ids())
    assert all(e.source == f"catalog:{e.model_id}" for e in entries.values())


@pytest.fixture
def generated_copy(tmp_path: Path) -> Path:
    folder = tmp_path / "generated"
    shutil.copytree(checkout.GENERATED, folder, ignore=shutil.ignore_patterns("__pycache__"))
    return folder


def test_check_names_a_drifted_file_and_its_fix(generated_copy: Path) -> None:
    module = generated_copy / "qwen3_5_27b.py"
    module.write_text(module.read_text().replace("hidden_size=5120", "hidden_size=5121"))
    (drift,) = pipeline.check(generated_copy)
    assert drift.path == "qwen35_bridge/generated/qwen3_5_27b.py" and "differs" in drift.problem
    assert drift.fix == "codegen generate catalog:Qwen/Qwen3.5-27B"


def test_check_finds_missing_and_extra_files(generated_copy: Path) -> None:
    (generated_copy / "qwen3_5_4b.py").unlink()
    (generated_copy / "hand_written.py").write_text("x = 1\n")
    problems = {d.path: d.problem for d in pipeline.check(generated_copy)}
    assert problems == {
        "qwen35_bridge/generated/qwen3_5_4b.py": "missing",
        "qwen35_bridge/generated/hand_written.py": "not produced by any index entry",
    }


def test_check_names_sources_outside_the_repository(generated_copy: Path, tmp_path: Path) -> None:
    entries = bridge_index.read(generated_copy)
    entries["local_model"] = bridge_index.Entry(
        "local/model", "local_model", str(tmp_path / "elsewhere"), "0" * 64
    )
    for name, text in bridge_index.render(entries).items():
        (generated_copy / name).write_text(text)
    problems = [d for d in pipeline.check(generated_copy) if d.path == "local/model"]
    assert problems and "neither a catalog id nor a file in the repository" in problems[0].problem


def test_check_cli_reports_and_fails(generated_copy: Path, monkeypatch, capsys) -> None:
    monkeypatch.setattr(checkout, "GENERATED", generated_copy)
    assert main(["check"]) == 0
    (generated_copy / "qwen3_5_4b.py").write_text("# edited by hand\n")
    assert main(["check"]) == 1
    out = capsys.readouterr().out
    assert (
        "qwen35_bridge/generated/qwen3_5_4b.py: differs" in out
        and "fix: codegen generate catalog:Qwen/Qwen3.5-4B" in out
    )


def test_generate_into_the_committed_folder_updates_the_index(
    generated_copy: Path, monkeypatch, tmp_path: Path
) -> None:
    monkeypatch.setattr(checkout, "GENERATED", generated_copy)
    (generated_copy / "qwen3_5_9b.py").unlink()
    index_before = (generated_copy / "index.json").read_text()
    assert main(["generate", "catalog:Qwen/Qwen3.5-9B"]) == 0
    assert (generated_copy / "qwen3_5_9b.py").read_bytes() == (
        checkout.GENERATED / "qwen3_5_9b.py"
    ).read_bytes()
    assert (generated_copy / "index.json").read_text() == index_before
    assert pipeline.check(generated_copy) == []


def test_generate_into_the_committed_folder_says_when_check_cannot_regenerate(
    generated_copy: Path, monkeypatch, tmp_path: Path, capsys
) -> None:
    monkeypatch.setattr(checkout, "GENERATED", generated_copy)
    assert main(["generate", "catalog:Qwen/Qwen3.5-9B"]) == 0
    assert "note:" not in capsys.readouterr().err
    (tmp_path / "config.json").write_text(json.dumps(CONFIG_27B, indent=4))
    assert main(["generate", str(tmp_path), "--name", "elsewhere_27b"]) == 0
    err = capsys.readouterr().err
    assert f"note: the source {tmp_path.resolve()}" in err and "catalog:ID" in err
    problems = [d.problem for d in pipeline.check(generated_copy)]
    assert any("neither a catalog id nor a file in the repository" in p for p in problems), problems


# -- Sources -------------------------------------------------------------------------------------


def test_local_directory_and_config_file(tmp_path: Path, capsys) -> None:
    (tmp_path / "config.json").write_text(json.dumps(CONFIG_27B, indent=4))
    for ref in (tmp_path, tmp_path / "config.json"):
        assert main(["inspect", str(ref)]) == 0
        spec = json.loads(capsys.readouterr().out)
        assert spec["source"] == str(ref.resolve()) and spec["num_layers"] == 64


def test_index_option_overrides(tmp_path: Path, capsys) -> None:
    moe = catalog.entry("Qwen/Qwen3.5-35B-A3B").config
    (tmp_path / "config.json").write_text(json.dumps(moe))
    index = tmp_path / "elsewhere.json"
    keys = [
        "model.language_model.embed_tokens.weight",
        "lm_head.weight",
        "model.language_model.layers.0.mlp.experts.0.gate_proj.weight",
        "mtp.layers.0.mlp.experts.gate_up_proj",
    ]
    index.write_text(json.dumps({"weight_map": {k: "a.safetensors" for k in keys}}))
    assert main(["inspect", str(tmp_path), "--index", str(index)]) == 0
    spec = json.loads(capsys.readouterr().out)
    assert (spec["experts_layout"], spec["mtp_experts_layout"]) == ("per_expert", "packed")


def make_hf_cache(cache: Path, repo_id: str, files: dict[str, bytes]) -> None:
    """The on-disk layout of huggingface_hub's cache: blobs, a snapshot, and refs/main."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    commit = "0123456789abcdef0123456789abcdef01234567"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    for name, data in files.items():
        blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
        blob.parent.mkdir(parents=True, exist_ok=True)
        blob.write_bytes(data)
        link = repo / "snapshots" / commit / name
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))


def test_hub_id_from_the_local_hf_cache(tmp_path: Path) -> None:
    config = json.loads(json.dumps(CONFIG_27B))
    config["text_config"]["num_hidden_layers"] = 8
    config["text_config"]["layer_types"] = config["text_config"]["layer_types"][:8]
    make_hf_cache(
        tmp_path / "hub", "someone/cached-model", {"config.json": json.dumps(config).encode()}
    )
    for env in (
        {"HF_HUB_CACHE": str(tmp_path / "hub")},
        {"HF_HOME": str(tmp_path), "HF_HUB_CACHE": ""},
    ):
        env = {k: v for k, v in env.items()} | {"HF_HUB_OFFLINE": "1"}
        if not env["HF_HUB_CACHE"]:
            del env["HF_HUB_CACHE"]
        result = run_codegen("-m", "qwen35_codegen", "inspect", "someone/cached-model", env=env)
        assert result.returncode == 0, result.stderr
        spec = json.loads(result.stdout)
        assert spec["provenance"] == "the local HF cache" and spec["num_layers"] == 8


class FakeHub(http.server.BaseHTTPRequestHandler):
    """Just enough of the hub's file API for huggingface_hub's hf_hub_download."""

    files: dict[str, bytes] = {}
    commit = "fedcba9876543210fedcba9876543210fedcba98"

    def _lookup(self) -> bytes | None:
        parts = self.path.split("?")[0].strip("/").split("/")
        if len(parts) >= 5 and parts[2] == "resolve":
            return self.files.get(f"{parts[0]}/{parts[1]}/{'/'.join(parts[4:])}")
        return None

    def _headers(self, data: bytes | None) -> None:
        if data is None:
            self.send_response(404)
            self.send_header("X-Error-Code", "EntryNotFound")
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        self.send_response(200)
        self.send_header("X-Repo-Commit", self.commit)
        self.send_header("ETag", f'"{hashlib.sha256(data).hexdigest()}"')
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()

    def do_HEAD(self) -> None:  # noqa: N802 (http.server's naming)
        self._headers(self._lookup())

    def do_GET(self) -> None:  # noqa: N802
        data = self._lookup()
        self._headers(data)
        if data is not None:
            self.wfile.write(data)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def fake_hub() -> Iterator[str]:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), FakeHub)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def test_hub_id_fetched_from_a_reachable_hub(tmp_path: Path, fake_hub: str) -> None:
    moe = catalog.entry("Qwen/Qwen3.5-35B-A3B").config
    keys = [
        "model.language_model.embed_tokens.weight",
        "lm_head.weight",
        "model.language_model.layers.0.mlp.experts.gate_up_proj",
        "mtp.layers.0.mlp.experts.gate_up_proj",
    ]
    FakeHub.files = {
        "Qwen/Qwen3.6-35B-A3B/config.json": json.dumps(moe).encode(),
        "Qwen/Qwen3.6-35B-A3B/model.safetensors.index.json": json.dumps(
            {"weight_map": {k: "a.safetensors" for k in keys}}
        ).encode(),
    }
    env = {"HF_ENDPOINT": fake_hub, "HF_HUB_CACHE": str(tmp_path / "cache"), "HF_HUB_OFFLINE": "0"}
    result = run_codegen("-m", "qwen35_codegen", "inspect", "Qwen/Qwen3.6-35B-A3B", env=env)
    assert result.returncode == 0, result.stderr
    spec = json.loads(result.stdout)
    assert spec["provenance"] == "the Hugging Face hub"
    assert (
        spec["mtp_experts_layout"] == "packed"
    ), "the index fetched from the hub decides the MTP layout"
    # The hub wins over the catalog for a catalog id too.
    FakeHub.files["Qwen/Qwen3.5-27B/config.json"] = json.dumps(CONFIG_27B).encode()
    result = run_codegen("-m", "qwen35_codegen", "inspect", "Qwen/Qwen3.5-27B", env=env)
    assert json.loads(result.stdout)["provenance"] == "the Hugging Face hub"
    # A repository the hub does not have falls back to the catalog.
    result = run_codegen("-m", "qwen35_codegen", "inspect", "Qwen/Qwen3.5-4B", env=env)
    assert json.loads(result.stdout)["source"] == "catalog:Qwen/Qwen3.5-4B"


# -- Generated modules ---------------------------------------------------------------------------


@pytest.mark.parametrize("model_id", sorted(catalog.model_ids()))
def test_committed_bridges_import_and_expand(model_id: str) -> None:
    from qwen35_bridge.generated import load_bridge

    bridge = load_bridge(model_id)()
    assert bridge.model_id == model_id
    assert bridge.groups  # expands without a name mapped twice
    assert len(bridge.hf_keys) > 0 and len(bridge.megatron_keys) > 0


def test_a_bridge_refuses_another_megatron_core(monkeypatch) -> None:
    from importlib import metadata

    from qwen35_bridge.versions import require_megatron_core

    real = metadata.version
    monkeypatch.setattr(
        metadata, "version", lambda name: "0.20.1" if name == "megatron-core" else real(name)
    )
    with pytest.raises(
        ImportError, match=r"needs megatron-core 0\.19\.\*, but 0\.20\.1 is installed"
    ):
        require_megatron_core("0.19")
    sys.modules.pop("qwen35_bridge.generated.qwen3_5_4b", None)
    with pytest.raises(ImportError, match="0.20.1"):
        __import__("qwen35_bridge.generated.qwen3_5_4b")


@pytest.mark.parametrize(
    "folder",
    ['evil"); open("pwned", "w"); ("', "a\\b'''\"\"\"c", "two\nlines"],
    ids=["quote", "escapes-and-triple-quotes", "newline"],
)
def test_any_folder_name_is_carried_as_text_never_as_code(
    tmp_path: Path, monkeypatch, capsys, folder: str
) -> None:
    """The model id comes from the folder's name; the module must hold it as a string literal."""
    source = tmp_path / folder
    source.mkdir()
    (source / "config.json").write_text(json.dumps(CONFIG_27B))
    out = tmp_path / "out"
    assert main(["generate", str(source), "--out", str(out), "--name", "odd_name"]) == 0
    monkeypatch.chdir(tmp_path)
    bridge = load_bridge((out / "odd_name.py").read_text(), "odd_name.py")
    assert type(bridge).model_id == folder
    assert not (tmp_path / "pwned").exists()


def test_a_folder_name_with_no_letters_asks_for_a_module_name(tmp_path: Path, capsys) -> None:
    source = tmp_path / "___"
    source.mkdir()
    (source / "config.json").write_text(json.dumps(CONFIG_27B))
    assert main(["generate", str(source), "--out", str(tmp_path / "out")]) == 2
    assert "pass --name" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
