"""Conversion spread over workers, and groups converted in parts.

`--workers N` runs N processes joined in a gloo group, as torchrun would start them: each converts
its share of the groups into files of its own (HF or Megatron shards, its own torch_dist data
file), and the output holds exactly the tensors a one-process run writes. A worker that fails
stops every worker, and nothing is left behind. With a small `--memory-budget`, packed experts and
large copied tensors convert in parts (experts, rows) with the same result, and a torch_dist
checkpoint written in row chunks restores in megatron-core with HF's logits.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess
import sys
from functools import partial
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch.distributed.checkpoint import FileSystemReader

from qwen35_bridge import offline
from qwen35_bridge.formats import torch_dist
from qwen35_bridge.formats.safetensors.reader import CheckpointReader
from qwen35_bridge.megatron.ranks import run_ranks
from qwen35_codegen import catalog
from qwen35_codegen.cli.main import main
from qwen35_codegen.registry.lookup import bridge_for_checkpoint
from tests.support import make_checkpoint, reference_mtp_logits
from tests.support.ranks import restore_and_run

MOE = "Qwen/Qwen3.5-35B-A3B"
TINY_BUDGET = "4KB"  # smaller than a packed expert tensor and the embedding of the tiny model


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    """A tiny MoE checkpoint (packed experts), and its one-process conversions."""
    root = tmp_path_factory.mktemp("distributed")
    checkpoint = make_checkpoint(
        root / "hf",
        catalog.entry(MOE).config,
        seed=21,
        text_only=True,
        experts_layout="packed",
        mtp_experts_layout="per_expert",
    )
    for fmt in ("safetensors", "torch_dist"):
        assert _convert("hf-to-megatron", checkpoint.path, root / fmt, root, "--format", fmt) == 0
    return root, checkpoint


def _convert(direction: str, src: Path, dst: Path, root: Path, *extra: str) -> int:
    args = ["convert", direction, str(src), str(dst), "--bridge-dir", str(root / "bridges")]
    return main([*args, "--quiet", "--max-shard-size", "200KB", *extra])


def _hf_tensors(folder: Path) -> dict[str, torch.Tensor]:
    with CheckpointReader(folder) as reader:
        return {n: reader.get(n).clone() for n in reader.names()}


def _megatron_tensors(folder: Path, root: Path, hf: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a Megatron checkpoint written by codegen convert, in either format."""
    if (folder / "release").is_dir():
        bridge, _spec, _ = bridge_for_checkpoint(hf, bridge_dir=root / "bridges", quiet=True)
        with torch_dist.Reader(bridge, folder / "release") as reader:
            return {n: reader.get(n).clone() for n in reader.names()}
    return _hf_tensors(folder)  # Megatron safetensors: the same reader


