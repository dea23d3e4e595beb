"""Every fault gives one clear error naming the file and the tensor, a non-zero exit, and no
destination at all (nothing partial that looks like a checkpoint)."""

from __future__ import annotations

import errno
import json
import os
import re
import resource
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from qwen35_bridge import offline
from qwen35_bridge.errors import ConversionError
from qwen35_bridge.formats.record import Record
from qwen35_codegen import catalog
from qwen35_codegen.cli.main import main
from qwen35_codegen.registry.lookup import bridge_for_checkpoint
from tests.support import make_checkpoint

INDEX = "model.safetensors.index.json"
# A record for runtime calls that stop before writing it (the content is never read).
RECORD = Record(model_id="test/tiny", spec_sha256="", spec={}, bridge_module="")


@pytest.fixture(scope="module")
def pristine(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("pristine")
    config = catalog.entry("Qwen/Qwen3.5-35B-A3B").config
    return make_checkpoint(
        tmp / "hf",
        config,
        seed=21,
        text_only=True,
        experts_layout="packed",
        mtp_experts_layout="per_expert",
    ).path


@pytest.fixture
def source(pristine: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "hf"
    shutil.copytree(pristine, copy)
    return copy


def index_of(folder: Path) -> dict:
    return json.loads((folder / INDEX).read_text())


def shard_of(folder: Path, tensor: str) -> Path:
    return folder / index_of(folder)["weight_map"][tensor]


def rewrite_shard(path: Path, edit) -> None:
    tensors = load_file(path)
    edit(tensors)
    save_file(tensors, path, metadata={"format": "pt"})


def _convert(source: Path, destination: Path, tmp_path: Path, *extra: str) -> int:
    args = ["convert", "hf-to-megatron", str(source), str(destination), "--quiet", *extra]
    return main([*args, "--bridge-dir", str(tmp_path / "bridges")])


def convert_fails(
    source: Path, tmp_path: Path, capsys, *fragments: str, args: tuple[str, ...] = ()
) -> None:
    destination = tmp_path / "out"
    code = _convert(source, destination, tmp_path, *args)
    err = capsys.readouterr().err
    assert code == 2, err
    assert len(err.strip().splitlines()) == 1, err
    for fragment in fragments:
        assert fragment in err, f"{fragment!r} not in {err!r}"
    assert not destination.exists()
    assert not [
        p for p in tmp_path.iterdir() if p.name.startswith(".out.partial")
    ], "a staging folder was left behind"


GATE = "model.layers.3.mlp.shared_expert.gate_proj.weight"
Z = "model.layers.0.linear_attn.in_proj_z.weight"
NORM = "model.layers.0.linear_attn.norm.weight"


def test_truncated_shard(source, tmp_path, capsys):
    shard = shard_of(source, GATE)
    shard.write_bytes(shard.read_bytes()[:-1000])
    convert_fails(source, tmp_path, capsys, str(shard), "truncated or corrupt")


def test_corrupt_header(source, tmp_path, capsys):
    shard = shard_of(source, GATE)
    data = bytearray(shard.read_bytes())
    data[8:40] = b"\x00" * 32
    shard.write_bytes(bytes(data))
    convert_fails(source, tmp_path, capsys, str(shard), "truncated or corrupt")


def test_index_names_a_missing_shard(source, tmp_path, capsys):
    index = index_of(source)
    index["weight_map"][GATE] = "model-00009-of-00009.safetensors"
    (source / INDEX).write_text(json.dumps(index))
    convert_fails(
        source, tmp_path, capsys, "model-00009-of-00009.safetensors", "does not exist", GATE
    )


def test_index_names_a_tensor_its_shard_lacks(source, tmp_path, capsys):
    rewrite_shard(shard_of(source, GATE), lambda ts: ts.pop(GATE))
    convert_fails(source, tmp_path, capsys, GATE, "lacks tensor", str(shard_of(source, GATE)))


def test_shard_holds_a_tensor_the_index_does_not_list(source, tmp_path, capsys):
    rewrite_shard(
        shard_of(source, GATE),
        lambda ts: ts.update({"model.layers.0.stray.weight": torch.zeros(2)}),
    )
    convert_fails(
        source, tmp_path, capsys, "model.layers.0.stray.weight", "the index does not list it"
    )


def test_tensor_in_two_shards(source, tmp_path, capsys):
    shards = sorted(set(index_of(source)["weight_map"].values()))
    other = next(s for s in shards if source / s != shard_of(source, GATE))
    rewrite_shard(source / other, lambda ts: ts.update({GATE: torch.zeros(2)}))
    convert_fails(source, tmp_path, capsys, GATE, "duplicate tensor")


def test_missing_tensor(source, tmp_path, capsys):
    rewrite_shard(shard_of(source, GATE), lambda ts: ts.pop(GATE))
    index = index_of(source)
    del index["weight_map"][GATE]
    (source / INDEX).write_text(json.dumps(index))
    convert_fails(source, tmp_path, capsys, GATE, "missing from the HF checkpoint")


def test_unexpected_tensor(source, tmp_path, capsys):
    extra = "model.layers.0.mlp.experts.extra_bias"
    rewrite_shard(shard_of(source, GATE), lambda ts: ts.update({extra: torch.zeros(2)}))
    index = index_of(source)
    index["weight_map"][extra] = index["weight_map"][GATE]
    (source / INDEX).write_text(json.dumps(index))
    convert_fails(source, tmp_path, capsys, extra, "unexpected tensor", "not in the bridge")


def test_wrong_shape(source, tmp_path, capsys):
    rewrite_shard(shard_of(source, GATE), lambda ts: ts.update({GATE: ts[GATE][:-1].clone()}))
    convert_fails(source, tmp_path, capsys, GATE, "shape", "but the bridge expects")


def test_wrong_dtype_within_a_group(source, tmp_path, capsys):
    rewrite_shard(shard_of(source, Z), lambda ts: ts.update({Z: ts[Z].to(torch.float16)}))
    convert_fails(source, tmp_path, capsys, Z, "torch.float16", "different dtypes")


def test_inexact_norm_shift_stops_unless_accepted(source, tmp_path, capsys):
    rewrite_shard(
        shard_of(source, NORM), lambda ts: ts.update({NORM: torch.full_like(ts[NORM], 3e-8)})
    )
    convert_fails(source, tmp_path, capsys, NORM, "not exact")
    assert _convert(source, tmp_path / "out", tmp_path, "--accept-norm-rounding") == 0


def test_existing_destination_needs_force(source, tmp_path, capsys):
    destination = tmp_path / "out"
    destination.mkdir()
    (destination / "keep.txt").write_text("mine")
    assert _convert(source, destination, tmp_path) == 2
    assert "already exists; pass --force" in capsys.readouterr().err
    assert (destination / "keep.txt").read_text() == "mine"
    assert _convert(source, destination, tmp_path, "--force") == 0
    assert not (destination / "keep.txt").exists() and (destination / INDEX).is_file()


class FullDisk:
    """A file that accepts `room` bytes in all, then fails as a full disk does."""

    room = 200_000

    def __init__(self, path: Path) -> None:
        self._file = open(path, "wb")  # noqa: SIM115 - closed by the writer

    def write(self, data) -> int:
        size = memoryview(data).nbytes
        if size > FullDisk.room:
            raise OSError(errno.ENOSPC, "No space left on device")
        FullDisk.room -= size
        return self._file.write(data)

    def flush(self) -> None:
        self._file.flush()

    def close(self) -> None:
        self._file.close()


def test_full_disk_leaves_nothing(source, tmp_path):
    bridge, _spec, _ = bridge_for_checkpoint(source, bridge_dir=tmp_path / "bridges", quiet=True)
    destination = tmp_path / "out"
    with pytest.raises(
        ConversionError,
        match=r"model-\d{5}-of-\d{5}\.safetensors: cannot write tensor .*No space left on device",
    ):
        offline.hf_to_megatron(
            bridge, source, destination, record=RECORD, max_shard_bytes=400_000, opener=FullDisk
        )
    assert not destination.exists() and not list(tmp_path.glob(".out.partial*"))


@pytest.mark.parametrize(
    ("output_format", "message"),
    # a direct file (formats/direct.py) meets the limit where it writes its buffer: at the end
    [
        ("safetensors", r"cannot (write tensor .*|finish writing )\(File too large\)"),
        ("torch_dist", r"cannot write it( \(File too large\)|.*the write stopped short)"),
    ],
)
def test_file_size_limit_in_a_real_process(source, tmp_path, output_format, message):
    """The real command under RLIMIT_FSIZE: writes fail with EFBIG, as on a full disk."""

    def limit() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (300_000, 300_000))

    destination = tmp_path / "out"
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "qwen35_codegen",
            "convert",
            "hf-to-megatron",
            str(source),
            str(destination),
            "--bridge-dir",
            str(tmp_path / "bridges"),
            "--quiet",
            "--max-shard-size",
            "1MB",
            "--format",
            output_format,
        ],
        capture_output=True,
        text=True,
        preexec_fn=limit,
    )
    assert result.returncode == 2, result.stderr
    error = result.stderr.strip().splitlines()[-1]
    assert error.startswith("codegen convert: error: ") and re.search(message, error), error
    assert not destination.exists() and not list(tmp_path.glob(".out.partial*"))


