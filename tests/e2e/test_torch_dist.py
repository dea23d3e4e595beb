"""Megatron torch_dist checkpoints: written on CPU in megatron-core's layout (docs/reference.md sections 5
to 7), restored by megatron-core's own `dist_checkpointing.load` at TP=1, TP=2 and EP=2 with HF's
logits, and read back to HF bit for bit."""

from __future__ import annotations

import os
import pickle
import shutil
import subprocess
import sys
from functools import partial
from pathlib import Path

import pytest
import torch
from torch.distributed.checkpoint import FileSystemReader

from qwen35_bridge.formats.safetensors.reader import CheckpointReader
from qwen35_bridge.mapping.kinds import ConvertOptions
from qwen35_bridge.megatron.ranks import run_ranks
from qwen35_codegen import catalog
from qwen35_codegen.cli.main import main
from qwen35_codegen.registry.lookup import bridge_for_checkpoint
from tests.support import make_checkpoint, reference_mtp_logits
from tests.support.ranks import restore_and_run

TOLERANCE = 1e-4
VARIANTS = {
    "dense-text": ("Qwen/Qwen3.6-27B", {"text_only": True, "text_prefix": "model"}),
    "moe-text": (
        "Qwen/Qwen3.5-35B-A3B",
        {"text_only": True, "experts_layout": "packed", "mtp_experts_layout": "per_expert"},
    ),
    "qwen3-next": (
        "Qwen/Qwen3-Next-80B-A3B-Instruct",
        {"experts_layout": "per_expert", "mtp_experts_layout": "per_expert"},
    ),
}


@pytest.fixture(scope="module")
def convert_variant(tmp_path_factory):
    """Each variant converted once per module: (folder, HF checkpoint, spec)."""
    done = {}

    def convert(name: str):
        if name not in done:
            tmp = tmp_path_factory.mktemp(name)
            model_id, options = VARIANTS[name]
            checkpoint = make_checkpoint(
                tmp / "hf", catalog.entry(model_id).config, seed=13, **options
            )
            bridges = tmp / "bridges"
            args = [
                "convert",
                "hf-to-megatron",
                str(checkpoint.path),
                str(tmp / "dist"),
                "--format",
                "torch_dist",
                "--bridge-dir",
                str(bridges),
                "--quiet",
            ]
            assert main(args) == 0
            _bridge, spec, _ = bridge_for_checkpoint(
                checkpoint.path, bridge_dir=bridges, quiet=True
            )
            done[name] = (tmp, checkpoint, spec)
        return done[name]

    return convert


@pytest.fixture(params=sorted(VARIANTS))
def converted(request, convert_variant):
    return convert_variant(request.param)


def stored_shapes(directory: Path) -> dict[str, tuple[int, ...]]:
    metadata = FileSystemReader(str(directory)).read_metadata()
    return {k: tuple(v.size) for k, v in metadata.state_dict_metadata.items() if hasattr(v, "size")}