def _assert_same(found: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    assert found.keys() == expected.keys()
    for name, tensor in expected.items():
        assert found[name].dtype == tensor.dtype and torch.equal(found[name], tensor), name


CASES = [
    ("hf-to-megatron", "hf", "safetensors", 2),
    ("hf-to-megatron", "hf", "torch_dist", 3),
    ("megatron-to-hf", "torch_dist", None, 2),
    ("megatron-to-hf", "safetensors", None, 3),
]


@pytest.mark.parametrize(
    ("direction", "src", "fmt", "workers"),
    CASES,
    ids=[f"{d}-{s}-{f or 'hf'}-{w}" for d, s, f, w in CASES],
)
def test_workers_write_exactly_what_one_process_writes(
    source, tmp_path: Path, direction: str, src: str, fmt: str | None, workers: int
) -> None:
    root, checkpoint = source
    origin = checkpoint.path if src == "hf" else root / src
    extra = ["--format", fmt] if fmt else []
    out = tmp_path / "out"
    assert _convert(direction, origin, out, root, "--workers", str(workers), *extra) == 0
    if direction == "megatron-to-hf":
        _assert_same(_hf_tensors(out), _hf_tensors(checkpoint.path))
        index = json.loads((out / "model.safetensors.index.json").read_text())
        assert len(set(index["weight_map"].values())) == len(list(out.glob("*.safetensors")))
    else:
        expected = _megatron_tensors(root / fmt, root, checkpoint.path)
        _assert_same(_megatron_tensors(out, root, checkpoint.path), expected)
        if fmt == "torch_dist":  # each worker wrote a data file of its own
            files = sorted(p.name for p in (out / "release").glob("*.distcp"))
            assert files == [f"__{rank}_0.distcp" for rank in range(workers)]
    assert not list(tmp_path.glob(".out.partial-*"))


def test_a_layers_experts_are_read_into_one_buffer_and_stacked_without_a_copy(source) -> None:
    """Megatron stores each expert's fc1 as two chunks (gate rows, up rows) of one key per
    layer; reading the layer's experts together fills one buffer, which the packed HF tensor
    then views: no copy, and no fresh memory to fault in."""
    from qwen35_bridge.mapping.kinds import ConvertOptions

    root, checkpoint = source
    bridge, _spec, _ = bridge_for_checkpoint(
        checkpoint.path, bridge_dir=root / "bridges", quiet=True
    )
    name = "model.layers.0.mlp.experts.gate_up_proj"
    group = next(g for g in bridge.groups if name in g.hf)
    with torch_dist.Reader(bridge, root / "torch_dist" / "release") as reader:
        tensors = reader.get_many(list(group.megatron))
        assert len({t.untyped_storage().data_ptr() for t in tensors.values()}) == 1
        packed = group.to_hf(tensors, ConvertOptions())[name]
        assert (
            packed.untyped_storage().data_ptr()
            == next(iter(tensors.values())).untyped_storage().data_ptr()
        )
        assert torch.equal(packed, _hf_tensors(checkpoint.path)[name])


def test_the_codegen_command_forks_its_workers_and_writes_what_one_process_writes(
    source, tmp_path: Path
) -> None:
    """As its own process (as users run it) the command forks its workers from itself, torch
    already imported; inside this test session, which has threads, it spawns them instead."""
    root, checkpoint = source
    out = tmp_path / "out"
    args = ["convert", "hf-to-megatron", str(checkpoint.path), str(out), "--format", "torch_dist"]
    args += ["--bridge-dir", str(root / "bridges"), "--quiet", "--workers", "2"]
    probe = "import qwen35_codegen.cli.launch as l, sys; print(l._single_threaded())"
    assert subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True).stdout == (
        "True\n"
    )
    from qwen35_codegen.cli.launch import _single_threaded

    assert not _single_threaded()  # this session: the spawning path, which the tests above take
    done = subprocess.run(
        [sys.executable, "-m", "qwen35_codegen", *args], capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr
    expected = _megatron_tensors(root / "torch_dist", root, checkpoint.path)
    _assert_same(_megatron_tensors(out, root, checkpoint.path), expected)
    files = sorted(p.name for p in (out / "release").glob("*.distcp"))
    assert files == ["__0_0.distcp", "__1_0.distcp"]


def test_a_torch_dist_conversion_does_not_import_dcp(source, tmp_path: Path) -> None:
    """hf-to-megatron into torch_dist as its own process: importing torch.distributed.checkpoint
    costs about a second of CPU, and the writer needs none of it (metadata_pickle)."""
    root, checkpoint = source
    args = ["convert", "hf-to-megatron", str(checkpoint.path), str(tmp_path / "out")]
    args += ["--format", "torch_dist", "--bridge-dir", str(root / "bridges"), "--quiet"]
    script = (
        "import sys\n"
        "from qwen35_codegen.cli.main import main\n"
        f"assert main({args!r}) == 0\n"
        "assert 'torch.distributed.checkpoint' not in sys.modules, 'DCP was imported'\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    expected = _megatron_tensors(root / "torch_dist", root, checkpoint.path)
    _assert_same(_megatron_tensors(tmp_path / "out", root, checkpoint.path), expected)


@pytest.mark.parametrize(
    ("direction", "src", "fmt"),
    [
        ("hf-to-megatron", "hf", "safetensors"),
        ("hf-to-megatron", "hf", "torch_dist"),
        ("megatron-to-hf", "torch_dist", None),
        ("megatron-to-hf", "safetensors", None),
    ],
)
@pytest.mark.parametrize("rows", ["copied", "read"])
def test_parts_under_a_small_memory_budget_convert_exactly(
    source, tmp_path: Path, monkeypatch, direction: str, src: str, fmt: str | None, rows: str
) -> None:
    """Rows that only move are copied file to file, under any budget; read (as where the kernel
    cannot copy), the groups larger than the budget convert in parts."""
    if rows == "read":
        monkeypatch.setattr(offline, "stored_outputs", lambda *_args: None)
    root, checkpoint = source
    origin = checkpoint.path if src == "hf" else root / src
    extra = ["--format", fmt] if fmt else []
    out = tmp_path / "out"
    assert _convert(direction, origin, out, root, "--memory-budget", TINY_BUDGET, *extra) == 0
    if direction == "megatron-to-hf":
        _assert_same(_hf_tensors(out), _hf_tensors(checkpoint.path))
        return
    _assert_same(
        _megatron_tensors(out, root, checkpoint.path),
        _megatron_tensors(root / fmt, root, checkpoint.path),
    )
    if fmt == "torch_dist":  # the embedding went out in row chunks; megatron-core reads them
        metadata = FileSystemReader(str(out / "release")).read_metadata()
        chunks = metadata.state_dict_metadata["embedding.word_embeddings.weight"].chunks
        assert len(chunks) > 1
        ids = torch.randint(0, 256, (1, 80), generator=torch.Generator().manual_seed(2))
        model = checkpoint.model.eval()
        with torch.no_grad():
            expected = model(input_ids=ids).logits
            expected_mtp = reference_mtp_logits(model, checkpoint.mtp, ids)
        (result,) = run_ranks(
            partial(restore_and_run, tp=1),
            1,
            out / "release",
            checkpoint.path,
            root / "bridges",
            ids,
        )
        assert (result.logits - expected).abs().max().item() <= 1e-4
        assert (result.mtp_logits[0] - expected_mtp).abs().max().item() <= 1e-4


def test_a_failing_worker_stops_every_worker_and_leaves_nothing(
    source, tmp_path: Path, capfd
) -> None:
    """A NaN in a GDN norm fails the worker converting it; every worker stops, one line is
    printed, and neither the destination nor a staging folder remains, so the same command
    succeeds once the input is fixed."""
    root, checkpoint = source
    broken = tmp_path / "broken"
    shutil.copytree(checkpoint.path, broken)
    index = json.loads((broken / "model.safetensors.index.json").read_text())
    name = "model.layers.6.linear_attn.norm.weight"
    shard = broken / index["weight_map"][name]
    tensors = load_file(shard)
    original = tensors[name].clone()
    tensors[name][0] = float("nan")
    save_file(tensors, shard, metadata={"format": "pt"})
    out = tmp_path / "out"
    code = _convert("hf-to-megatron", broken, out, root, "--workers", "2")
    err = capfd.readouterr().err.strip().splitlines()  # the workers' stderr too
    assert code == 2 and len(err) == 1 and name in err[0] and "NaN" in err[0], err
    assert not out.exists() and not list(tmp_path.glob(".out.partial-*"))
    tensors[name] = original
    save_file(tensors, shard, metadata={"format": "pt"})
    assert _convert("hf-to-megatron", broken, out, root, "--workers", "2") == 0


def _convert_with_a_failing_read(checkpoint: Path, destination: Path, bridges: Path) -> str:
    """One worker of a `hf_to_megatron` spread over the ranks, whose last rank's disk fails
    (EIO) on the first tensor it reads or copies; returns the error this worker raised."""
    from qwen35_bridge.formats.record import Record
    from qwen35_bridge.formats.safetensors.reader import CheckpointReader as Reader
    from qwen35_bridge.workers import Workers

    import torch.distributed as dist

    bridge, spec, source = bridge_for_checkpoint(checkpoint, bridge_dir=bridges, quiet=True)
    rank, size = dist.get_rank(), dist.get_world_size()
    if rank == size - 1:

        def failing(self, names):
            raise OSError(errno.EIO, "Input/output error", str(self.directory))

        def failing_io(*_args):
            raise OSError(errno.EIO, "Input/output error")

        Reader.get_many = failing
        os.copy_file_range = failing_io  # rows copied into a file through the page cache
        os.preadv = failing_io  # rows read into a direct file's buffer
    record = Record(source.model_id, spec.fingerprint(), spec.to_dict(), type(bridge).__module__)
    try:
        offline.hf_to_megatron(
            bridge, checkpoint, destination, record=record, workers=Workers(rank, size)
        )
    except Exception as e:  # noqa: BLE001 - what each worker raised is the result
        return f"{type(e).__name__}: {e}"
    return "no error"


def test_a_worker_whose_disk_fails_stops_the_others(source, tmp_path: Path) -> None:
    root, checkpoint = source
    out = tmp_path / "out"
    results = run_ranks(_convert_with_a_failing_read, 2, checkpoint.path, out, root / "bridges")
    assert results[0].startswith("ConversionError: worker 1 of 2 failed:"), results
    assert "Input/output error" in results[0] and "Input/output error" in results[1]
    assert not out.exists() and not list(tmp_path.glob(".out.partial-*"))