def test_fp8_scale_faults(tmp_path, capsys):
    config = catalog.entry("Qwen/Qwen3-Next-80B-A3B-Instruct-FP8").config
    path = make_checkpoint(
        tmp_path / "fp8", config, seed=4, experts_layout="per_expert", dtype=torch.bfloat16
    ).path
    weight = "model.layers.0.mlp.shared_expert.down_proj.weight"
    scale = weight + "_scale_inv"
    shard = shard_of(path, scale)
    original = shard.read_bytes()
    rewrite_shard(shard, lambda ts: ts.update({scale: ts[scale][:, :-1].clone()}))
    convert_fails(path, tmp_path, capsys, scale, "expected")
    shard.write_bytes(original)
    rewrite_shard(shard, lambda ts: ts.pop(scale))
    index = index_of(path)
    del index["weight_map"][scale]
    (path / INDEX).write_text(json.dumps(index))
    convert_fails(path, tmp_path, capsys, weight, "float8 weight without its scale")
    shard.write_bytes(original)
    (path / INDEX).write_text(
        json.dumps(index_of(path) | {"weight_map": index["weight_map"] | {scale: shard.name}})
    )
    rewrite_shard(shard, lambda ts: ts.update({scale: ts[scale].to(torch.int32)}))
    convert_fails(path, tmp_path, capsys, scale, "torch.int32", "float32 or bfloat16")


