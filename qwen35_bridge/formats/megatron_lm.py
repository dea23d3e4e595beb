"""Megatron-LM's checkpoint tree: a run root with its tracker and one folder per saved iteration.

A run root holds `latest_checkpointed_iteration.txt` (an iteration number, or `release`) and one
folder per saved iteration, `iter_0000100/` or `release/`. An iteration folder is a torch_dist
checkpoint (`.metadata`, `__R_K.distcp`, `metadata.json`), or in the legacy `torch` format one
`mp_rank_*` folder per model-parallel rank. Megatron-Bridge's runs have the same iteration folders
and also `latest_train_state.pt`, which its loaders read before the tracker; without either, the
newest `iter_*` folder is the one they pick.

The non-tensor state of a torch_dist iteration (megatron-core 0.19 keeps it in the data files as the
`common_state` object) holds Megatron-LM's `args`, `checkpoint_version` and `iteration`; a converted
checkpoint writes them as Megatron-LM's loader reads them (docs/reference.md section 11).
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path
from typing import Any

from qwen35_bridge.errors import ConversionError
from qwen35_bridge.formats.megatron_bridge import LATEST_TRAIN_STATE_NAME, read_train_state_step
from qwen35_bridge.mapping.splits import VOCAB, Split

TRACKER_NAME = "latest_checkpointed_iteration.txt"
RELEASE = "release"
#: What Megatron-LM records as the version of its checkpoints since 2020 (below 3.0 it would try to
#: reorder query/key/value weights, and refuse virtual pipeline chunks).
CHECKPOINT_VERSION = 3.0
_ITERATION = re.compile(r"^iter_(\d{7,})$")
#: A rank's folder in the legacy `torch` format: tensor rank, then pipeline and/or expert rank.
LEGACY_RANK_FOLDER = re.compile(r"^mp_rank_(\d{2})(?:_(\d{3}))?(?:_(\d{3}))?$")


def iteration_folder(name: int | str) -> str:
    """`iter_0000100` for 100, `release` for the release checkpoint."""
    return RELEASE if name == RELEASE else f"iter_{int(name):07d}"


def is_torch_dist(folder: Path) -> bool:
    return (Path(folder) / ".metadata").is_file()


def is_legacy_torch(folder: Path) -> bool:
    """An iteration folder in Megatron-LM's legacy `torch` format (`mp_rank_*/` per rank)."""
    folder = Path(folder)
    return folder.is_dir() and any(LEGACY_RANK_FOLDER.match(p.name) for p in folder.iterdir())


def is_iteration(folder: Path) -> bool:
    return is_torch_dist(folder) or is_legacy_torch(folder)


def write_tracker(root: Path, iteration: int | str) -> None:
    (Path(root) / TRACKER_NAME).write_text(str(iteration), encoding="utf-8")


def tracked_iteration(root: Path) -> str | None:
    """The iteration folder a run root's tracker names (Megatron-Bridge's `latest_train_state.pt`
    first, as its loaders read it), or None without either."""
    root = Path(root)
    if (root / LATEST_TRAIN_STATE_NAME).is_file():
        return iteration_folder(read_train_state_step(root / LATEST_TRAIN_STATE_NAME))
    if (root / TRACKER_NAME).is_file():
        text = (root / TRACKER_NAME).read_text(encoding="utf-8").strip()
        if text != RELEASE and not text.isdigit():
            raise ConversionError(
                f"{root / TRACKER_NAME}: {text!r} is neither an iteration nor 'release'"
            )
        return iteration_folder(text)
    return None


def resolve_iteration(path: Path, iteration: int | None = None) -> Path:
    """The iteration folder a path names: the folder itself, or in a run root the iteration
    `iteration`, else the tracked one, else the newest `iter_*` folder."""
    path = Path(path)
    if iteration is None and is_iteration(path):
        return path
    if iteration is not None:
        chosen = path / iteration_folder(iteration)
    elif (tracked := tracked_iteration(path)) is not None:
        chosen = path / tracked
    else:
        found = (
            sorted((int(m.group(1)), p) for p in path.iterdir() if (m := _ITERATION.match(p.name)))
            if path.is_dir()
            else []
        )
        if not found:
            raise ConversionError(
                f"{path}: neither a Megatron checkpoint nor a Megatron run "
                f"({TRACKER_NAME} or iter_* folders)"
            )
        chosen = found[-1][1]
    if not is_iteration(chosen):
        raise ConversionError(
            f"{chosen}: no Megatron checkpoint there (no torch_dist .metadata, no mp_rank_* folders)"
        )
    return chosen


