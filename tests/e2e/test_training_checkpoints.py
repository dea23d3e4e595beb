"""A trainer's checkpoint back to HF. Runs made as Megatron-LM makes them, after a real optimizer
step: torch_dist (megatron-core's own `dist_checkpointing.save` of the model's and the optimizer's
sharded state dicts) at TP=2, PP=2 and EP=2, and the legacy `torch` format (one `torch.save` per
model-parallel rank) at TP=2 and at PP=2 x VPP=2. Each converts with `--hf-config` to exactly the
trained weights, whose HF model gives the trained Megatron model's logits; optimizer and RNG state
are ignored and never read; a run missing its MTP block or an expert fails naming it; a
vocabulary padded by the trainer comes back unpadded. The same run in Megatron-Bridge's tree is
checked against its run_config.yaml."""

from __future__ import annotations

import json
import shutil
from functools import partial
from pathlib import Path

import pytest
import torch

from qwen35_bridge.formats.safetensors.reader import CheckpointReader
from qwen35_bridge.megatron.ranks import run_ranks
from qwen35_codegen import catalog
from qwen35_codegen.cli.main import main
from qwen35_codegen.registry.lookup import bridge_for_checkpoint
from tests.support import make_checkpoint, reference_mtp_logits
from tests.support.training import LEGACY_TORCH, resume_on_rank, train_and_save_on_rank

MOE = "Qwen/Qwen3.5-35B-A3B"
TOLERANCE = 1e-4
EXPERT = "decoder.layers.0.mlp.experts.linear_fc1.weight1"  # expert 1 of layer 0's fc1
# megatron-core and PyTorch DCP refuse to save a stacked tensor with one expert's chunk left out,
# so a torch_dist run can only lose a layer's experts whole (a chunk lost afterwards is refused as
# an incomplete tensor: tests/e2e/test_torch_dist.py).
EXPERTS = "decoder.layers.0.mlp.experts.linear_fc1.weight"
#: Files of a tokenizer the HF folder holds (their contents only need to survive the round trip).
TOKENIZER = {"tokenizer.json": '{"model": "tiny"}', "tokenizer_config.json": '{"x": 1}'}

RUNS = {
    "torch_dist-tp2": dict(tp=2, broken={"no-mtp": "mtp."}),
    "torch_dist-pp2": dict(pp=2, broken={"no-expert": EXPERTS}),
    "torch_dist-ep2-padded": dict(ep=2, pad_vocab=128),
    "legacy-tp2": dict(tp=2, checkpoint_format=LEGACY_TORCH, broken={"no-expert": EXPERT}),
    "legacy-pp2-vpp2-padded": dict(
        pp=2, vpp=2, checkpoint_format=LEGACY_TORCH, pad_vocab=128, broken={"no-mtp": "mtp."}
    ),
}


@pytest.fixture(scope="module")
def hf(tmp_path_factory) -> tuple[Path, Path, object]:
    root = tmp_path_factory.mktemp("training")
    checkpoint = make_checkpoint(
        root / "hf",
        catalog.entry(MOE).config,
        seed=4,
        text_only=True,
        experts_layout="packed",
        mtp_experts_layout="per_expert",
    )
    for name, text in TOKENIZER.items():
        (checkpoint.path / name).write_text(text)
    bridge_for_checkpoint(checkpoint.path, bridge_dir=root / "bridges", quiet=True)
    return checkpoint.path, root / "bridges", checkpoint


@pytest.fixture(scope="module")
def trained(hf, tmp_path_factory):
    """Each run trained and saved once per module: (run root, what the ranks returned)."""
    hf_dir, bridges, _ = hf
    done = {}

    def train(name: str):
        if name not in done:
            run = tmp_path_factory.mktemp(name) / "run"
            parallel = RUNS[name]
            world = max(parallel.get(k, 1) for k in ("tp", "pp", "ep"))
            results = run_ranks(
                partial(train_and_save_on_rank, **parallel), world, hf_dir, bridges, run
            )
            done[name] = (run, results)
        return done[name]

    return train


def _export(run: Path, out: Path, hf_dir: Path, bridges: Path, *extra: str) -> int:
    args = ["convert", "megatron-to-hf", str(run), str(out), "--hf-config", str(hf_dir)]
    return main([*args, "--bridge-dir", str(bridges), *extra])


