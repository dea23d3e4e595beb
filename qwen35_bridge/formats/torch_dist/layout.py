"""The layout of a bridge's torch_dist checkpoint, as megatron-core defines it, as plain data.

The model is built on the meta device (no memory) and its `sharded_state_dict()` says which keys,
shapes and chunks a checkpoint holds, including the factories that store GDN in_proj and conv1d as
separate sections, GLU fc1 halves and stacked experts (docs/reference.md sections 5 to 7). Each chunk is
recorded as the rows of one Megatron tensor it holds; the layout is computed once per bridge and
megatron-core release and cached, so that conversions need neither megatron-core nor the model.
"""

from __future__ import annotations

import base64
import io
import json
import os
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from qwen35_bridge.errors import ConversionError
from qwen35_bridge.megatron.shims import training_advice_silenced
from qwen35_bridge.paths import cache_root
from qwen35_bridge.versions import installed_megatron_core

if TYPE_CHECKING:
    from qwen35_bridge.bridge import BridgeBase

LAYOUT_VERSION = 2

#: megatron-core TransformerConfig fields that decide the language model's weights and forward: what
#: a trainer's own record of the model (Megatron-LM's args, Megatron-Bridge's run_config.yaml) is
#: written from and checked against.
ARCHITECTURE_FIELDS = (
    "num_layers",
    "hidden_size",
    "num_attention_heads",
    "num_query_groups",
    "kv_channels",
    "ffn_hidden_size",
    "normalization",
    "layernorm_epsilon",
    "layernorm_zero_centered_gamma",
    "gated_linear_unit",
    "add_bias_linear",
    "add_qkv_bias",
    "qk_layernorm",
    "attention_output_gate",
    "experimental_attention_variant",
    "linear_attention_freq",
    "linear_conv_kernel_dim",
    "linear_key_head_dim",
    "linear_value_head_dim",
    "linear_num_key_heads",
    "linear_num_value_heads",
    "num_moe_experts",
    "moe_layer_freq",
    "moe_router_topk",
    "moe_ffn_hidden_size",
    "moe_shared_expert_intermediate_size",
    "moe_shared_expert_gate",
    "moe_grouped_gemm",
    "moe_router_score_function",
    "moe_router_pre_softmax",
    "mtp_num_layers",
)


#: The DCP key of megatron-core's common (non-tensor) state: a ShardedObject `common_state` of shape
#: (1,) at offset (0,), a one-element list saved with torch.save.
COMMON_STATE_KEY = "common_state/shard_0_1"


def serialise_common_state(common: dict[str, Any]) -> bytes:
    """The common state's stored bytes, as megatron-core 0.19 stores it."""
    return _serialise(common)


@dataclass(frozen=True)
class Piece:
    """One chunk of checkpoint `key`: rows `rows` (all when None) of the Megatron tensor `param`
    (a bridge name), stored with shape `chunk_shape` at `offset` in a tensor of `global_shape`."""

    key: str
    param: str
    param_shape: tuple[int, ...]
    global_shape: tuple[int, ...]
    offset: tuple[int, ...]
    chunk_shape: tuple[int, ...]
    rows: tuple[int, int] | None


@dataclass
class Layout:
    pieces: list[Piece]
    objects: dict[str, bytes]  # serialised ShardedObjects (extra state, common state) by key
    config: str  # metadata.json
    architecture: dict[str, Any]  # the language model's ARCHITECTURE_FIELDS, as built

    def params(self) -> set[str]:
        return {p.param for p in self.pieces}

    def to_json(self) -> str:
        return json.dumps(
            {
                "pieces": [asdict(p) for p in self.pieces],
                "objects": {k: base64.b64encode(v).decode() for k, v in self.objects.items()},
                "config": self.config,
                "architecture": self.architecture,
            }
        )

    @classmethod
    def from_json(cls, text: str) -> Layout:
        data = json.loads(text)
        pieces = [
            Piece(**{k: tuple(v) if isinstance(v, list) else v for k, v in p.items()})
            for p in data["pieces"]
        ]
        objects = {k: base64.b64decode(v) for k, v in data["objects"].items()}
        return cls(pieces, objects, data["config"], data["architecture"])


