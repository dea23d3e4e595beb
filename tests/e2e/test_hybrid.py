"""The HybridModel target, proven like the GPTModel one: HF checkpoint -> `codegen convert
--target hybrid` -> megatron-core's real HybridModel (the VL model around it for a VL bridge) ->
logits and MTP logits equal HF's -> back to HF bit for bit; torch_dist restored by megatron-core's
`dist_checkpointing.load`; TP=2 (with sequence parallelism), PP=2, EP=2 and a TP=2 restore over 2
gloo ranks; a GPTModel checkpoint converted to the HybridModel layout and back without HF, bit for
bit; and negative controls for the layer numbering (docs/reference.md section 12).

Tiny models derived from real catalog configs, every parameter random, 80 tokens or more (two of
GDN's 64-token chunks).
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch.distributed.checkpoint import FileSystemReader

from qwen35_bridge.errors import ConversionError
from qwen35_bridge.formats.record import Record
from qwen35_bridge.formats.safetensors.reader import CheckpointReader
from qwen35_bridge.reference.vl import hf_vl_logits, reference_vl_mtp_logits, synthetic_prompt
from qwen35_codegen import catalog
from qwen35_codegen.cli.main import main
from qwen35_codegen.registry.lookup import bridge_for_checkpoint
from tests.support import TinyCheckpoint, make_checkpoint, reference_mtp_logits

os.environ.setdefault("TORCHDYNAMO_DISABLE", "1")

TOLERANCE = 1e-4
SEQUENCE = 80
VARIANTS = {
    "dense-text": ("Qwen/Qwen3.6-27B", {"text_only": True, "text_prefix": "model"}),
    "moe-text": (
        "Qwen/Qwen3.5-35B-A3B",
        {
            "text_only": True,
            "text_prefix": "model.language_model",
            "experts_layout": "packed",
            "mtp_experts_layout": "per_expert",
        },
    ),
    "moe-vl": (
        "Qwen/Qwen3.6-35B-A3B",
        {"experts_layout": "packed", "mtp_experts_layout": "packed"},
    ),
}
# Two images of different grids (6 and 12 vision tokens), 88 tokens in all.
GRIDS = ((1, 4, 6), (1, 6, 8))


@dataclass
class Converted:
    """One variant: its HF checkpoint, converted to the hybrid layout (safetensors), the hybrid
    bridge, and the prompt with HF's logits on it."""

    tmp: Path
    checkpoint: TinyCheckpoint
    megatron_dir: Path
    bridge_dir: Path
    bridge: Any
    spec: Any
    inputs: Any
    expected: torch.Tensor
    expected_mtp: torch.Tensor

    @property
    def vl(self) -> bool:
        return self.spec.is_vl


def convert_args(converted_or_bridges: Path) -> list[str]:
    return ["--bridge-dir", str(converted_or_bridges), "--quiet"]


def prepare(tmp: Path, name: str) -> Converted:
    model_id, options = VARIANTS[name]
    checkpoint = make_checkpoint(tmp / "hf", catalog.entry(model_id).config, seed=23, **options)
    bridges = tmp / "bridges"
    megatron = tmp / "hybrid"
    assert (
        main(
            [
                "convert",
                "hf-to-megatron",
                str(checkpoint.path),
                str(megatron),
                "--target",
                "hybrid",
                *convert_args(bridges),
            ]
        )
        == 0
    )
    bridge, spec, _ = bridge_for_checkpoint(
        checkpoint.path, bridge_dir=bridges, quiet=True, target="hybrid"
    )
    model = checkpoint.model.eval()
    if spec.is_vl:
        inputs = synthetic_prompt(checkpoint.config, GRIDS, text_tokens=66, seed=2)
        expected = hf_vl_logits(model, inputs)
        expected_mtp = reference_vl_mtp_logits(model, checkpoint.mtp, inputs)
    else:
        gen = torch.Generator().manual_seed(1)
        inputs = torch.randint(0, spec.vocab_size, (2, SEQUENCE), generator=gen)
        with torch.no_grad():
            expected = model(input_ids=inputs).logits
            expected_mtp = reference_mtp_logits(model, checkpoint.mtp, inputs)
    return Converted(
        tmp, checkpoint, megatron, bridges, bridge, spec, inputs, expected, expected_mtp
    )


@pytest.fixture(scope="module")
def variants(tmp_path_factory) -> dict[str, Converted]:
    return {name: prepare(tmp_path_factory.mktemp(name), name) for name in VARIANTS}