def test_layout_follows_megatron_cores_rules(converted) -> None:
    tmp, _checkpoint, spec = converted
    shapes = stored_shapes(tmp / "dist" / "release")
    g, a, h = spec.gdn, spec.attention, spec.hidden_size
    gdn_layer = spec.layer_types.index("gdn")
    base = f"decoder.layers.{gdn_layer}.self_attention."
    # GDN in_proj and conv1d: one tensor per section, TP-independent (docs/reference.md section 5).
    qk, v = g.num_key_heads * g.key_head_dim, g.num_value_heads * g.value_head_dim
    expected = {
        "query": qk,
        "key": qk,
        "value": v,
        "z": v,
        "beta": g.num_value_heads,
        "alpha": g.num_value_heads,
    }
    for section, rows in expected.items():
        assert shapes[f"{base}in_proj.weight.{section}"] == (rows, h)
    for section in ("query", "key", "value"):
        assert shapes[f"{base}conv1d.weight.{section}"] == (expected[section], 1, g.conv_kernel)
    assert f"{base}in_proj.weight" not in shapes
    # MTP: the inner layer is still called transformer_layer in 0.19.2 checkpoints (docs/reference.md section 7).
    assert not [k for k in shapes if "mtp_model_layer" in k]
    assert shapes["mtp.layers.0.transformer_layer.self_attention.linear_qkv.weight"] == (
        a.num_kv_heads * (2 * a.num_heads // a.num_kv_heads + 2) * a.head_dim,
        h,
    )
    # Routed experts stacked [E, ...] (docs/reference.md section 6), in the decoder and in MTP.
    if spec.moe:
        m = spec.moe
        for layer in ("decoder.layers.0.", "mtp.layers.0.transformer_layer."):
            assert shapes[f"{layer}mlp.experts.experts.linear_fc1.weight"] == (
                m.num_experts,
                2 * m.expert_intermediate_size,
                h,
            )
            assert shapes[f"{layer}mlp.experts.experts.linear_fc2.weight"] == (
                m.num_experts,
                h,
                m.expert_intermediate_size,
            )
        assert not [k for k in shapes if ".linear_fc1.weight0" in k]


def test_round_trip_is_bit_identical(converted) -> None:
    tmp, checkpoint, _spec = converted
    assert (
        main(
            [
                "convert",
                "megatron-to-hf",
                str(tmp / "dist"),
                str(tmp / "back"),
                "--bridge-dir",
                str(tmp / "bridges"),
                "--quiet",
                "--force",
            ]
        )
        == 0
    )
    with CheckpointReader(checkpoint.path) as original, CheckpointReader(tmp / "back") as back:
        assert back.names() == original.names()
        for name in original.names():
            a, b = original.get(name), back.get(name)
            assert a.dtype == b.dtype and torch.equal(a, b), name


RESTORES = [
    ("dense-text", {"tp": 1}),
    ("dense-text", {"tp": 2}),
    ("moe-text", {"tp": 1}),
    ("moe-text", {"ep": 2}),
    ("qwen3-next", {"tp": 2}),
]


@pytest.mark.parametrize(
    ("variant", "parallel"),
    RESTORES,
    ids=[f"{v}-{'-'.join(f'{k}{n}' for k, n in p.items())}" for v, p in RESTORES],
)
def test_megatron_core_restores_it_with_hf_logits(
    convert_variant, variant: str, parallel: dict
) -> None:
    tmp, checkpoint, spec = convert_variant(variant)
    ids = torch.randint(0, spec.vocab_size, (1, 80), generator=torch.Generator().manual_seed(3))
    model = checkpoint.model.eval()
    with torch.no_grad():
        expected, expected_mtp = model(input_ids=ids).logits, reference_mtp_logits(
            model, checkpoint.mtp, ids
        )
    world = max(parallel.values())
    results = run_ranks(
        partial(restore_and_run, **parallel),
        world,
        tmp / "dist" / "release",
        checkpoint.path,
        tmp / "bridges",
        ids,
    )
    for result in results:
        assert (result.logits - expected).abs().max().item() <= TOLERANCE
        assert (result.mtp_logits[0] - expected_mtp).abs().max().item() <= TOLERANCE


class _DCPChunks(torch.Tensor):
    """The reference: hands the same chunks to PyTorch DCP's own writer (checkpointable protocol)."""

    @staticmethod
    def __new__(cls, pieces, data, dtype):
        return torch.Tensor._make_wrapper_subclass(
            cls, torch.Size(pieces[0].global_shape), dtype=dtype
        )

    def __init__(self, pieces, data, dtype):
        self._pieces, self._data, self._dtype = (
            {torch.Size(p.offset): p for p in pieces},
            data,
            dtype,
        )

    def __create_write_items__(self, fqn, obj):
        from torch.distributed.checkpoint.metadata import (
            ChunkStorageMetadata,
            MetadataIndex,
            TensorProperties,
        )
        from torch.distributed.checkpoint.planner import (
            TensorWriteData,
            WriteItem,
            WriteItemType,
        )

        return [
            WriteItem(
                index=MetadataIndex(fqn, o),
                type=WriteItemType.SHARD,
                tensor_data=TensorWriteData(
                    ChunkStorageMetadata(o, torch.Size(p.chunk_shape)),
                    TensorProperties(dtype=self._dtype),
                    self.shape,
                ),
            )
            for o, p in self._pieces.items()
        ]

    def __create_chunk_list__(self):
        from torch.distributed.checkpoint.metadata import ChunkStorageMetadata

        return [ChunkStorageMetadata(o, torch.Size(p.chunk_shape)) for o, p in self._pieces.items()]

    def __get_tensor_shard__(self, index):
        return self._data(self._pieces[torch.Size(index.offset)])

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        raise NotImplementedError


def test_files_are_what_pytorch_dcp_writes(convert_variant, tmp_path: Path) -> None:
    """Our writer against DCP's own FileSystemWriter fed the same chunks: the data file byte for
    byte, and the Metadata field for field (but the random save id and the folder)."""
    import io
    import pickle

    from torch.distributed.checkpoint import DefaultSavePlanner, FileSystemWriter, save

    from qwen35_bridge.formats import torch_dist
    from qwen35_bridge.formats.torch_dist import writer
    from qwen35_bridge.formats.torch_dist.layout import by_key

    tmp, checkpoint, _spec = convert_variant("moe-text")
    bridge, _spec, _ = bridge_for_checkpoint(
        checkpoint.path, bridge_dir=tmp / "bridges", quiet=True
    )
    layout = torch_dist.layout(bridge)
    with CheckpointReader(checkpoint.path) as reader:
        megatron = {
            n: t
            for g in bridge.groups
            for n, t in g.to_megatron({h: reader.get(h) for h in g.hf}, ConvertOptions()).items()
        }

        class Planner(DefaultSavePlanner):
            def transform_object(self, write_item, object):  # noqa: A002
                return object

        def chunk_of(piece):
            full = megatron[piece.param]
            rows = full if piece.rows is None else full[piece.rows[0] : piece.rows[1]]
            return rows.reshape(piece.chunk_shape).contiguous()

        state = {
            k: _DCPChunks(ps, chunk_of, megatron[ps[0].param].dtype)
            for k, ps in by_key(layout.pieces).items()
        }
        state.update({k: io.BytesIO(v) for k, v in layout.objects.items()})
        (tmp_path / "dcp").mkdir()
        with writer.without_zip_crc32():  # as our writer writes
            # per_thread_copy_ahead=0: DCP's serial loader, which on a CUDA machine it would swap
            # for one that uses CUDA streams (the CPU backend runs megatron-core on the CPU).
            dcp_writer = FileSystemWriter(
                tmp_path / "dcp",
                single_file_per_rank=True,
                sync_files=False,
                thread_count=1,
                per_thread_copy_ahead=0,
            )
            save(
                state,
                storage_writer=dcp_writer,
                planner=Planner(flatten_state_dict=False),
                no_dist=True,
            )
        (tmp_path / "ours").mkdir()

        class Whole:  # every tensor written whole, as one chunk per layout piece
            def tensor(self, name, rows=None):
                return megatron[name] if rows is None else megatron[name][rows[0] : rows[1]]

            def split(self, name):
                return None

        torch_dist.write(bridge, tmp_path / "ours", Whole(), lambda n: megatron[n].dtype)
    assert (tmp_path / "ours" / torch_dist.DATA_FILE).read_bytes() == (
        tmp_path / "dcp" / torch_dist.DATA_FILE
    ).read_bytes()
    ours, theirs = (
        pickle.loads((tmp_path / d / ".metadata").read_bytes()) for d in ("ours", "dcp")
    )
    assert ours.state_dict_metadata == theirs.state_dict_metadata
    assert list(ours.state_dict_metadata) == list(theirs.state_dict_metadata)
    assert ours.storage_data == theirs.storage_data and [k.index for k in ours.storage_data] == [
        k.index for k in theirs.storage_data
    ]
    assert (ours.planner_data, ours.version) == (theirs.planner_data, theirs.version)
    assert ours.storage_meta.save_id != theirs.storage_meta.save_id  # random in both


def test_read_buffers_are_reused_only_when_no_tensor_holds_them() -> None:
    """Keys read from several chunks go into buffers kept for the next key; one that any tensor
    (a view, a numpy array of it) still uses must never be written over."""
    from qwen35_bridge.formats.buffers import ReadBuffers

    buffers = ReadBuffers()
    first = buffers.empty((4, 8), torch.bfloat16)
    first.fill_(1.5)
    address = first.data_ptr()
    held = first[1:].view(torch.uint8).numpy()  # what a writer holds while it writes
    del first
    second = buffers.empty((4, 8), torch.bfloat16)
    assert second.data_ptr() != address
    second.fill_(-2.0)
    assert torch.from_numpy(held).view(torch.bfloat16).eq(1.5).all()

    del held
    third = buffers.empty((2, 8), torch.bfloat16)
    assert third.data_ptr() == address  # free again: read into, not allocated
    assert third.shape == (2, 8) and third.is_contiguous()

    del third
    larger = buffers.empty((64, 8), torch.bfloat16)  # nothing free fits: the free one goes
    assert len(buffers._storages) == 2 and larger.data_ptr() not in (address, second.data_ptr())


def test_a_parameter_put_together_from_chunks_reuses_memory_no_tensor_uses(
    convert_variant,
) -> None:
    """A parameter whose pieces lie in several keys (GDN's in_proj: its q, k, v, z, b and a) is
    put together in memory a dropped one left, never in memory a tensor still uses: on these
    machines fresh memory costs more than the copy into it."""
    from qwen35_bridge.formats import torch_dist

    tmp, checkpoint, _spec = convert_variant("dense-text")
    bridge, _, _ = bridge_for_checkpoint(checkpoint.path, bridge_dir=tmp / "bridges", quiet=True)
    name = "decoder.layers.0.self_attention.in_proj.weight"
    with torch_dist.Reader(bridge, tmp / "dist" / "release") as reader:
        assert len(reader._pieces[name]) > 1  # put together, not read as it lies
        first = reader.get(name)
        expected = first.clone()
        second = reader.get(name)
        assert second.data_ptr() != first.data_ptr()
        second.zero_()
        assert torch.equal(first, expected)  # a live tensor's memory is never handed out

        del first, second
        third = reader.get(name)
        pooled = {s.data_ptr() for s in reader._records._buffers._storages}
        assert third.untyped_storage().data_ptr() in pooled
        assert torch.equal(third, expected)


def test_quiet_conversion_prints_nothing_even_when_it_derives_the_layout(
    convert_variant, tmp_path: Path
) -> None:
    """A fresh cache makes the conversion build the model on meta with megatron-core, whose
    import and build advise about training on GPUs; --quiet leaves both streams empty."""
    _tmp, checkpoint, _spec = convert_variant("moe-text")
    env = dict(os.environ, XDG_CACHE_HOME=str(tmp_path / "cache"))
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "qwen35_codegen",
            "convert",
            "hf-to-megatron",
            str(checkpoint.path),
            str(tmp_path / "dist"),
            "--format",
            "torch_dist",
            "--bridge-dir",
            str(tmp_path / "bridges"),
            "--quiet",
        ],
        capture_output=True,
        text=True,
        env=env,
    )
    assert result.returncode == 0, result.stderr
    assert list((tmp_path / "cache").rglob("*.json")), "the layout was not derived afresh"
    assert (result.stdout, result.stderr) == ("", "")