def training_args(
    architecture: dict[str, Any], gpt_model_args: dict[str, Any]
) -> argparse.Namespace:
    """The model as Megatron-LM's `args` name it, for a converted checkpoint's common state.

    Megatron-LM's loader compares `num_layers`, `hidden_size`, `num_attention_heads` and
    `add_position_embedding` with the run's (unless it fine-tunes), reads the parallel sizes it
    was saved at (1: a torch_dist checkpoint loads at any), and skips optimizer and RNG state that
    the checkpoint says were not saved; `--use-checkpoint-args` takes the model's sizes from here.
    """
    a, g = architecture, gpt_model_args
    return argparse.Namespace(
        num_layers=a["num_layers"],
        hidden_size=a["hidden_size"],
        ffn_hidden_size=a.get("ffn_hidden_size"),
        num_attention_heads=a["num_attention_heads"],
        num_query_groups=a["num_query_groups"],
        group_query_attention=a["num_query_groups"] != a["num_attention_heads"],
        kv_channels=a["kv_channels"],
        max_position_embeddings=g["max_sequence_length"],
        position_embedding_type="rope",
        # Megatron-LM's default, which a rope run keeps unless launched with --no-position-embedding.
        add_position_embedding=True,
        use_rotary_position_embeddings=True,
        rotary_base=g["rotary_base"],
        rotary_percent=g["rotary_percent"],
        rotary_interleaved=False,
        normalization=a["normalization"],
        norm_epsilon=a["layernorm_epsilon"],
        apply_layernorm_1p=a["layernorm_zero_centered_gamma"],
        swiglu=a["gated_linear_unit"],
        add_bias_linear=a["add_bias_linear"],
        add_qkv_bias=a["add_qkv_bias"],
        qk_layernorm=a["qk_layernorm"],
        attention_output_gate=a["attention_output_gate"],
        untie_embeddings_and_output_weights=not g["share_embeddings_and_output_weights"],
        padded_vocab_size=g["vocab_size"],
        experimental_attention_variant=a["experimental_attention_variant"],
        linear_attention_freq=a["linear_attention_freq"],
        linear_conv_kernel_dim=a["linear_conv_kernel_dim"],
        linear_key_head_dim=a["linear_key_head_dim"],
        linear_value_head_dim=a["linear_value_head_dim"],
        linear_num_key_heads=a["linear_num_key_heads"],
        linear_num_value_heads=a["linear_num_value_heads"],
        num_experts=a["num_moe_experts"],
        moe_layer_freq=a["moe_layer_freq"],
        moe_router_topk=a["moe_router_topk"],
        moe_ffn_hidden_size=a["moe_ffn_hidden_size"],
        moe_shared_expert_intermediate_size=a["moe_shared_expert_intermediate_size"],
        moe_shared_expert_gate=a["moe_shared_expert_gate"],
        moe_grouped_gemm=a["moe_grouped_gemm"],
        moe_router_score_function=a["moe_router_score_function"],
        moe_router_pre_softmax=a["moe_router_pre_softmax"],
        mtp_num_layers=a["mtp_num_layers"],
        tensor_model_parallel_size=1,
        pipeline_model_parallel_size=1,
        expert_model_parallel_size=1,
        virtual_pipeline_model_parallel_size=None,
        ckpt_format="torch_dist",
        no_save_optim=True,
        no_save_rng=True,
    )


def common_state(args: argparse.Namespace, iteration: int) -> dict[str, Any]:
    """The non-tensor state of a converted checkpoint, as Megatron-LM saves its own."""
    return {
        "args": args,
        "checkpoint_version": CHECKPOINT_VERSION,
        "iteration": iteration,
        "num_floating_point_operations_so_far": 0,
    }


def padded_vocabulary(split: Split, found: tuple[int, ...], expected: tuple[int, ...]) -> bool:
    """Whether `found` is the vocabulary tensor `expected` with padding rows after it: Megatron-LM
    pads the vocabulary to a multiple of `--make-vocab-size-divisible-by` times its tensor-parallel
    size, so a trainer's embedding and output layer may have more rows than the model's vocabulary.
    The padding rows are no token's: a conversion drops them (and says so)."""
    return (
        split == VOCAB
        and len(found) == len(expected)
        and found[0] > expected[0]
        and tuple(found[1:]) == tuple(expected[1:])
    )