@contextmanager
def meta_model(bridge: BridgeBase) -> Iterator[torch.nn.Module]:
    """The bridge's model at TP=PP=EP=1 on the meta device: its layout without its weights."""
    from qwen35_bridge.megatron.parallel import destroy_parallel, init_parallel

    parallel = init_parallel()
    try:
        with torch.device("meta"):
            model = bridge.build(**parallel)
        yield model
    finally:
        destroy_parallel()


def _walk(tree: Any, path: str = "") -> Iterator[tuple[str, Any]]:
    """(dotted path, leaf) of a nested state dict (dicts and lists, as factories build them)."""
    if isinstance(tree, Mapping):
        for name, value in tree.items():
            yield from _walk(value, f"{path}{name}.")
    elif isinstance(tree, (list, tuple)):
        for i, value in enumerate(tree):
            yield from _walk(value, f"{path}{i}.")
    else:
        yield path.rstrip("."), tree


def compute_layout(bridge: BridgeBase) -> Layout:
    """Megatron-core's checkpoint layout of the bridge's model, as data."""
    from megatron.core.dist_checkpointing.core import CheckpointingConfig
    from megatron.core.dist_checkpointing.mapping import (
        ShardedObject,
        ShardedTensor,
        ShardedTensorFactory,
    )
    from megatron.core.dist_checkpointing.utils import (
        extract_nonpersistent,
        extract_sharded_base,
    )

    with meta_model(bridge) as model:
        prefix = bridge.prefix_for(model)
        _, state = extract_nonpersistent(model.sharded_state_dict())
        sharded, common = extract_sharded_base(state)
        pieces: list[Piece] = []
        objects: dict[str, bytes] = {}
        for path, value in _walk(sharded):
            if isinstance(value, ShardedObject):
                objects[value.unique_key] = _serialise(value.data)
            elif isinstance(value, ShardedTensorFactory):
                pieces += _factory_pieces(prefix + path, value)
            elif isinstance(value, ShardedTensor):
                pieces.append(_piece(value, prefix + path, tuple(value.data.shape), None))
            else:
                raise ConversionError(
                    f"{path}: unexpected {type(value).__name__} in the sharded state dict"
                )
        objects[COMMON_STATE_KEY] = _serialise(common)
        architecture = _architecture(getattr(model, "language_model", model).config)
    config = json.dumps(asdict(CheckpointingConfig("torch_dist", 1)))  # as save_config writes it
    return Layout(pieces, objects, config, architecture)


def _architecture(config: Any) -> dict[str, Any]:
    """The config's ARCHITECTURE_FIELDS; `ffn_hidden_size` only where a layer has a dense MLP
    (megatron-core fills in 4 x hidden for a model of MoE layers, Megatron-LM another value: a
    size no weight has, which no trainer's record should be held to)."""
    architecture = {f: getattr(config, f) for f in ARCHITECTURE_FIELDS}
    frequency = config.moe_layer_freq
    all_moe = config.num_moe_experts and (
        frequency == 1 if isinstance(frequency, int) else 0 not in list(frequency)
    )
    if all_moe:
        del architecture["ffn_hidden_size"]
    return architecture


def _piece(
    sharded: Any, param: str, param_shape: tuple[int, ...], rows: tuple[int, int] | None
) -> Piece:
    chunk = (1,) * sharded.prepend_axis_num + tuple(sharded.local_shape)
    return Piece(
        sharded.key,
        param,
        param_shape,
        tuple(sharded.global_shape),
        tuple(sharded.global_offset),
        chunk,
        rows,
    )


def _factory_pieces(param: str, factory: Any) -> list[Piece]:
    """Which rows of the parameter each piece a factory builds holds, found by building it from a
    probe whose dim-0 index is its storage offset (slicing keeps that; anything else is refused)."""
    shape = tuple(factory.data.shape)
    probe = torch.arange(shape[0]).as_strided(shape, (1,) + (0,) * (len(shape) - 1))
    built = factory.build_fn(factory.key, probe, factory.replica_id, factory.flattened_range)
    pieces = []
    for _, sharded in _walk(built):
        data = sharded.data
        if (
            data.untyped_storage().data_ptr() != probe.untyped_storage().data_ptr()
            or data.stride()[0] != 1
            or tuple(data.shape[1:]) != shape[1:]
        ):
            raise ConversionError(
                f"{param}: megatron-core stores it in a way other than row slices; not supported"
            )
        start = data.storage_offset()
        pieces.append(_piece(sharded, param, shape, (start, start + data.shape[0])))
    return pieces