@pytest.mark.parametrize(
    "dtype", [torch.int32, torch.bool, torch.float8_e4m3fn, torch.float8_e5m2], ids=str
)
def test_a_weight_that_is_not_a_float_weight(source, tmp_path, capsys, dtype):
    """Alone in its group (so no group dtype check could catch it), stored as is on the way."""
    rewrite_shard(shard_of(source, NORM), lambda ts: ts.update({NORM: ts[NORM].to(dtype)}))
    convert_fails(source, tmp_path, capsys, NORM, str(dtype), "a weight is float32")


def test_shards_in_a_subfolder_are_read_from_there(source, tmp_path, capsys):
    """The index's paths name the files; a same-named file elsewhere in the folder is not one."""
    index = index_of(source)
    (source / "sub").mkdir()
    decoy = {}
    for shard in sorted(set(index["weight_map"].values())):
        shutil.move(source / shard, source / "sub" / shard)
        decoy[shard] = {
            k: torch.zeros_like(v) for k, v in load_file(source / "sub" / shard).items()
        }
        save_file(decoy[shard], source / shard, metadata={"format": "pt"})
    index["weight_map"] = {k: f"sub/{v}" for k, v in index["weight_map"].items()}
    (source / INDEX).write_text(json.dumps(index))
    assert _convert(source, tmp_path / "m", tmp_path) == 0
    common = ["--bridge-dir", str(tmp_path / "bridges"), "--quiet"]
    assert (
        main(["convert", "megatron-to-hf", str(tmp_path / "m"), str(tmp_path / "back"), *common])
        == 0
    )
    back = {}
    for shard in set(index_of(tmp_path / "back")["weight_map"].values()):
        back |= load_file(tmp_path / "back" / shard)
    original = {}
    for shard in set(index["weight_map"].values()):
        original |= load_file(source / shard)
    assert back.keys() == original.keys()
    assert all(torch.equal(back[k], original[k]) for k in original)


