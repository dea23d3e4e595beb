"""A trainer's checkpoint back to HF: does its optimizer state cost anything? (Not a test.)

Builds, from a synthetic checkpoint with a real catalog config's per-layer shapes (see
benchmarks/convert.py), three trainer's checkpoints of the same model and times `codegen convert
megatron-to-hf --hf-config` of each as a whole process, with its peak RSS:

  torch_dist, weights only       the iteration folder hf-to-megatron writes, without its record
  torch_dist + optimizer state   the same model tensors beside Adam's moments and fp32 master
                                 weights under `optimizer.state.*` (3 x 4 bytes per weight), in one
                                 DCP checkpoint, as megatron-core's optimizer saves them
  legacy torch + optimizer state one `model_optim_rng.pt` with the model's state dict, the
                                 optimizer's (the same moments) and args, as Megatron-LM's legacy
                                 format saves a TP=1 run

Each conversion reads only the model's tensors, so its time and memory should follow the model's
size, not the file's. Cases run in rounds (a warm-up round, then the median of 3), each after
`sync` and, as root, a dropped page cache with the inputs read back in. The last line reads
`optimizer state: time x T, peak RSS x R (worst of the two formats against weights only)`.

    python benchmarks/training_export.py [--model Qwen/Qwen3.5-35B-A3B] [--size-gb 1] [--work DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from convert import REPO, Case, measure_all  # noqa: E402  (benchmarks/ is not a package)

OPTIMIZER_STATES = ("exp_avg", "exp_avg_sq", "fp32_param")


def make_checkpoints(model_id: str, size_gb: float, work: Path) -> dict:
    """The child process that writes the HF checkpoint and the three trainer's checkpoints."""
    import torch
    from torch.distributed.checkpoint import FileSystemReader, FileSystemWriter, load, save

    from convert import synthetic_config, write_synthetic
    from qwen35_codegen.cli.main import main as codegen

    hf = work / "hf"
    config = synthetic_config(model_id, int(size_gb * 1e9))
    model_bytes = write_synthetic(config, hf)
    converted = work / "converted"
    assert (
        codegen(
            [
                "convert",
                "hf-to-megatron",
                str(hf),
                str(converted),
                "--format",
                "torch_dist",
                "--quiet",
            ]
        )
        == 0
    )
    weights_only = work / "weights-only" / "iter_0000001"
    shutil.copytree(converted / "release", weights_only)
    (work / "weights-only" / "latest_checkpointed_iteration.txt").write_text("1")

    # torch_dist + optimizer state: every model tensor, and three fp32 tensors beside each.
    metadata = FileSystemReader(str(weights_only)).read_metadata()
    tensors = {
        key: torch.empty(tuple(entry.size), dtype=entry.properties.dtype)
        for key, entry in metadata.state_dict_metadata.items()
        if hasattr(entry, "size")
    }
    load(tensors, storage_reader=FileSystemReader(str(weights_only)), no_dist=True)
    state: dict = dict(tensors)
    generator = torch.Generator().manual_seed(1)
    for key, tensor in tensors.items():
        for name in OPTIMIZER_STATES:
            state[f"optimizer.state.{name}.{key}"] = torch.randn(
                tensor.shape, generator=generator, dtype=torch.float32
            )
    with_optimizer = work / "with-optimizer" / "iter_0000001"
    save(state, storage_writer=FileSystemWriter(str(with_optimizer)), no_dist=True)
    (work / "with-optimizer" / "latest_checkpointed_iteration.txt").write_text("1")
    del state

    # Legacy torch + optimizer state: the model's state dict (TP=1, Megatron names) and Adam's.
    megatron = work / "megatron-safetensors"
    assert codegen(["convert", "hf-to-megatron", str(hf), str(megatron), "--quiet"]) == 0
    from qwen35_bridge.formats.safetensors.reader import CheckpointReader

    with CheckpointReader(megatron) as reader:
        model = {name: reader.get(name).clone() for name in sorted(reader.names())}
    optimizer = {
        "state": {
            i: {name: torch.randn(t.shape, generator=generator) for name in OPTIMIZER_STATES[:2]}
            for i, t in enumerate(model.values())
        },
        "param_groups": [{"params": list(range(len(model))), "lr": 1e-4}],
    }
    legacy = work / "legacy" / "iter_0000001" / "mp_rank_00"
    legacy.mkdir(parents=True)
    torch.save(
        {
            "args": argparse.Namespace(
                tensor_model_parallel_size=1, pipeline_model_parallel_size=1
            ),
            "checkpoint_version": 3.0,
            "iteration": 1,
            "model": model,
            "optimizer": optimizer,
        },
        legacy / "model_optim_rng.pt",
    )
    (work / "legacy" / "latest_checkpointed_iteration.txt").write_text("1")
    return {"model_bytes": model_bytes, "experts": config.get("num_experts", 0)}