@pytest.mark.parametrize("name", sorted(RUNS))
def test_a_training_run_exports_the_trained_weights(
    hf, trained, name: str, tmp_path: Path, capsys
) -> None:
    hf_dir, bridges, checkpoint = hf
    run, results = trained(name)
    weights = results[0]["weights"]
    assert (run / "latest_checkpointed_iteration.txt").read_text().strip() == "1"
    assert _export(run, tmp_path / "out", hf_dir, bridges, "--accept-norm-rounding") == 0
    err = capsys.readouterr().err
    assert "ignored" in err and "optimizer" in err, err
    assert ("vocabulary padded to 384 rows" in err) == name.endswith("padded"), err
    with CheckpointReader(tmp_path / "out") as exported:
        assert exported.names() == set(checkpoint.state)
        changed = 0
        for hf_name, trained_weight in weights.items():
            tensor = exported.get(hf_name)
            assert torch.equal(tensor, torch.from_numpy(trained_weight)), hf_name
            changed += not torch.equal(tensor, checkpoint.state[hf_name])
    assert (
        changed > len(checkpoint.state) // 2
    ), "the step changed the weights, and the export has them"
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config == json.loads((hf_dir / "config.json").read_text())
    assert {n: (tmp_path / "out" / n).read_text() for n in TOKENIZER} == TOKENIZER

    # The exported HF model computes what the trained Megatron model computes.
    ranked = next(r for r in results if r["logits"] is not None)  # the last stage's
    ids = torch.from_numpy(ranked["eval_ids"])
    *megatron_mtp, megatron_logits = [torch.from_numpy(x) for x in ranked["logits"]]
    model = type(checkpoint.model).from_pretrained(tmp_path / "out", dtype=torch.float32).eval()
    with CheckpointReader(tmp_path / "out") as exported:
        mtp = {n: exported.get(n).clone() for n in exported.names() if n.startswith("mtp.")}
    with torch.no_grad():
        logits = model(input_ids=ids).logits
        mtp_logits = reference_mtp_logits(model, mtp, ids)
    assert (logits - megatron_logits).abs().max().item() <= TOLERANCE
    assert (mtp_logits - megatron_mtp[0]).abs().max().item() <= TOLERANCE

    # Negative controls: the same run saved without its MTP block or an expert.
    capsys.readouterr()
    for label in RUNS[name].get("broken", {}):
        broken = Path(f"{run}-{label}")
        code = _export(
            broken, tmp_path / label, hf_dir, bridges, "--accept-norm-rounding", "--quiet"
        )
        err = capsys.readouterr().err.strip()
        assert code == 2 and len(err.splitlines()) == 1, err
        assert ("mtp.layers.0" if label == "no-mtp" else "decoder.layers.0.mlp.experts") in err
        assert "missing" in err or "chunks hold" in err, err
        assert not (tmp_path / label).exists()


def test_trained_norms_need_accepting_and_the_run_needs_its_model(
    hf, trained, tmp_path: Path, capsys
) -> None:
    hf_dir, bridges, _ = hf
    run, _results = trained("torch_dist-tp2")
    # Trained GDN norms hold values whose g + 1 rounds: refused unless accepted, by name.
    assert _export(run, tmp_path / "strict", hf_dir, bridges, "--quiet") == 2
    assert "out_norm.weight: g + 1 is not exact" in capsys.readouterr().err
    # The iteration folder itself converts too; a run without --hf-config is refused.
    again = [str(run / "iter_0000001"), str(tmp_path / "again"), "--accept-norm-rounding"]
    assert _export(Path(again[0]), Path(again[1]), hf_dir, bridges, *again[2:], "--quiet") == 0
    code = main(["convert", "megatron-to-hf", str(run), str(tmp_path / "no"), "--quiet"])
    assert code == 2 and "--hf-config" in capsys.readouterr().err
    assert not (tmp_path / "no").exists()


def test_verify_runs_a_trainers_checkpoint(hf, trained, tmp_path: Path, capsys) -> None:
    """verify of the exported HF folder against the run it came from (the legacy format, its
    vocabulary padded): the Megatron model is built from the run's own tensors."""
    hf_dir, bridges, _ = hf
    run, _results = trained("legacy-pp2-vpp2-padded")
    assert _export(run, tmp_path / "out", hf_dir, bridges, "--accept-norm-rounding", "--quiet") == 0
    assert main(["verify", str(tmp_path / "out"), str(run)]) == 0
    assert capsys.readouterr().out.rstrip().splitlines()[-1].startswith("PASS")