@pytest.fixture
def parallel_state():
    from qwen35_bridge.megatron.parallel import destroy_parallel, init_parallel

    yield init_parallel()
    destroy_parallel()


def delta(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape, (a.shape, b.shape)
    return (a - b).abs().max().item()


def forward(converted: Converted, model: Any) -> tuple[torch.Tensor, list[torch.Tensor]]:
    from qwen35_bridge.megatron.gpt import forward_logits
    from qwen35_bridge.megatron.vl.multimodal import vl_forward_logits

    return (vl_forward_logits if converted.vl else forward_logits)(model, converted.inputs)


def build(converted: Converted, parallel: dict[str, Any]) -> Any:
    bridge = converted.bridge
    return (bridge.build_vl_model if converted.vl else bridge.build_model)(**parallel)


def same_bytes(a: torch.Tensor, b: torch.Tensor) -> bool:
    return (
        a.dtype == b.dtype
        and a.shape == b.shape
        and a.contiguous().view(torch.uint8).numpy().tobytes()
        == b.contiguous().view(torch.uint8).numpy().tobytes()
    )


def files_equal(a: Path, b: Path, rename: dict[str, str] | None = None) -> None:
    """Every tensor of checkpoint folder `a` bit-identical in `b` (under `rename`'s names)."""
    with CheckpointReader(a) as left, CheckpointReader(b) as right:
        names = {n: (rename or {}).get(n, n) for n in left.names()}
        assert set(names.values()) == right.names()
        for name, other in names.items():
            assert same_bytes(left.get(name), right.get(other)), name


# -- One process (TP=1) --------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_logits_and_mtp_logits_equal_hf(variants, name: str, parallel_state) -> None:
    """The converted files fill exactly HybridModel's parameters, and its logits and MTP logits
    equal HF's."""
    from qwen35_bridge.megatron.live import global_parameters

    converted = variants[name]
    model = build(converted, parallel_state)
    language_model = model.language_model if converted.vl else model
    assert type(language_model).__name__ == "HybridModel"
    assert language_model.hybrid_layer_pattern == converted.bridge.hybrid_layer_pattern
    with CheckpointReader(converted.megatron_dir) as reader:
        assert set(global_parameters(model, "")) == reader.names()
    converted.bridge.load_megatron(model, converted.megatron_dir)
    logits, mtp = forward(converted, model)
    assert len(mtp) == converted.spec.mtp_layers == 1
    assert delta(logits, converted.expected) <= TOLERANCE
    assert delta(mtp[0], converted.expected_mtp) <= TOLERANCE


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_round_trip_through_the_hybrid_layout_is_bit_identical(variants, name: str) -> None:
    converted = variants[name]
    back = converted.tmp / "back"
    args = ["convert", "megatron-to-hf", str(converted.megatron_dir), str(back)]
    assert main([*args, *convert_args(converted.bridge_dir)]) == 0
    assert json.loads((converted.megatron_dir / "codegen.json").read_text())["target"] == "hybrid"
    files_equal(converted.checkpoint.path, back)


def test_verify_follows_the_records_target(variants, capsys) -> None:
    """`codegen verify` builds the model class the Megatron checkpoint's record names."""
    converted = variants["dense-text"]
    hf, megatron = str(converted.checkpoint.path), str(converted.megatron_dir)
    assert main(["verify", hf, megatron]) == 0
    assert "PASS" in capsys.readouterr().out


def test_torch_dist_has_hybrid_names_and_megatron_core_restores_it(variants) -> None:
    """Written for the hybrid target: physical layer numbers, `decoder.final_norm`, the MTP
    layer's inner stack under `mtp_model_layer.layers.{0,1}` (no `transformer_layer` renaming),
    GDN sections and stacked experts as for GPTModel; `dist_checkpointing.load` restores it into
    HybridModel with HF's logits, and it converts back to HF bit for bit."""
    from megatron.core import dist_checkpointing

    converted = variants["moe-text"]
    dist = converted.tmp / "dist"
    args = ["convert", "hf-to-megatron", str(converted.checkpoint.path), str(dist)]
    args += ["--target", "hybrid", "--format", "torch_dist", *convert_args(converted.bridge_dir)]
    assert main(args) == 0
    release = dist / "release"  # the iteration folder of the run tree hf-to-megatron writes
    assert (dist / "latest_checkpointed_iteration.txt").read_text().strip() == "release"
    assert not (dist / "pretrain_gpt_args.txt").exists()  # its flags build GPTModel
    metadata = FileSystemReader(str(release)).read_metadata().state_dict_metadata
    shapes = {k: tuple(v.size) for k, v in metadata.items() if hasattr(v, "size")}
    spec, h = converted.spec, converted.spec.hidden_size
    m, g = spec.moe, spec.gdn
    last = spec.num_layers - 1  # an attention layer: its mixer is 2 * last, its MoE 2 * last + 1
    assert shapes["decoder.final_norm.weight"] == (h,)
    assert "decoder.final_layernorm.weight" not in shapes
    assert shapes[f"decoder.layers.{2 * last}.self_attention.linear_qkv.layer_norm_weight"] == (h,)
    assert shapes[f"decoder.layers.{2 * last + 1}.pre_mlp_layernorm.weight"] == (h,)
    assert shapes["decoder.layers.0.self_attention.in_proj.weight.z"] == (
        g.num_value_heads * g.value_head_dim,
        h,
    )
    assert not [k for k in shapes if k.startswith("decoder.layers.0.mlp")]
    assert not [k for k in shapes if k.startswith("decoder.layers.1.self_attention")]
    for layer in ("decoder.layers.1.", "mtp.layers.0.mtp_model_layer.layers.1."):
        assert shapes[f"{layer}mlp.experts.experts.linear_fc1.weight"] == (
            m.num_experts,
            2 * m.expert_intermediate_size,
            h,
        )
    assert "mtp.layers.0.mtp_model_layer.layers.0.self_attention.q_layernorm.weight" in shapes
    assert not [k for k in shapes if "transformer_layer" in k]
    assert (
        max(int(k.split(".")[2]) for k in shapes if k.startswith("decoder.layers.")) == 2 * last + 1
    )

    from qwen35_bridge.megatron.parallel import destroy_parallel, init_parallel

    parallel = init_parallel()  # after the conversion, which derives the layout on its own
    try:
        model = converted.bridge.build_model(**parallel)
        # As Megatron-LM loads it: the model's state under "model", beside the common state.
        state = dist_checkpointing.load({"model": model.sharded_state_dict()}, str(release))
        result = model.load_state_dict(state["model"], strict=False)
        logits, mtp = forward(converted, model)
    finally:
        destroy_parallel()
    assert not [k for k in result.missing_keys if not k.endswith("_extra_state")]
    assert not result.unexpected_keys
    args = state["args"]  # Megatron-LM's args of a HybridModel run: the physical layer count
    assert args.num_layers == 2 * spec.num_layers
    assert args.hybrid_layer_pattern == converted.bridge.hybrid_layer_pattern
    assert delta(logits, converted.expected) <= TOLERANCE
    assert delta(mtp[0], converted.expected_mtp) <= TOLERANCE
    back = converted.tmp / "dist-back"
    assert (
        main(
            ["convert", "megatron-to-hf", str(dist), str(back), *convert_args(converted.bridge_dir)]
        )
        == 0
    )
    files_equal(converted.checkpoint.path, back)


def test_gpt_and_hybrid_checkpoints_convert_into_each_other_bit_for_bit(variants) -> None:
    """GPT layout -> hybrid layout (as torch_dist) -> GPT layout, with no HF step: the hybrid
    tensors are exactly those a direct HF -> hybrid conversion writes, and the GPT ones come back
    byte for byte, with records naming their target."""
    from qwen35_bridge.offline import megatron_reader

    converted = variants["moe-vl"]
    tmp, args = converted.tmp, convert_args(converted.bridge_dir)
    gpt, hybrid, gpt_again = tmp / "gpt", tmp / "gpt-to-hybrid", tmp / "hybrid-to-gpt"
    assert main(["convert", "hf-to-megatron", str(converted.checkpoint.path), str(gpt), *args]) == 0
    assert (
        main(["convert", "gpt-to-hybrid", str(gpt), str(hybrid), "--format", "torch_dist", *args])
        == 0
    )
    record = Record.read(hybrid)
    assert (record.target, record.format) == ("hybrid", "megatron-torch_dist")
    assert (hybrid / "latest_checkpointed_iteration.txt").read_text().strip() == "release"
    assert record.spec_sha256 == Record.read(gpt).spec_sha256
    with (
        megatron_reader(converted.bridge, hybrid) as retargeted,
        CheckpointReader(converted.megatron_dir) as direct,
    ):
        assert retargeted.names() == direct.names()
        for name in direct.names():
            assert same_bytes(retargeted.get(name), direct.get(name)), name
    assert main(["convert", "hybrid-to-gpt", str(hybrid), str(gpt_again), *args]) == 0
    assert Record.read(gpt_again).target == "gpt"
    assert Record.read(gpt_again).format == "megatron-torch_dist"  # the source's format
    assert (gpt_again / "pretrain_gpt_args.txt").is_file()  # a GPTModel run tree again
    with (
        CheckpointReader(gpt) as original,
        megatron_reader(
            bridge_for_checkpoint(
                converted.checkpoint.path, bridge_dir=converted.bridge_dir, quiet=True
            )[0],
            gpt_again,
        ) as back,
    ):
        assert back.names() == original.names()
        for name in original.names():
            assert same_bytes(original.get(name), back.get(name)), name
    assert (gpt_again / "hf_config.json").read_bytes() == (gpt / "hf_config.json").read_bytes()


def test_retargeting_refuses_the_wrong_source_and_names_a_missing_tensor(
    variants, tmp_path: Path, capsys
) -> None:
    converted = variants["dense-text"]
    args = convert_args(converted.bridge_dir)
    source = str(converted.megatron_dir)  # a hybrid checkpoint
    assert main(["convert", "gpt-to-hybrid", source, str(tmp_path / "y"), *args]) == 2
    assert "already holds hybrid tensors, as its codegen.json records" in capsys.readouterr().err
    assert not (tmp_path / "y").exists()
    assert main(["convert", "megatron-to-hf", source, str(tmp_path / "z"), "--target", "gpt"]) == 2
    err = capsys.readouterr().err
    assert "--target gpt" in err and "holds hybrid tensors" in err and "hybrid-to-gpt" in err
    broken = tmp_path / "broken"
    shutil.copytree(converted.megatron_dir, broken)
    name = f"decoder.layers.{2 * (converted.spec.num_layers - 1) + 1}.mlp.linear_fc2.weight"
    with CheckpointReader(broken) as reader:
        shard = broken / reader.file(name)
    tensors = load_file(shard)
    del tensors[name]
    save_file(tensors, shard, metadata={"format": "pt"})
    index = json.loads((broken / "model.safetensors.index.json").read_text())
    del index["weight_map"][name]
    (broken / "model.safetensors.index.json").write_text(json.dumps(index))
    assert main(["convert", "hybrid-to-gpt", str(broken), str(tmp_path / "w"), *args]) == 2
    assert f"{name}: missing from the Megatron checkpoint" in capsys.readouterr().err
    assert not (tmp_path / "w").exists()


def test_a_trainers_hybrid_checkpoint_converts_to_hf_with_target_hybrid(
    variants, tmp_path: Path, capsys
) -> None:
    """A Megatron-LM-style run (tracker + iter_0000001) that megatron-core's own
    `dist_checkpointing.save` wrote from HybridModel converts back to HF with `--target hybrid`,
    bit for bit, and `verify --target hybrid` passes; read with the GPT bridge (the default) it
    fails, naming a tensor it lacks."""
    from megatron.core import dist_checkpointing

    from qwen35_bridge.formats.megatron_lm import TRACKER_NAME, iteration_folder
    from qwen35_bridge.megatron.parallel import destroy_parallel, init_parallel

    converted = variants["moe-text"]
    run = tmp_path / "run"
    folder = run / iteration_folder(1)
    folder.mkdir(parents=True)
    parallel = init_parallel()
    try:
        model = converted.bridge.build_model(**parallel)
        converted.bridge.load_hf(model, converted.checkpoint.path)
        state = {"model": model.sharded_state_dict(), "iteration": 1, "checkpoint_version": 3.0}
        dist_checkpointing.save(state, str(folder))
    finally:
        destroy_parallel()
    (run / TRACKER_NAME).write_text("1\n")
    args = ["convert", "megatron-to-hf", str(run)]
    common = ["--hf-config", str(converted.checkpoint.path), *convert_args(converted.bridge_dir)]
    assert main([*args, str(tmp_path / "gpt"), *common]) == 2
    err = capsys.readouterr().err
    assert (
        "decoder.layers.0.pre_mlp_layernorm.weight: missing from the torch_dist checkpoint" in err
    )
    assert main([*args, str(tmp_path / "hf"), *common, "--target", "hybrid"]) == 0
    files_equal(converted.checkpoint.path, tmp_path / "hf")
    hf = str(converted.checkpoint.path)
    assert main(["verify", hf, str(run), "--target", "hybrid"]) == 0
    assert "PASS" in capsys.readouterr().out


def test_wrong_physical_numbering_gives_wrong_logits_or_a_named_error(
    variants, parallel_state
) -> None:
    """Negative controls of the table's explicit numbering: MLPs given each other's layers load
    (same names, same shapes) but compute another model; mixers numbered as MLPs name a tensor
    the model does not have."""
    converted = variants["dense-text"]
    bridge = converted.bridge

    def renumbered(change) -> Any:
        mappings = tuple(
            dataclasses.replace(m, megatron_layers=change(m)) if m.megatron_layers else m
            for m in bridge.mappings
        )
        return type("Renumbered", (type(bridge),), {"mappings": mappings})()

    mlps = tuple(2 * i + 1 for i in range(converted.spec.num_layers))
    swapped = renumbered(
        lambda m: (
            tuple(reversed(m.megatron_layers)) if m.megatron_layers == mlps else m.megatron_layers
        )
    )
    model = swapped.build_model(**parallel_state)
    swapped.load_hf(model, converted.checkpoint.path)
    logits, _ = forward(converted, model)
    assert delta(logits, converted.expected) > 0.1

    def mixers_as_mlps(mapping: Any) -> tuple[int, ...]:
        mixer = all(j % 2 == 0 for j in mapping.megatron_layers)
        return tuple(j + 1 if mixer else j for j in mapping.megatron_layers)

    with pytest.raises(
        ConversionError,
        match=r"^decoder\.layers\.0\.self_attention\.\S+: a parameter of the Megatron model that "
        "the bridge does not map$",
    ):
        renumbered(mixers_as_mlps).load_hf(
            bridge.build_model(**parallel_state), converted.checkpoint.path
        )


# -- Two gloo ranks --------------------------------------------------------------------------------


def test_tp2_pp2_ep2_and_a_tp2_restore_equal_hf(variants) -> None:
    """In one pair of spawned ranks: TP=2 with sequence parallelism (MoE), PP=2 (dense: each stage
    holds whole logical layers, MTP on the last), the VL model at TP=2, a torch_dist restore at
    TP=2, and EP=2; logits and MTP logits equal HF's and the exports are bit-identical."""
    from qwen35_bridge.megatron.ranks import run_ranks
    from tests.support.hybrid_ranks import Case, run_cases

    dense, moe, vl = variants["dense-text"], variants["moe-text"], variants["moe-vl"]
    dist = moe.tmp / "dist-tp"
    args = ["convert", "hf-to-megatron", str(moe.checkpoint.path), str(dist), "--target", "hybrid"]
    assert main([*args, "--format", "torch_dist", *convert_args(moe.bridge_dir)]) == 0

    def case(name: str, converted: Converted, **kwargs: Any) -> Case:
        return Case(
            name, converted.checkpoint.path, converted.bridge_dir, converted.inputs, **kwargs
        )

    cases = [
        case("tp2-sp-moe", moe, parallel=dict(tp=2, sequence_parallel=True)),
        case("pp2-dense", dense, parallel=dict(pp=2)),
        case("tp2-vl", vl, parallel=dict(tp=2), vl=True),
        case("tp2-restore", moe, parallel=dict(tp=2), torch_dist=dist / "release"),
        case("ep2-moe", moe, parallel=dict(ep=2)),
    ]
    ranks = run_ranks(run_cases, 2, cases)
    expected = {
        "tp2-sp-moe": moe,
        "pp2-dense": dense,
        "tp2-vl": vl,
        "tp2-restore": moe,
        "ep2-moe": moe,
    }
    for results in ranks:
        for name, converted in expected.items():
            got = results[name]
            assert delta(torch.from_numpy(got.logits), converted.expected) <= TOLERANCE, name
            assert delta(torch.from_numpy(got.mtp_logits[0]), converted.expected_mtp) <= TOLERANCE
    physical = 2 * dense.spec.num_layers
    assert ranks[0]["pp2-dense"].layer_numbers == list(range(physical // 2))
    assert ranks[1]["pp2-dense"].layer_numbers == list(range(physical // 2, physical))
    for name in ("tp2-sp-moe", "pp2-dense", "tp2-vl", "ep2-moe"):
        exported = ranks[0][name].exported
        state = expected[name].checkpoint.state
        if name != "tp2-vl":
            state = {k: v for k, v in state.items() if not k.startswith("model.visual.")}
        assert set(exported) == set(state), name
        for key, tensor in state.items():
            assert same_bytes(torch.from_numpy(exported[key]), tensor), key