def folder_size(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="Qwen/Qwen3.5-35B-A3B")
    parser.add_argument("--size-gb", type=float, default=1.0)
    parser.add_argument("--work", type=Path)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--make-checkpoints", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.make_checkpoints:
        print(json.dumps(make_checkpoints(args.model, args.size_gb, args.make_checkpoints)))
        return

    work = args.work or Path(tempfile.mkdtemp(prefix="codegen-training-bench-"))
    for name in (
        "hf",
        "converted",
        "weights-only",
        "with-optimizer",
        "megatron-safetensors",
        "legacy",
    ):
        shutil.rmtree(work / name, ignore_errors=True)
    work.mkdir(parents=True, exist_ok=True)
    env = {
        **os.environ,
        "XDG_CACHE_HOME": str(work / "cache"),
        "TORCHDYNAMO_DISABLE": "1",
        "PYTHONPATH": f"{REPO}{os.pathsep}{REPO / 'benchmarks'}",
    }
    made = subprocess.run(
        [
            sys.executable,
            __file__,
            "--make-checkpoints",
            str(work),
            "--model",
            args.model,
            "--size-gb",
            str(args.size_gb),
        ],
        env=env,
        check=True,
        capture_output=True,
        text=True,
    )
    info = json.loads(made.stdout.strip().splitlines()[-1])
    sizes = {n: folder_size(work / n) for n in ("weights-only", "with-optimizer", "legacy")}
    print(
        f"synthetic model from {args.model}: {info['model_bytes'] / 1e9:.2f} GB in bf16, "
        f"{info['experts']} experts; checkpoints: "
        + ", ".join(f"{n} {b / 1e9:.2f} GB" for n, b in sizes.items())
    )
    codegen = [sys.executable, "-m", "qwen35_codegen", "convert", "megatron-to-hf"]
    common = ["--hf-config", str(work / "hf"), "--quiet", "--max-shard-size", "1GB"]
    cases = [
        Case(
            label,
            [*codegen, str(work / source), str(work / f"out-{source}"), *common],
            work / source,
            work / f"out-{source}",
            False,
        )
        for label, source in (
            ("torch_dist, weights only", "weights-only"),
            ("torch_dist + optimizer state", "with-optimizer"),
            ("legacy torch + optimizer state", "legacy"),
        )
    ]
    results = measure_all(cases, env, args.repeats)
    base = results[0]
    print()
    print(
        f"{'megatron-to-hf of':32} {'file GB':>8} {'wall s':>7} {'ratio':>6} {'peak RSS GB':>12} {'ratio':>6}"
    )
    for m, source in zip(results, ("weights-only", "with-optimizer", "legacy")):
        print(
            f"{m.name:32} {sizes[source] / 1e9:8.2f} {m.seconds:7.2f} {m.seconds / base.seconds:6.2f} "
            f"{m.peak_rss_bytes / 1e9:12.2f} {m.peak_rss_bytes / base.peak_rss_bytes:6.2f}"
        )
    time_ratio = max(m.seconds / base.seconds for m in results[1:])
    rss_ratio = max(m.peak_rss_bytes / base.peak_rss_bytes for m in results[1:])
    print(
        f"optimizer state: time x {time_ratio:.2f}, peak RSS x {rss_ratio:.2f} (worst of the two formats against weights only)"
    )


if __name__ == "__main__":
    main()