def _megatron_bridge_model_section(config: dict) -> str:
    """run_config.yaml's model section as Megatron-Bridge writes it for this text model, its
    values typed from the HF config (plus fields this project does not compare)."""
    layers = config["num_hidden_layers"]
    gdn = [int(t == "linear_attention") for t in config["layer_types"]]
    return f"""_target_: megatron.bridge.training.config.ConfigContainer
model:
  _target_: megatron.bridge.models.gpt_provider.GPTModelProvider
  num_layers: {layers}
  hidden_size: {config["hidden_size"]}
  num_attention_heads: {config["num_attention_heads"]}
  num_query_groups: {config["num_key_value_heads"]}
  kv_channels: {config["head_dim"]}
  linear_attention_freq: {gdn}
  num_moe_experts: {config["num_experts"]}
  moe_ffn_hidden_size: {config["moe_intermediate_size"]}
  moe_router_topk: {config["num_experts_per_tok"]}
  mtp_num_layers: 1
  vocab_size: {config["vocab_size"]}
  tensor_model_parallel_size: 2
  pipeline_model_parallel_size: 1
  fp16: false
checkpoint:
  save_optim: true
  save_rng: true
"""


def test_a_megatron_bridge_run_is_checked_against_its_run_config(
    hf, trained, tmp_path: Path, capsys
) -> None:
    """Megatron-Bridge's tree: its latest_train_state.pt names the iteration, and the model section
    of that iteration's run_config.yaml must be the bridge's model."""
    hf_dir, bridges, checkpoint = hf
    source, results = trained("torch_dist-tp2")
    run = tmp_path / "bridge-run"
    shutil.copytree(source, run)
    (run / "latest_checkpointed_iteration.txt").unlink()
    config = json.loads((hf_dir / "config.json").read_text())
    (run / "iter_0000001" / "run_config.yaml").write_text(_megatron_bridge_model_section(config))
    state = {"step": torch.tensor(1), "consumed_train_samples": torch.tensor(32)}
    torch.save(state, run / "iter_0000001" / "train_state.pt")
    torch.save(state, run / "latest_train_state.pt")
    shutil.copytree(run / "iter_0000001", run / "iter_0000000")  # an older iteration, not taken
    (run / "iter_0000000" / "run_config.yaml").write_text("model: {hidden_size: 1}\n")
    assert _export(run, tmp_path / "out", hf_dir, bridges, "--accept-norm-rounding") == 0
    assert "iter_0000001" in capsys.readouterr().err
    with CheckpointReader(tmp_path / "out") as exported:
        weights = results[0]["weights"]
        assert all(torch.equal(exported.get(n), torch.from_numpy(w)) for n, w in weights.items())
    # The same files under another model's run_config: refused, naming the field.
    text = _megatron_bridge_model_section(config | {"hidden_size": 2 * config["hidden_size"]})
    (run / "iter_0000001" / "run_config.yaml").write_text(text)
    code = _export(run, tmp_path / "other", hf_dir, bridges, "--accept-norm-rounding", "--quiet")
    err = capsys.readouterr().err
    assert code == 2 and "model.hidden_size is 128" in err and "has 64" in err, err
    assert not (tmp_path / "other").exists()


