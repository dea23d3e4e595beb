"""A trainer's checkpoint back to HF: a Megatron-LM run (tracker + iter_0000001, model and
optimizer state saved by megatron-core's own `dist_checkpointing.save` after a real optimizer
step at TP=2 and at EP=2) converts with `--hf-config` to exactly the trained weights, the optimizer state
ignored and never read; a run missing its MTP block fails naming it."""

from __future__ import annotations

import json
from functools import partial
from pathlib import Path

import pytest
import torch

from qwen35_bridge.formats.safetensors.reader import CheckpointReader
from qwen35_bridge.megatron.ranks import run_ranks
from qwen35_codegen import catalog
from qwen35_codegen.cli.main import main
from qwen35_codegen.registry.lookup import bridge_for_checkpoint
from tests.support import make_checkpoint
from tests.support.training import train_and_save_on_rank

MOE = "Qwen/Qwen3.5-35B-A3B"


@pytest.fixture(scope="module")
def hf(tmp_path_factory) -> tuple[Path, Path, dict]:
    root = tmp_path_factory.mktemp("training")
    checkpoint = make_checkpoint(
        root / "hf",
        catalog.entry(MOE).config,
        seed=4,
        text_only=True,
        experts_layout="packed",
        mtp_experts_layout="per_expert",
    )
    bridge_for_checkpoint(checkpoint.path, bridge_dir=root / "bridges", quiet=True)
    return checkpoint.path, root / "bridges", checkpoint.state


def _export(run: Path, out: Path, hf_dir: Path, bridges: Path, *extra: str) -> int:
    args = ["convert", "megatron-to-hf", str(run), str(out), "--hf-config", str(hf_dir)]
    return main([*args, "--bridge-dir", str(bridges), *extra])


@pytest.mark.parametrize("parallel", [dict(tp=2), dict(ep=2)], ids=["tp2", "ep2"])
def test_a_training_run_exports_the_trained_weights(
    hf, parallel: dict, tmp_path: Path, capsys
) -> None:
    hf_dir, bridges, source = hf
    run = tmp_path / "run"
    trained = run_ranks(partial(train_and_save_on_rank, **parallel), 2, hf_dir, bridges, run)[0]
    assert (run / "latest_checkpointed_iteration.txt").read_text().strip() == "1"
    # Trained GDN norms hold values whose g + 1 rounds: refused unless accepted, by name.
    assert _export(run, tmp_path / "strict", hf_dir, bridges, "--quiet") == 2
    assert "out_norm.weight: g + 1 is not exact" in capsys.readouterr().err
    assert _export(run, tmp_path / "out", hf_dir, bridges, "--accept-norm-rounding") == 0
    err = capsys.readouterr().err
    assert "ignored" in err and "optimizer" in err, err
    with CheckpointReader(tmp_path / "out") as exported:
        assert exported.names() == set(source)
        changed = 0
        for name, weights in trained.items():
            tensor = exported.get(name)
            assert torch.equal(tensor, torch.from_numpy(weights)), name
            changed += not torch.equal(tensor, source[name])
    assert changed > len(source) // 2, "the step changed the weights, and the export has them"
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config == json.loads((hf_dir / "config.json").read_text())
    # The iteration folder itself converts the same; a run without --hf-config is refused.
    again = _export(
        run / "iter_0000001",
        tmp_path / "again",
        hf_dir,
        bridges,
        "--quiet",
        "--accept-norm-rounding",
    )
    assert again == 0
    code = main(["convert", "megatron-to-hf", str(run), str(tmp_path / "no"), "--quiet"])
    assert code == 2 and "--hf-config" in capsys.readouterr().err
    assert not (tmp_path / "no").exists()


def test_a_run_without_its_mtp_block_fails_naming_it(hf, tmp_path: Path, capsys) -> None:
    hf_dir, bridges, _ = hf
    run = tmp_path / "run"
    run_ranks(partial(train_and_save_on_rank, tp=2, drop="mtp."), 2, hf_dir, bridges, run)
    assert _export(run, tmp_path / "out", hf_dir, bridges, "--quiet", "--accept-norm-rounding") == 2
    err = capsys.readouterr().err
    assert "mtp.layers.0" in err and "missing" in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "out").exists()