def test_index_naming_a_shard_outside_the_folder(source, tmp_path, capsys):
    index = index_of(source)
    index["weight_map"][GATE] = "../elsewhere.safetensors"
    (source / INDEX).write_text(json.dumps(index))
    convert_fails(
        source, tmp_path, capsys, "../elsewhere.safetensors", "outside the checkpoint folder"
    )


# -- The Megatron side's record and HF config -----------------------------------------------------


@pytest.fixture(scope="module")
def converted_pristine(pristine: Path, tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("megatron")
    args = ["convert", "hf-to-megatron", str(pristine), str(tmp / "m"), "--quiet"]
    assert main([*args, "--bridge-dir", str(tmp / "bridges")]) == 0
    return tmp / "m"


def _edit_json(path: Path, edit) -> None:
    data = json.loads(path.read_text())
    edit(data)
    path.write_text(json.dumps(data))


def _reseal(record: dict) -> None:
    """An edit that also recomputes the record's own checksum."""
    from qwen35_codegen.spec import ModelSpec

    record["spec_sha256"] = ModelSpec.from_dict(record["spec"]).fingerprint()


def _edited_spec_resealed(record: dict) -> None:
    gdn = record["spec"]["gdn"]
    gdn["num_value_heads"], gdn["num_key_heads"] = gdn["num_key_heads"], gdn["num_value_heads"]
    _reseal(record)


RECORD_FAULTS = {
    "spec-edited": (
        "codegen.json",
        lambda r: r["spec"].update(family="llama"),
        "does not match its spec_sha256",
    ),
    "spec-edited-and-resealed": ("codegen.json", _edited_spec_resealed, "describes another model"),
    "bad-layout": (
        "codegen.json",
        lambda r: (r["spec"].update(experts_layout="bogus"), _reseal(r)),
        "expected packed or per_expert",
    ),
    "unknown-format": ("codegen.json", lambda r: r.update(format="foo"), "unknown format 'foo'"),
    "no-spec": ("codegen.json", lambda r: r.pop("spec"), "no spec"),
    "hf-config-edited": (
        "hf_config.json",
        lambda c: c.update(hidden_size=128),
        "describes another model",
    ),
}


@pytest.mark.parametrize("fault", sorted(RECORD_FAULTS))
def test_a_tampered_record_or_hf_config_is_refused(
    converted_pristine: Path, tmp_path: Path, capsys, fault: str
) -> None:
    """A record that lies would convert one model's tensors with another's layout rules."""
    file, edit, message = RECORD_FAULTS[fault]
    megatron = tmp_path / "m"
    shutil.copytree(converted_pristine, megatron)
    _edit_json(megatron / file, edit)
    destination = tmp_path / "back"
    code = main(["convert", "megatron-to-hf", str(megatron), str(destination), "--quiet"])
    err = capsys.readouterr().err
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1, err
    assert not destination.exists()


def test_a_record_that_is_not_json(converted_pristine: Path, tmp_path: Path, capsys) -> None:
    megatron = tmp_path / "m"
    shutil.copytree(converted_pristine, megatron)
    (megatron / "codegen.json").write_text("{")
    assert main(["convert", "megatron-to-hf", str(megatron), str(tmp_path / "b"), "--quiet"]) == 2
    assert "codegen.json: not valid JSON" in capsys.readouterr().err


def test_export_stops_where_the_norm_shift_back_rounds(
    converted_pristine: Path, tmp_path: Path, capsys
) -> None:
    """A Megatron norm g (trained, say) may hold values g + 1 cannot: exporting must not round
    them silently."""
    megatron = tmp_path / "m"
    shutil.copytree(converted_pristine, megatron)
    name = "decoder.layers.0.self_attention.out_norm.weight"
    rewrite_shard(shard_of(megatron, name), lambda ts: ts[name].__setitem__(0, 3e-8))
    args = ["convert", "megatron-to-hf", str(megatron), str(tmp_path / "hf"), "--quiet"]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert f"{name}: g + 1 is not exact" in err and "--accept-norm-rounding" in err, err
    assert not (tmp_path / "hf").exists()
    assert main([*args, "--accept-norm-rounding"]) == 0


# -- Destinations and signals ---------------------------------------------------------------------


def test_force_never_replaces_the_source_or_a_folder_holding_it(source, tmp_path, capsys):
    files = sorted(p.name for p in source.iterdir())
    for destination in (source, source.parent):
        assert _convert(source, destination, tmp_path, "--force") == 2
        assert "is or holds the source" in capsys.readouterr().err
    assert sorted(p.name for p in source.iterdir()) == files


def test_force_replaces_only_a_folder(source, tmp_path, capsys):
    (tmp_path / "file").write_text("not a checkpoint")
    (tmp_path / "link").symlink_to(tmp_path / "elsewhere")
    for name in ("file", "link"):
        assert _convert(source, tmp_path / name, tmp_path, "--force") == 2
        assert "exists and is not a folder" in capsys.readouterr().err
    assert (tmp_path / "file").read_text() == "not a checkpoint"
    assert not [p for p in tmp_path.iterdir() if ".partial" in p.name]


def test_a_destination_that_cannot_be_made(source, tmp_path, capsys):
    (tmp_path / "file").write_text("")
    assert _convert(source, tmp_path / "file" / "out", tmp_path) == 2
    err = capsys.readouterr().err
    assert err.startswith("codegen convert: error: ") and "cannot create it here" in err, err


def test_the_output_folder_follows_the_umask(source, tmp_path):
    previous = os.umask(0o022)
    try:
        assert _convert(source, tmp_path / "out", tmp_path) == 0
    finally:
        os.umask(previous)
    assert (tmp_path / "out").stat().st_mode & 0o777 == 0o755


def test_a_terminated_conversion_leaves_nothing(source, tmp_path, capsys, monkeypatch):
    """SIGTERM (kill, timeout, a batch scheduler) arrives while the output is being written."""
    copy = offline.keep_hf_files

    def copy_then_terminate(src: Path, staging: Path) -> None:
        copy(src, staging)
        assert list(staging.iterdir()), "the staging folder holds output when the signal comes"
        os.kill(os.getpid(), signal.SIGTERM)

    monkeypatch.setattr(offline, "keep_hf_files", copy_then_terminate)
    assert _convert(source, tmp_path / "out", tmp_path) == 128 + signal.SIGTERM
    assert capsys.readouterr().err.strip() == "codegen convert: error: terminated"
    assert not (tmp_path / "out").exists()
    assert not [p for p in tmp_path.iterdir() if ".partial" in p.name]
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL, "the handler is put back"


def test_a_config_with_a_byte_order_mark_converts_both_ways(source, tmp_path):
    config = (source / "config.json").read_text()
    (source / "config.json").write_bytes(config.encode("utf-8-sig"))
    assert _convert(source, tmp_path / "m", tmp_path) == 0
    args = ["convert", "megatron-to-hf", str(tmp_path / "m"), str(tmp_path / "back"), "--quiet"]
    assert main(args) == 0
    assert json.loads((tmp_path / "back" / "config.json").read_bytes()) == json.loads(config)


def test_a_modelopt_checkpoint_is_refused_before_any_tensor_is_read(source, tmp_path, capsys):
    """The same tensors with ModelOpt's marker: its layout would be converted wrongly, so the
    command line and the runtime's own loader both stop, naming the format."""
    marker = {"producer": {"name": "modelopt"}, "quantization": {"quant_algo": "NVFP4"}}
    (source / "hf_quant_config.json").write_text(json.dumps(marker))
    convert_fails(source, tmp_path, capsys, "NVIDIA ModelOpt NVFP4 checkpoint")
    from qwen35_bridge.formats.safetensors.reader import CheckpointReader

    with pytest.raises(ConversionError, match="ModelOpt NVFP4"):
        CheckpointReader(source)