def _serialise(data: Any) -> bytes:
    """As megatron-core stores a ShardedObject: `torch.save([data])`, meta tensors made real."""
    buffer = io.BytesIO()
    torch.save([_real(data)], buffer)
    return buffer.getvalue()


def _real(data: Any) -> Any:
    if isinstance(data, torch.Tensor) and data.is_meta:
        return torch.empty(data.shape, dtype=data.dtype)
    if isinstance(data, Mapping):
        return {k: _real(v) for k, v in data.items()}
    if isinstance(data, list):
        return [_real(v) for v in data]
    return data


def _cache_folder() -> Path:
    return cache_root() / "torch_dist"


def layout(bridge: BridgeBase) -> Layout:
    """The bridge's layout, from the cache when this bridge (spec and target model class) and
    megatron-core release made it. Where this process is in a process group already (a
    distributed conversion, a training job), the model is built in a child process instead:
    building it needs megatron-core's parallel state, which would take that group over."""
    version = installed_megatron_core()
    name = f"{bridge.spec_sha256}-{bridge.target}-megatron-core-{version}-v{LAYOUT_VERSION}.json"
    path = _cache_folder() / name
    if path.is_file():
        return Layout.from_json(path.read_text())
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        computed = Layout.from_json(_compute_in_child(bridge))
    else:
        with training_advice_silenced():
            computed = compute_layout(bridge)
    staging = path.with_suffix(f".{os.getpid()}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        staging.write_text(computed.to_json())
        os.replace(staging, path)
    except OSError:  # a cache that cannot be written only costs the next run this derivation
        staging.unlink(missing_ok=True)
    return computed


def _compute_in_child(bridge: BridgeBase) -> str:
    """The bridge's layout as JSON, derived by a fresh Python process from the bridge's module."""
    import inspect
    import subprocess
    import sys

    import tempfile

    module = inspect.getfile(type(bridge))
    with tempfile.TemporaryDirectory() as folder:
        out = Path(folder) / "layout.json"
        child = subprocess.run(
            [sys.executable, "-c", _CHILD, module, str(out)],
            capture_output=True,
            text=True,
            env={k: v for k, v in os.environ.items() if k not in _PROCESS_GROUP_VARIABLES},
        )
        if child.returncode != 0 or not out.is_file():
            last = (child.stderr.strip().splitlines() or ["(no output)"])[-1]
            raise ConversionError(f"{module}: deriving its torch_dist layout failed ({last})")
        return out.read_text()


#: What torchrun tells a process; the child building the model must start a group of its own.
_PROCESS_GROUP_VARIABLES = (
    "RANK",
    "WORLD_SIZE",
    "LOCAL_RANK",
    "MASTER_ADDR",
    "MASTER_PORT",
    "TORCHELASTIC_USE_AGENT_STORE",
)
_CHILD = """
import importlib.util, sys
from qwen35_bridge.formats.torch_dist.layout import compute_layout
from qwen35_bridge.megatron.shims import training_advice_silenced
spec = importlib.util.spec_from_file_location("qwen35_bridge_layout_child", sys.argv[1])
module = importlib.util.module_from_spec(spec)
spec.loader.exec_module(module)
with training_advice_silenced():
    text = compute_layout(module.Bridge()).to_json()
open(sys.argv[2], "w").write(text)
"""


def by_key(pieces: list[Piece]) -> dict[str, list[Piece]]:
    keys: dict[str, list[Piece]] = {}
    for piece in pieces:
        keys.setdefault(piece.key, []).append(piece)
    return keys


def check_coverage(bridge: BridgeBase, found: set[str]) -> None:
    """The layout's tensors are exactly the bridge's (its language model's, for a text model)."""
    prefix = "" if bridge.is_vl else bridge.megatron_prefix
    expected = {name for name in bridge.megatron_shapes if name.startswith(prefix)}
    missing, extra = sorted(expected - found), sorted(found - expected)
    if missing:
        raise ConversionError(
            f"{missing[0]}: mapped by the bridge but not part of the torch_dist layout"
        )
    if extra:
        raise ConversionError(
            f"{extra[0]}: part of the torch_dist layout but not mapped by the bridge"
        )
