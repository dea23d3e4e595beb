"""The pieces of a trainer's checkpoint tree, one by one: `torch.save` files opened without running
their code, legacy rank folders told apart, run roots resolved to their iteration, the common
state's key, and a Megatron-Bridge model section held against the model."""

from __future__ import annotations

import argparse
import os
import pickle
from pathlib import Path

import pytest
import torch

from qwen35_bridge.errors import ConversionError
from qwen35_bridge.formats import lazy_pickle, megatron_bridge, megatron_lm
from qwen35_bridge.formats.megatron_torch import RANK_FILE, _rank_folders


class _Sneaky:
    """Unpickling it with plain pickle would run a command (it writes a file)."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self):
        return (os.system, (f"touch {self.path}",))


def test_a_torch_save_file_opens_without_running_its_code(tmp_path: Path) -> None:
    marker = tmp_path / "ran"
    state = {
        "model": {"w": torch.arange(6.0).reshape(2, 3)},
        "args": argparse.Namespace(tensor_model_parallel_size=2, hook=_Sneaky(str(marker))),
    }
    torch.save(state, tmp_path / "ckpt.pt")
    with pytest.raises(Exception):  # the control: plain torch.load refuses it (weights_only)
        torch.load(tmp_path / "ckpt.pt")
    loaded, archive = lazy_pickle.load(tmp_path / "ckpt.pt")
    assert not marker.exists()
    assert isinstance(loaded["args"], lazy_pickle.Stub)
    assert loaded["args"].tensor_model_parallel_size == 2
    lazy = loaded["model"]["w"]
    assert isinstance(lazy, lazy_pickle.LazyTensor) and lazy.shape == (2, 3)
    assert torch.equal(lazy.read(), torch.arange(6.0).reshape(2, 3))
    archive.close()
    pickle.loads(pickle.dumps(_Sneaky(str(marker))))  # and the control runs it
    assert marker.exists()


def test_tensors_are_read_as_their_views_of_a_shared_storage(tmp_path: Path) -> None:
    """A trainer's parameters can be views into one buffer (megatron-core's DDP keeps them in
    one): each is read as its own region, strided views too."""
    buffer = torch.arange(40.0)
    state = torch.nn.Module().state_dict()  # an OrderedDict with PyTorch's `_metadata`
    state.update({"a": buffer[4:16].view(3, 4), "b": buffer[20:32].view(4, 3).t(), "c": buffer})
    assert hasattr(state, "_metadata")
    torch.save(state, tmp_path / "views.pt")
    loaded, archive = lazy_pickle.load(tmp_path / "views.pt")
    for name, tensor in state.items():
        assert torch.equal(loaded[name].read(), tensor), name
    archive.close()


def test_a_truncated_torch_save_file_is_one_line(tmp_path: Path) -> None:
    torch.save({"w": torch.ones(100)}, tmp_path / "ckpt.pt")
    data = (tmp_path / "ckpt.pt").read_bytes()
    (tmp_path / "ckpt.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(ConversionError, match="ckpt.pt: not a torch.save archive"):
        lazy_pickle.load(tmp_path / "ckpt.pt")


def _rank_tree(root: Path, names: list[str]) -> Path:
    for name in names:
        (root / name).mkdir(parents=True)
        (root / name / RANK_FILE).write_bytes(b"")
    return root


@pytest.mark.parametrize(
    ("args", "axis"),
    [
        (argparse.Namespace(pipeline_model_parallel_size=2, expert_model_parallel_size=1), "pp"),
        (argparse.Namespace(pipeline_model_parallel_size=1, expert_model_parallel_size=2), "ep"),
    ],
)
def test_legacy_rank_folders_are_told_apart_by_the_runs_args(
    tmp_path: Path, args, axis: str
) -> None:
    """`mp_rank_00_001` is pipeline rank 1 or, in a run without pipeline parallelism, expert
    rank 1 (Megatron-LM names both the same way)."""
    root = _rank_tree(tmp_path, ["mp_rank_00_000", "mp_rank_00_001"])
    ranks = _rank_folders(root, args)
    assert sorted(getattr(r, axis) for r in ranks) == [0, 1]
    with pytest.raises(ConversionError, match="cannot tell pipeline from expert ranks"):
        _rank_folders(root, None)


def test_a_missing_rank_folder_is_named(tmp_path: Path) -> None:
    root = _rank_tree(tmp_path, ["mp_rank_00_000_000", "mp_rank_01_000_000", "mp_rank_01_000_001"])
    with pytest.raises(ConversionError, match="tensor rank 0, pipeline rank 0, expert rank 1"):
        _rank_folders(root, None)


def _iteration(root: Path, name: str) -> Path:
    (root / name).mkdir(parents=True)
    (root / name / ".metadata").write_bytes(b"")
    return root / name


def test_a_run_root_resolves_to_its_tracked_iteration(tmp_path: Path) -> None:
    for name in ("iter_0000010", "iter_0000020", "release"):
        _iteration(tmp_path, name)
    assert megatron_lm.resolve_iteration(tmp_path).name == "iter_0000020"  # newest, no tracker
    megatron_lm.write_tracker(tmp_path, 10)
    assert megatron_lm.resolve_iteration(tmp_path).name == "iter_0000010"
    assert megatron_lm.resolve_iteration(tmp_path, 20).name == "iter_0000020"
    megatron_lm.write_tracker(tmp_path, "release")
    assert megatron_lm.resolve_iteration(tmp_path).name == "release"
    # Megatron-Bridge's latest train state comes before the tracker, as in its loaders.
    megatron_bridge.write_train_state(tmp_path / megatron_bridge.LATEST_TRAIN_STATE_NAME, 20)
    assert megatron_lm.resolve_iteration(tmp_path).name == "iter_0000020"
    assert megatron_lm.resolve_iteration(tmp_path / "iter_0000010").name == "iter_0000010"
    megatron_lm.write_tracker(tmp_path, "latest")
    (tmp_path / megatron_bridge.LATEST_TRAIN_STATE_NAME).unlink()
    with pytest.raises(ConversionError, match="'latest' is neither an iteration nor 'release'"):
        megatron_lm.resolve_iteration(tmp_path)
    with pytest.raises(ConversionError, match="iter_0000030: no Megatron checkpoint there"):
        megatron_lm.resolve_iteration(tmp_path, 30)


def test_the_common_state_key_is_megatron_cores() -> None:
    from megatron.core.dist_checkpointing.mapping import ShardedObject

    from qwen35_bridge.formats.torch_dist.layout import COMMON_STATE_KEY

    assert ShardedObject("common_state", None, (1,), (0,)).unique_key == COMMON_STATE_KEY


def test_a_model_section_of_another_model_is_refused(tmp_path: Path) -> None:
    architecture = {"num_layers": 8, "hidden_size": 64, "num_moe_experts": None}
    gpt = {
        "vocab_size": 256,
        "max_sequence_length": 1024,
        "rotary_base": 10000000,
        "rotary_percent": 0.25,
        "share_embeddings_and_output_weights": False,
    }
    same = {"num_layers": 8, "hidden_size": 64.0, "vocab_size": 256, "fp16": True}
    megatron_bridge.check_model_section(same, architecture, gpt, tmp_path)  # extra fields: fine
    with pytest.raises(ConversionError, match="model.rotary_base is 10000, but the bridge's"):
        megatron_bridge.check_model_section(
            same | {"rotary_base": 10000}, architecture, gpt, tmp_path
        )


@pytest.mark.parametrize("model_id", ["Qwen/Qwen3.5-35B-A3B", "Qwen/Qwen3.5-27B"])
def test_pretrain_gpt_flags_say_what_the_config_says(model_id: str) -> None:
    """The flags written beside a converted run, read back as argv words, against the catalog
    config (Megatron-LM r0.19's own parser accepted these flag names, checked by hand)."""
    from qwen35_bridge.formats.torch_dist import layout
    from qwen35_bridge.generated import load_bridge
    from qwen35_codegen import catalog

    bridge = load_bridge(model_id)()
    words = megatron_lm.pretrain_gpt_flags(layout(bridge).architecture, bridge.gpt_model_args)
    assert all(isinstance(w, str) and " " not in w for w in words)
    values = {}
    for i, word in enumerate(words):
        if word.startswith("--"):
            following = words[i + 1] if i + 1 < len(words) else "--"
            values[word] = None if following.startswith("--") else following
    config = catalog.entry(model_id).config["text_config"]
    rope = config["rope_parameters"]
    assert values["--num-layers"] == str(config["num_hidden_layers"])
    assert values["--hidden-size"] == str(config["hidden_size"])
    assert values["--num-query-groups"] == str(config["num_key_value_heads"])
    assert values["--kv-channels"] == str(config["head_dim"])
    assert values["--linear-num-value-heads"] == str(config["linear_num_value_heads"])
    assert values["--rotary-percent"] == str(rope["partial_rotary_factor"])
    assert float(values["--rotary-base"]) == rope["rope_theta"]
    assert (
        values["--linear-attention-freq"]
        == "["
        + ",".join("1" if t == "linear_attention" else "0" for t in config["layer_types"])
        + "]"
    )
    assert values["--mtp-num-layers"] == str(config["mtp_num_hidden_layers"])
    assert "--untie-embeddings-and-output-weights" in values
    if "num_experts" in config:
        assert values["--num-experts"] == str(config["num_experts"])
        assert values["--moe-ffn-hidden-size"] == str(config["moe_intermediate_size"])
        assert "--ffn-hidden-size" not in values  # no dense MLP: no size to give
    else:
        assert values["--ffn-hidden-size"] == str(config["intermediate_size"])
        assert "--num-experts" not in values