@pytest.mark.parametrize("padded_vocab", [None, 384], ids=["model-vocab", "padded-vocab"])
def test_a_converted_run_starts_training_in_megatron_core(
    hf, tmp_path: Path, padded_vocab: int | None
) -> None:
    """hf-to-megatron's run tree, loaded as Megatron-LM loads a checkpoint (tracker, common state,
    `dist_checkpointing.load` of the model under `model`) into a TP=2 model with a fresh
    optimizer: HF's logits, and a training step after it. Megatron-LM pads the vocabulary for its
    tensor-parallel size; megatron-core loads the model's vocabulary into the padded one."""
    hf_dir, bridges, checkpoint = hf
    run = tmp_path / "run"
    args = ["convert", "hf-to-megatron", str(hf_dir), str(run), "--format", "torch_dist"]
    assert main([*args, "--bridge-dir", str(bridges), "--quiet"]) == 0
    assert (run / "latest_checkpointed_iteration.txt").read_text() == "release"
    assert (run / "release" / "metadata.json").is_file()
    assert {n: (run / "release" / "tokenizer" / n).read_text() for n in TOKENIZER} == TOKENIZER
    results = run_ranks(
        partial(resume_on_rank, tp=2, padded_vocab=padded_vocab), 2, run, hf_dir, bridges
    )
    config = json.loads((hf_dir / "config.json").read_text())
    ids = torch.randint(
        0, config["vocab_size"], (1, 80), generator=torch.Generator().manual_seed(5)
    )
    model = checkpoint.model.eval()
    with torch.no_grad():
        expected, expected_mtp = model(input_ids=ids).logits, reference_mtp_logits(
            model, checkpoint.mtp, ids
        )
    *mtp, logits = [torch.from_numpy(x) for x in results[0]["logits"]]
    assert (logits - expected).abs().max().item() <= TOLERANCE
    assert (mtp[0] - expected_mtp).abs().max().item() <= TOLERANCE
    assert all(r["stepped"] and torch.isfinite(torch.tensor(r["loss"])) for r in results)
    # The common state Megatron-LM reads: version 3.0, iteration 0, and its args.
    common, saved = results[0]["common"], results[0]["args"]
    assert common["checkpoint_version"] == 3.0 and common["iteration"] == 0
    assert (saved["num_layers"], saved["hidden_size"], saved["num_attention_heads"]) == (
        config["num_hidden_layers"],
        config["hidden_size"],
        config["num_attention_heads"],
    )
    assert (saved["num_experts"], saved["moe_ffn_hidden_size"], saved["mtp_num_layers"]) == (
        config["num_experts"],
        config["moe_intermediate_size"],
        config["mtp_num_hidden_layers"],
    )
    assert saved["no_save_optim"] and saved["no_save_rng"] and saved["add_position_embedding"]


def test_hf_to_megatron_writes_megatron_bridges_tree(hf, tmp_path: Path, capsys) -> None:
    """`--run-layout megatron-bridge`: iter_0000000/ with the checkpoint, run_config.yaml (its
    model section the model's, as Megatron-Bridge names it), train_state.pt at step 0 and the
    tokenizer; latest_train_state.pt beside it. It converts back bit for bit, also as a trainer's
    run (no record: its run_config.yaml is checked against the model)."""
    import yaml

    hf_dir, bridges, checkpoint = hf
    run = tmp_path / "run"
    args = ["convert", "hf-to-megatron", str(hf_dir), str(run), "--format", "torch_dist"]
    extra = ["--run-layout", "megatron-bridge", "--bridge-dir", str(bridges), "--quiet"]
    assert main([*args, *extra]) == 0
    folder = run / "iter_0000000"
    for state in (folder / "train_state.pt", run / "latest_train_state.pt"):
        assert torch.load(state, weights_only=True)["step"].item() == 0
    assert {n: (folder / "tokenizer" / n).read_text() for n in TOKENIZER} == TOKENIZER
    config = json.loads((hf_dir / "config.json").read_text())
    model = yaml.safe_load((folder / "run_config.yaml").read_text())["model"]
    assert model["_target_"] == "megatron.bridge.models.gpt_provider.GPTModelProvider"
    typed = {
        "num_layers": config["num_hidden_layers"],
        "hidden_size": config["hidden_size"],
        "num_query_groups": config["num_key_value_heads"],
        "kv_channels": config["head_dim"],
        "linear_num_value_heads": config["linear_num_value_heads"],
        "num_moe_experts": config["num_experts"],
        "moe_router_topk": config["num_experts_per_tok"],
        "vocab_size": config["vocab_size"],
        "share_embeddings_and_output_weights": config["tie_word_embeddings"],
        "mtp_num_layers": config["mtp_num_hidden_layers"],
        "tensor_model_parallel_size": 1,
        "pipeline_model_parallel_size": 1,
    }
    assert {k: model[k] for k in typed} == typed
    assert model["linear_attention_freq"] == [
        int(t == "linear_attention") for t in config["layer_types"]
    ]
    # Back to HF: through the record, and as a trainer's run (the iteration folder on its own).
    trainer = tmp_path / "trainer-run"
    shutil.copytree(folder, trainer / "iter_0000000")
    for source, more in ((run, []), (trainer, ["--hf-config", str(hf_dir)])):
        out = tmp_path / f"back-{source.name}"
        cmd = ["convert", "megatron-to-hf", str(source), str(out), *more]
        assert main([*cmd, "--bridge-dir", str(bridges), "--quiet"]) == 0
        with CheckpointReader(hf_dir) as original, CheckpointReader(out) as back:
            assert back.names() == original.names()
            assert all(torch.equal(original.get(n), back.get(n)) for n in original.names())
        assert {n: (out / n).read_text() for n in TOKENIZER} == TOKENIZER