def _tampered(convert_variant, tmp_path: Path, edit) -> tuple[Path, Path]:
    """A copy of the moe-text torch_dist checkpoint with `edit(folder)` applied to it."""
    tmp, _checkpoint, _spec = convert_variant("moe-text")
    folder = tmp_path / "dist"
    shutil.copytree(tmp / "dist", folder)
    edit(folder / "release")
    return folder, tmp / "bridges"


def _edit_metadata(folder: Path, change) -> None:
    metadata = FileSystemReader(str(folder)).read_metadata()
    change(metadata.state_dict_metadata)
    with (folder / ".metadata").open("wb") as f:
        pickle.dump(metadata, f)


def _drop_a_chunk(entries) -> None:
    entries["decoder.final_layernorm.weight"].chunks.clear()


def _retype(entries) -> None:
    entries["decoder.final_layernorm.weight"].properties.dtype = torch.float16


def _shrink_a_chunk(entries) -> None:
    chunk = entries["decoder.final_layernorm.weight"].chunks[0]
    chunk.sizes = torch.Size([chunk.sizes[0] // 2])


def _truncate_data(folder: Path) -> None:
    data = next(folder.glob("*.distcp"))
    os.truncate(data, data.stat().st_size // 2)


FAULTS = {
    "chunk-list-emptied": (lambda f: _edit_metadata(f, _drop_a_chunk), "hold 0 of its"),
    "chunk-halved": (lambda f: _edit_metadata(f, _shrink_a_chunk), "of its"),
    "dtype-changed": (lambda f: _edit_metadata(f, _retype), ".metadata and the data disagree"),
    "data-file-deleted": (lambda f: next(f.glob("*.distcp")).unlink(), "cannot open"),
    "data-file-truncated": (_truncate_data, "decoder."),
}


@pytest.mark.parametrize("fault", sorted(FAULTS))
def test_a_tampered_checkpoint_is_refused_never_read_as_other_values(
    convert_variant, tmp_path: Path, capsys, fault: str
) -> None:
    """Uncovered regions would read as whatever memory held; retyped chunks as other values."""
    edit, message = FAULTS[fault]
    folder, bridges = _tampered(convert_variant, tmp_path, edit)
    args = ["convert", "megatron-to-hf", str(folder), str(tmp_path / "hf")]
    assert main([*args, "--bridge-dir", str(bridges), "--quiet"]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("codegen convert: error: ") and message in err, err
    assert not (tmp_path / "hf").exists() and not list(tmp_path.glob(".hf*"))