def padding_note(found_rows: int, expected_rows: int) -> str:
    return (
        f"vocabulary padded to {found_rows} rows by the trainer; its {found_rows - expected_rows} "
        "padding rows are dropped"
    )


#: The run root's file with the model's flags for Megatron-LM's `pretrain_gpt.py`.
PRETRAIN_ARGS_NAME = "pretrain_gpt_args.txt"


def pretrain_gpt_flags(architecture: dict[str, Any], gpt_model_args: dict[str, Any]) -> list[str]:
    """The model's flags for Megatron-LM's `pretrain_gpt.py` (its r0.19 argument names) as
    command-line words: the architecture only; parallelism, data, precision and schedule are the
    run's own. Written one word per line, so that `mapfile -t ARGS < pretrain_gpt_args.txt` reads
    them back exactly (the per-layer lists are Python list expressions, which a shell would glob).
    """
    a, g = architecture, gpt_model_args
    SWITCH = None
    options: list[tuple[str, Any]] = [
        ("--num-layers", a["num_layers"]),
        ("--hidden-size", a["hidden_size"]),
        ("--num-attention-heads", a["num_attention_heads"]),
        ("--group-query-attention", SWITCH),
        ("--num-query-groups", a["num_query_groups"]),
        ("--kv-channels", a["kv_channels"]),
        ("--normalization", a["normalization"]),
        ("--norm-epsilon", a["layernorm_epsilon"]),
        ("--apply-layernorm-1p", SWITCH),
        ("--qk-layernorm", SWITCH),
        ("--attention-output-gate", SWITCH),
        ("--swiglu", SWITCH),
        ("--disable-bias-linear", SWITCH),
        ("--position-embedding-type", "rope"),
        ("--rotary-percent", g["rotary_percent"]),
        ("--rotary-base", g["rotary_base"]),
        ("--max-position-embeddings", g["max_sequence_length"]),
        ("--experimental-attention-variant", a["experimental_attention_variant"]),
        ("--linear-attention-freq", _list_flag(a["linear_attention_freq"])),
        ("--linear-conv-kernel-dim", a["linear_conv_kernel_dim"]),
        ("--linear-key-head-dim", a["linear_key_head_dim"]),
        ("--linear-value-head-dim", a["linear_value_head_dim"]),
        ("--linear-num-key-heads", a["linear_num_key_heads"]),
        ("--linear-num-value-heads", a["linear_num_value_heads"]),
    ]
    if not g["share_embeddings_and_output_weights"]:
        options.append(("--untie-embeddings-and-output-weights", SWITCH))
    if a["num_moe_experts"]:
        options += [
            ("--num-experts", a["num_moe_experts"]),
            ("--moe-layer-freq", _list_flag(a["moe_layer_freq"])),
            ("--moe-ffn-hidden-size", a["moe_ffn_hidden_size"]),
            ("--moe-router-topk", a["moe_router_topk"]),
            ("--moe-router-score-function", a["moe_router_score_function"]),
            ("--moe-grouped-gemm", SWITCH),
        ]
        if a["moe_shared_expert_intermediate_size"]:
            options.append(
                ("--moe-shared-expert-intermediate-size", a["moe_shared_expert_intermediate_size"])
            )
        if a["moe_shared_expert_gate"]:
            options.append(("--moe-shared-expert-gate", SWITCH))
        if a["moe_router_pre_softmax"]:
            options.append(("--moe-router-pre-softmax", SWITCH))
    if "ffn_hidden_size" in a:  # a model with dense MLP layers
        options.append(("--ffn-hidden-size", a["ffn_hidden_size"]))
    if a["mtp_num_layers"]:
        options.append(("--mtp-num-layers", a["mtp_num_layers"]))
    return [str(word) for name, value in options for word in (name, value) if word is not SWITCH]


def _list_flag(values: Any) -> str:
    """A per-layer list as the Python list expression Megatron-LM's flag evaluates (no spaces)."""
    return "[" + ",".join(str(int(v)) for v in values) + "]"
