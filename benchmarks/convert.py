"""Conversion speed and memory against the I/O limit, measured in one run (not a test).

Builds a synthetic checkpoint of about 3 GB from a real catalog config: the real per-layer shapes
(hidden size, heads, GDN dims, expert and shared-expert sizes, one MTP layer), with fewer layers,
fewer experts and a smaller vocabulary so that it fits. Then times, each as a whole process (start
and imports included), with its input in the page cache and nothing else (no dirty pages, and
the page cache dropped first where the benchmark runs as root):

  baseline             read every tensor and write it unchanged (benchmarks/io_baseline.py)
  hf-to-megatron       --format safetensors and --format torch_dist
  megatron-to-hf       from each of those

in rounds of every case (after a warm-up round), medians of 3 rounds, and prints wall time,
GB/s, the ratio to the baseline, and each process's peak RSS.
The last line reads `worst ratio to baseline: R; peak RSS: G GB`.

    python benchmarks/convert.py [--model Qwen/Qwen3.5-35B-A3B] [--size-gb 3] [--work DIR]
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

# This process only starts the others: it imports no torch, so the peak RSS a child reports
# (which on Linux includes the image it was forked from) is the child's own.

REPO = Path(__file__).resolve().parent.parent
SHARD = "1GB"
LAYERS = 4  # one period of the schedule: 3 GDN + 1 gated attention
VOCAB = 32768


@dataclass(frozen=True)
class Measurement:
    name: str
    seconds: float
    peak_rss_bytes: int
    bytes_written: int


def synthetic_config(model_id: str, size_bytes: int) -> dict:
    """The catalog config, text-only, with LAYERS layers, a smaller vocabulary, and as many
    experts (a multiple of 8) as fit `size_bytes` in bf16."""
    sys.path.insert(0, str(REPO))  # the test factory (tests.support) is not installed
    from qwen35_codegen import catalog
    from tests.support import text_only_config

    config = text_only_config(copy.deepcopy(catalog.entry(model_id).config))
    config["num_hidden_layers"] = LAYERS
    if config.get("layer_types"):
        config["layer_types"] = config["layer_types"][:LAYERS]
    config["vocab_size"] = VOCAB
    if "num_experts" not in config:
        return config
    h, i = config["hidden_size"], config["moe_intermediate_size"]
    config["num_experts"] = 8
    base = _checkpoint_bytes(config)
    per_expert = 3 * i * h * 2 * (LAYERS + 1)  # bf16 gate, up, down in each decoder and MTP layer
    config["num_experts"] = max(8, (size_bytes - base) // per_expert // 8 * 8 + 8)
    config["num_experts_per_tok"] = min(config["num_experts_per_tok"], config["num_experts"])
    return config


def _bridge(config: dict):
    from qwen35_codegen.registry.lookup import bridge_for
    from qwen35_codegen.rendering.bridge_module import Origin
    from qwen35_codegen.spec import LayoutChoices, infer_spec

    spec = infer_spec(config, choices=LayoutChoices(experts="packed", mtp_experts="packed"))
    origin = Origin("benchmark", "synthetic", "n/a", None, "benchmarks/convert.py")
    bridge, _ = bridge_for(spec, "benchmark", origin)
    return bridge


def _checkpoint_bytes(config: dict) -> int:
    import torch

    return sum(2 * torch.Size(s).numel() for s in _bridge(config).hf_shapes.values())


def write_synthetic(config: dict, folder: Path) -> int:
    """Random bf16 tensors in the HF layout (GDN norm weights in [0.5, 2], as real ones)."""
    import torch

    from qwen35_bridge.formats.safetensors.writer import (
        Planned,
        StreamingWriter,
        plan_shards,
        write_index,
    )

    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    bridge = _bridge(config)
    planned = [
        Planned(name, torch.bfloat16, tuple(shape)) for name, shape in bridge.hf_shapes.items()
    ]
    writer = StreamingWriter(folder, plan_shards(planned, 1000**3), opener=None)
    generator = torch.Generator().manual_seed(0)
    for p in planned:
        if p.name.endswith("linear_attn.norm.weight"):
            tensor = (torch.rand(p.shape, generator=generator) * 1.5 + 0.5).to(torch.bfloat16)
        else:
            tensor = (
                torch.randn(p.shape, generator=generator, dtype=torch.float32)
                .mul_(0.02)
                .to(torch.bfloat16)
            )
        writer.write(p.name, tensor)
    writer.close()
    write_index(folder, writer.weight_map, writer.bytes_written)
    return writer.bytes_written


WARM_IMPORTS = (
    "import torch, safetensors.torch, torch.distributed.checkpoint, qwen35_codegen.cli.convert"
)


def settle(env: dict[str, str]) -> None:
    """No dirty pages pending and, where allowed (root), a page cache holding only the libraries
    every process imports: otherwise each run pays for writing back or evicting what the runs
    before it wrote, by different amounts."""
    os.sync()
    try:
        Path("/proc/sys/vm/drop_caches").write_text("1\n")
    except OSError:
        return
    subprocess.run([sys.executable, "-c", WARM_IMPORTS], env=env, check=True, capture_output=True)


def run(command: list[str], env: dict[str, str]) -> tuple[float, int]:
    """Wall seconds and peak RSS (bytes) of one process."""
    start = time.perf_counter()
    process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(process.pid, 0)
    seconds = time.perf_counter() - start
    if status != 0:
        raise RuntimeError(f"{' '.join(command)} failed:\n{process.stderr.read().decode()[-3000:]}")
    return seconds, usage.ru_maxrss * 1024


def folder_bytes(folder: Path) -> int:
    return sum(
        p.stat().st_size
        for p in folder.rglob("*")
        if p.is_file() and p.suffix in {".safetensors", ".distcp"}
    )


@dataclass(frozen=True)
class Case:
    name: str
    command: list[str]
    source: Path
    output: Path
    keep: bool  # its output is the source of a later case


def warm(folder: Path) -> None:
    """Read every file of `folder` so that it is in the page cache (cheap when it already is)."""
    for path in folder.rglob("*"):
        if path.is_file():
            with path.open("rb") as f:
                while f.read(64 << 20):
                    pass


def measure_all(cases: list[Case], env: dict[str, str], repeats: int) -> list[Measurement]:
    """Rounds of every case in turn (a warm-up round first), so that the baseline and the
    conversions meet the same state of the machine; medians over the rounds. Outputs no later
    case reads are deleted at once, so that they do not push the sources out of the page cache."""
    times: dict[str, list[float]] = {c.name: [] for c in cases}
    peaks: dict[str, int] = {c.name: 0 for c in cases}
    sizes: dict[str, int] = {}
    for round_number in range(repeats + 1):
        for case in cases:
            shutil.rmtree(case.output, ignore_errors=True)
            settle(env)
            warm(case.source)
            seconds, peak = run(case.command, env)
            sizes[case.name] = folder_bytes(case.output)
            if not case.keep:
                shutil.rmtree(case.output, ignore_errors=True)
            if round_number:  # round 0 warms the page cache, the bridge and the layout caches
                times[case.name].append(seconds)
                peaks[case.name] = max(peaks[case.name], peak)
    return [
        Measurement(c.name, statistics.median(times[c.name]), peaks[c.name], sizes[c.name])
        for c in cases
    ]


def make_checkpoint(model_id: str, size_gb: float, folder: Path) -> None:
    """The child process that writes the synthetic checkpoint; prints what it made as JSON."""
    import torch

    config = synthetic_config(model_id, int(size_gb * 1e9))
    total = write_synthetic(config, folder)
    largest_group = max(
        sum(2 * torch.Size(s).numel() for s in g.hf.values()) for g in _bridge(config).groups
    )
    print(
        json.dumps(
            {
                "bytes": total,
                "largest_group": largest_group,
                "experts": config.get("num_experts", 0),
                "layers": config["num_hidden_layers"],
                "vocab": config["vocab_size"],
            }
        )
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="Qwen/Qwen3.5-35B-A3B")
    parser.add_argument("--size-gb", type=float, default=3.0)
    parser.add_argument(
        "--work", type=Path, help="folder for the checkpoints (default: a temporary one)"
    )
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--make-checkpoint", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.make_checkpoint:
        return make_checkpoint(args.model, args.size_gb, args.make_checkpoint)

    work = args.work or Path(tempfile.mkdtemp(prefix="codegen-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "XDG_CACHE_HOME": str(work / "cache"), "TORCHDYNAMO_DISABLE": "1"}
    source = work / "hf"
    shutil.rmtree(source, ignore_errors=True)
    made = subprocess.run(
        [
            sys.executable,
            __file__,
            "--make-checkpoint",
            str(source),
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
    largest_group = info["largest_group"]
    print(
        f"synthetic checkpoint from {args.model}: {info['bytes'] / 1e9:.2f} GB, {info['layers']} layers + 1 MTP, "
        f"{info['experts']} experts, vocab {info['vocab']}; largest group {largest_group / 1e9:.3f} GB"
    )

    codegen = [sys.executable, "-m", "qwen35_codegen", "convert"]
    common = ["--quiet", "--max-shard-size", SHARD]
    megatron, dist = work / "meg", work / "dist"
    cases = [
        Case(
            "I/O baseline",
            [
                sys.executable,
                str(REPO / "benchmarks" / "io_baseline.py"),
                str(source),
                str(work / "baseline"),
            ],
            source,
            work / "baseline",
            False,
        ),
        Case(
            "hf-to-megatron safetensors",
            [*codegen, "hf-to-megatron", str(source), str(megatron), *common],
            source,
            megatron,
            True,
        ),
        Case(
            "hf-to-megatron torch_dist",
            [*codegen, "hf-to-megatron", str(source), str(dist), "--format", "torch_dist", *common],
            source,
            dist,
            True,
        ),
        Case(
            "megatron-to-hf from safetensors",
            [*codegen, "megatron-to-hf", str(megatron), str(work / "back"), *common],
            megatron,
            work / "back",
            False,
        ),
        Case(
            "megatron-to-hf from torch_dist",
            [*codegen, "megatron-to-hf", str(dist), str(work / "back2"), *common],
            dist,
            work / "back2",
            False,
        ),
    ]
    results = measure_all(cases, env, args.repeats)
    baseline = results[0]
    print()
    print(f"{'conversion':34} {'wall s':>7} {'GB/s':>6} {'ratio':>6} {'peak RSS GB':>12}")
    for m in results:
        print(
            f"{m.name:34} {m.seconds:7.2f} {m.bytes_written / m.seconds / 1e9:6.2f} {m.seconds / baseline.seconds:6.2f} {m.peak_rss_bytes / 1e9:12.2f}"
        )
    conversions = results[1:]
    worst = max(m.seconds / baseline.seconds for m in conversions)
    peak = max(m.peak_rss_bytes for m in conversions)
    print(f"RSS bound (1.5 GB + largest group): {(1.5e9 + largest_group) / 1e9:.2f} GB")
    print(f"worst ratio to baseline: {worst:.2f}; peak RSS: {peak / 1e9:.2f} GB")


if __name__ == "__main__":
    main()
