"""The project as a user installs it: a wheel built from the checkout, installed into a fresh
virtual environment, runs `generate`, `convert` and `verify` from a folder outside the checkout.

This is what catches a template, catalog entry or committed bridge left out of the package data,
and any import of a module that only exists in the source tree (such as `tests.support`).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
from dataclasses import dataclass
from pathlib import Path

import pytest
from safetensors.torch import load_file

from qwen35_codegen import catalog, checkout
from tests.support import make_checkpoint

SOURCE_IGNORED = shutil.ignore_patterns(
    ".git", ".venv", "__pycache__", "*.egg-info", ".pytest_cache", "build", "dist"
)


@dataclass(frozen=True)
class Installed:
    venv: Path
    workdir: Path  # outside the checkout and outside the venv
    env: dict[str, str]

    def run(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [str(self.venv / "bin" / args[0]), *args[1:]],
            cwd=self.workdir,
            env=self.env,
            capture_output=True,
            text=True,
        )


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Installed:
    root = tmp_path_factory.mktemp("wheel")
    source = root / "source"
    shutil.copytree(checkout.REPO_ROOT, source, ignore=SOURCE_IGNORED)
    build = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index"]
        + ["-w", str(root / "dist"), str(source)],
        capture_output=True,
        text=True,
    )
    assert build.returncode == 0, build.stdout[-2000:] + build.stderr[-2000:]
    (wheel,) = (root / "dist").glob("qwen35_bridge_codegen-*.whl")

    venv = root / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    # The dependencies (torch, megatron-core, ...) come from this environment's site-packages,
    # added as a plain path: its .pth files, among them this checkout's editable install, are not
    # processed, so the project itself can only come from the wheel.
    fresh_site = Path(
        sysconfig.get_path("purelib", vars={"base": str(venv), "platbase": str(venv)})
    )
    (fresh_site / "project_dependencies.pth").write_text(sysconfig.get_path("purelib") + "\n")
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env.update(XDG_CACHE_HOME=str(root / "cache"), HF_HUB_OFFLINE="1")
    install = subprocess.run(
        [str(venv / "bin" / "python"), "-m", "pip", "install", "--no-deps", "--no-index"]
        + ["--ignore-installed", "--quiet", str(wheel)],
        capture_output=True,
        text=True,
        env=env,
    )
    assert install.returncode == 0, install.stderr[-2000:]
    workdir = root / "work"
    workdir.mkdir()
    return Installed(venv, workdir, env)


def test_both_packages_come_from_the_wheel(installed: Installed) -> None:
    done = installed.run(
        "python",
        "-c",
        "import qwen35_bridge, qwen35_codegen; print(qwen35_bridge.__file__); "
        "print(qwen35_codegen.__file__)",
    )
    assert done.returncode == 0, done.stderr
    for line in done.stdout.split():
        assert Path(line).is_relative_to(installed.venv), line


def test_generate_from_the_wheel_gives_the_committed_bytes(installed: Installed) -> None:
    done = installed.run("codegen", "generate", "Qwen/Qwen3.5-27B", "--out", "out")
    assert done.returncode == 0, done.stderr
    for name in ("qwen3_5_27b.py", "qwen3_5_27b.manifest.json", "qwen3_5_27b.md"):
        written = (installed.workdir / "out" / name).read_bytes()
        assert written == (checkout.GENERATED / name).read_bytes(), name


def test_generate_without_out_refuses_to_write_into_site_packages(installed: Installed) -> None:
    done = installed.run("codegen", "generate", "Qwen/Qwen3.5-27B")
    assert done.returncode == 2
    assert "--out is required" in done.stderr and len(done.stderr.strip().splitlines()) == 1


def test_convert_and_verify_from_the_wheel(installed: Installed) -> None:
    hf = installed.workdir / "hf"
    checkpoint = make_checkpoint(
        hf, catalog.entry("Qwen/Qwen3.5-0.8B").config, seed=3, text_only=True
    )
    megatron, back = installed.workdir / "megatron", installed.workdir / "back"
    done = installed.run("codegen", "convert", "hf-to-megatron", "hf", "megatron", "--quiet")
    assert done.returncode == 0, done.stderr
    done = installed.run("codegen", "verify", "hf", "megatron")
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.rstrip().splitlines()[-1].startswith("PASS")
    done = installed.run("codegen", "convert", "megatron-to-hf", "megatron", "back", "--quiet")
    assert done.returncode == 0, done.stderr
    exported: dict = {}
    for shard in sorted(back.glob("*.safetensors")):
        exported |= load_file(shard)
    assert exported.keys() == checkpoint.state.keys()
    for name, tensor in checkpoint.state.items():
        assert exported[name].equal(tensor), name
    assert (megatron / "codegen.json").is_file()
