"""Conversion speed and memory against the I/O limit, measured in one run (not a test).

For each shape, builds a synthetic checkpoint from a real catalog config with its real per-layer
shapes (hidden size, heads, GDN dims, expert and shared-expert sizes, one MTP layer):

  dense   Qwen3.5-4B: 16 layers, its full vocabulary, about 4 GB
  moe     Qwen3.5-35B-A3B: 4 layers, a 32768 vocabulary, packed experts filling about 4 GB

and times, each as a whole process (start and imports included), with its input in the page
cache and nothing else (no dirty pages, and the page cache dropped first where the benchmark runs
as root):

  baseline             read every tensor and write it unchanged (benchmarks/io_baseline.py)
  hf-to-megatron       --format safetensors and --format torch_dist, with 1 and 2 workers
  megatron-to-hf       from each of those, with 1 and 2 workers (from Megatron checkpoints
                       made once beforehand, untimed)

in rounds of every case (after a warm-up round), medians of 5 rounds, and prints wall time,
GB/s, the ratio to the baseline, the ratio of 2 workers to 1 (of the medians, and round by
round, as the two ran back to back, in turns first), and each process's peak RSS (a worker's,
with 2). Then, unless `--big-expert-gb 0`, converts a checkpoint whose one packed expert tensor
is that large (4 GB: one MoE layer of 1024 experts, no MTP) both ways in both formats under the
default memory budget and prints each conversion's peak RSS. `--outputs` puts the
conversions' outputs on another filesystem than their sources (a second disk, or tmpfs, where
writing costs memory rather than the disk's time).
The last line reads `worst ratio to baseline: R; more workers / one worker: W; peak RSS: G GB`.

    python benchmarks/convert.py [--shapes dense,moe] [--size-gb 4] [--workers 1,2] [--work DIR]
                                 [--outputs DIR]
"""

from __future__ import annotations

import argparse
import copy
import itertools
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
MOE_LAYERS = 4  # one period of the schedule: 3 GDN + 1 gated attention
DENSE_LAYERS = 16
VOCAB = 32768
SHAPES = {"dense": "Qwen/Qwen3.5-4B", "moe": "Qwen/Qwen3.5-35B-A3B"}
CODEGEN_CONVERT = [sys.executable, "-m", "qwen35_codegen", "convert"]
COMMON = ["--quiet", "--max-shard-size", SHARD]
FORMATS = ("safetensors", "torch_dist")


@dataclass(frozen=True)
class Measurement:
    name: str
    rounds: list[float]  # wall seconds, one per round
    peak_rss_bytes: int
    bytes_written: int

    @property
    def seconds(self) -> float:
        return statistics.median(self.rounds)


def _text_config(model_id: str) -> dict:
    sys.path.insert(0, str(REPO))  # the test factory (tests.support) is not installed
    from qwen35_codegen import catalog
    from tests.support import text_only_config

    return text_only_config(copy.deepcopy(catalog.entry(model_id).config))


def _layers(config: dict, count: int) -> None:
    config["num_hidden_layers"] = count
    if config.get("layer_types"):
        period = config["layer_types"][:4]
        config["layer_types"] = (period * count)[:count]


def synthetic_config(model_id: str, size_bytes: int) -> dict:
    """The catalog config, text-only: a dense model keeps its vocabulary and has DENSE_LAYERS
    layers; an MoE model has MOE_LAYERS layers, a smaller vocabulary, and as many experts (a
    multiple of 8) as fit `size_bytes` in bf16."""
    config = _text_config(model_id)
    if "num_experts" not in config:
        _layers(config, DENSE_LAYERS)
        return config
    _layers(config, MOE_LAYERS)
    config["vocab_size"] = VOCAB
    h, i = config["hidden_size"], config["moe_intermediate_size"]
    config["num_experts"] = 8
    base = _checkpoint_bytes(config)
    per_expert = 3 * i * h * 2 * (MOE_LAYERS + 1)  # bf16 gate, up, down in each layer and MTP
    config["num_experts"] = max(8, (size_bytes - base) // per_expert // 8 * 8 + 8)
    config["num_experts_per_tok"] = min(config["num_experts_per_tok"], config["num_experts"])
    return config


def big_expert_config(packed_bytes: int) -> dict:
    """One gated-attention MoE layer whose packed gate_up_proj alone is `packed_bytes` in bf16
    (Qwen3.5-35B-A3B's per-expert shapes, experts added), no MTP layer."""
    config = _text_config("Qwen/Qwen3.5-35B-A3B")
    config["num_hidden_layers"] = 1
    config["layer_types"] = ["full_attention"]
    config["mtp_num_hidden_layers"] = 0
    config["vocab_size"] = VOCAB
    h, i = config["hidden_size"], config["moe_intermediate_size"]
    config["num_experts"] = -(-packed_bytes // (2 * i * h * 2))
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


def warm(folder: Path) -> None:
    """Read every file of `folder` so that it is in the page cache (cheap when it already is)."""
    for path in folder.rglob("*"):
        if path.is_file():
            with path.open("rb") as f:
                while f.read(64 << 20):
                    pass


def conversion_of(name: str) -> str:
    """The conversion a case's name is for, without its number of workers (`..., 2w`)."""
    return name.rsplit(", ", 1)[0]


def round_order(cases: list[Case], round_number: int) -> list[Case]:
    """The cases of one round: a conversion's runs with different numbers of workers follow each
    other, in reverse order every other round, so that none always finds the machine as the
    same other run left it."""
    ordered: list[Case] = []
    for _, group in itertools.groupby(cases, key=lambda c: conversion_of(c.name)):
        runs = list(group)
        ordered += runs[::-1] if round_number % 2 else runs
    return ordered


def measure_all(cases: list[Case], env: dict[str, str], repeats: int) -> list[Measurement]:
    """Rounds of every case (a warm-up round first), so that the baseline and the conversions
    meet the same state of the machine; medians over the rounds. Every output is deleted right
    after its run, as none is read again: a case whose output is deleted just before its own run
    writes into what that frees, others do not. With outputs on tmpfs, one-worker hf-to-megatron
    runs whose outputs were kept (as megatron-to-hf's sources) that way took 0.37-0.42 of two
    workers' time: likely, memory freed a moment before had not yet gone back to the host."""
    times: dict[str, list[float]] = {c.name: [] for c in cases}
    peaks: dict[str, int] = {c.name: 0 for c in cases}
    sizes: dict[str, int] = {}
    for round_number in range(repeats + 1):
        for case in round_order(cases, round_number):
            shutil.rmtree(case.output, ignore_errors=True)
            settle(env)
            warm(case.source)
            seconds, peak = run(case.command, env)
            sizes[case.name] = folder_bytes(case.output)
            shutil.rmtree(case.output, ignore_errors=True)
            if round_number:  # round 0 warms the page cache, the bridge and the layout caches
                times[case.name].append(seconds)
                peaks[case.name] = max(peaks[case.name], peak)
    return [Measurement(c.name, times[c.name], peaks[c.name], sizes[c.name]) for c in cases]


def make_checkpoint(kind: str, size_gb: float, folder: Path) -> None:
    """The child process that writes a synthetic checkpoint (`kind`: a shape, or `big-expert`);
    prints what it made as JSON."""
    import torch

    if kind == "big-expert":
        config = big_expert_config(int(size_gb * 1e9))
    else:
        config = synthetic_config(SHAPES[kind], int(size_gb * 1e9))
    total = write_synthetic(config, folder)
    groups = _bridge(config).groups
    sizes = [sum(2 * torch.Size(s).numel() for s in g.hf.values()) for g in groups]
    print(
        json.dumps(
            {
                "bytes": total,
                "largest_group": max(sizes),
                "experts": config.get("num_experts", 0),
                "layers": config["num_hidden_layers"],
                "vocab": config["vocab_size"],
            }
        )
    )


def _make(kind: str, size_gb: float, folder: Path, env: dict[str, str]) -> dict:
    shutil.rmtree(folder, ignore_errors=True)
    made = subprocess.run(
        [
            sys.executable,
            __file__,
            "--make-checkpoint",
            str(folder),
            "--kind",
            kind,
            "--size-gb",
            str(size_gb),
        ],
        env=env,
        check=True,
        capture_output=True,
        text=True,
    )
    return json.loads(made.stdout.strip().splitlines()[-1])


def megatron_sources(source: Path, work: Path, env: dict[str, str]) -> dict[str, Path]:
    """The Megatron checkpoints megatron-to-hf is timed from, one per format, converted from
    `source` once (untimed)."""
    made = {}
    for fmt in FORMATS:
        made[fmt] = work / f"megatron-{fmt}"
        shutil.rmtree(made[fmt], ignore_errors=True)
        command = ["hf-to-megatron", str(source), str(made[fmt]), "--format", fmt]
        subprocess.run([*CODEGEN_CONVERT, *command, *COMMON], env=env, check=True)
    return made


def conversion_cases(
    source: Path, megatron: dict[str, Path], outputs: Path, workers: list[int]
) -> list[Case]:
    """The baseline, then each conversion with each number of workers, writing into
    `outputs`."""
    baseline = [sys.executable, str(REPO / "benchmarks" / "io_baseline.py")]
    cases = [
        Case(
            "I/O baseline",
            [*baseline, str(source), str(outputs / "baseline")],
            source,
            outputs / "baseline",
        )
    ]
    for fmt in FORMATS:
        for n in workers:
            out = outputs / f"{fmt}-{n}"
            command = ["hf-to-megatron", str(source), str(out), "--format", fmt]
            cases.append(
                Case(
                    f"hf-to-megatron {fmt}, {n}w",
                    [*CODEGEN_CONVERT, *command, "--workers", str(n), *COMMON],
                    source,
                    out,
                )
            )
    for fmt in FORMATS:
        for n in workers:
            out = outputs / f"back-{fmt}-{n}"
            command = ["megatron-to-hf", str(megatron[fmt]), str(out)]
            cases.append(
                Case(
                    f"megatron-to-hf from {fmt}, {n}w",
                    [*CODEGEN_CONVERT, *command, "--workers", str(n), *COMMON],
                    megatron[fmt],
                    out,
                )
            )
    return cases


def report(shape: str, results: list[Measurement]) -> tuple[float, float]:
    """Print one shape's table; its worst ratio to the baseline and worst ratio of a conversion
    with more workers to the same conversion with one."""
    baseline = results[0]
    print(f"{'conversion':38} {'wall s':>7} {'GB/s':>6} {'ratio':>6} {'peak RSS GB':>12}")
    for m in results:
        print(
            f"{m.name:38} {m.seconds:7.2f} {m.bytes_written / m.seconds / 1e9:6.2f} "
            f"{m.seconds / baseline.seconds:6.2f} {m.peak_rss_bytes / 1e9:12.2f}"
        )
    conversions = results[1:]
    worst = max(m.seconds / baseline.seconds for m in conversions)
    by_name = {m.name: m for m in conversions}
    spread = []
    for m in conversions:
        one = by_name.get(conversion_of(m.name) + ", 1w")
        if m.name.endswith(", 1w") or one is None:
            continue
        ratio = m.seconds / one.seconds
        spread.append(ratio)
        # Each round ran the two back to back (in turns first): their ratio round by round shows
        # how far apart single conversions land, which the ratio of medians alone hides.
        paired = sorted(many / single for many, single in zip(m.rounds, one.rounds, strict=True))
        print(
            f"  {m.name} / 1w: {ratio:.2f} (medians); round by round "
            + " ".join(f"{r:.2f}" for r in paired)
        )
    print(
        f"{shape}: worst ratio to baseline {worst:.2f}; more workers / one worker, worst {max(spread, default=1):.2f}"
    )
    return worst, max(spread, default=1.0)


def big_expert(work: Path, env: dict[str, str], size_gb: float) -> int:
    """Each conversion of the big-expert checkpoint once, under the default memory budget; the
    highest peak RSS."""
    info = _make("big-expert", size_gb, work / "big-hf", env)
    print(
        f"\nbig packed expert: {info['bytes'] / 1e9:.2f} GB, one layer of {info['experts']} experts; "
        f"its packed gate_up_proj alone {info['largest_group'] / 1e9:.2f} GB"
    )
    steps = [
        (
            "hf-to-megatron torch_dist",
            [
                "hf-to-megatron",
                str(work / "big-hf"),
                str(work / "big-dist"),
                "--format",
                "torch_dist",
            ],
        ),
        (
            "megatron-to-hf from torch_dist",
            ["megatron-to-hf", str(work / "big-dist"), str(work / "big-back")],
        ),
        (
            "hf-to-megatron safetensors",
            ["hf-to-megatron", str(work / "big-hf"), str(work / "big-meg")],
        ),
        (
            "megatron-to-hf from safetensors",
            ["megatron-to-hf", str(work / "big-meg"), str(work / "big-back2")],
        ),
    ]
    peak = 0
    for name, args in steps:
        settle(env)
        seconds, rss = run([*CODEGEN_CONVERT, *args, *COMMON], env)
        peak = max(peak, rss)
        print(f"{name:38} {seconds:7.2f} s  peak RSS {rss / 1e9:.2f} GB")
    for name in ("big-hf", "big-dist", "big-back", "big-meg", "big-back2"):
        shutil.rmtree(work / name, ignore_errors=True)
    return peak


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--shapes", default="dense,moe", help="comma-separated: dense, moe")
    parser.add_argument("--size-gb", type=float, default=4.0)
    parser.add_argument("--workers", default="1,2", help="comma-separated worker counts")
    parser.add_argument("--big-expert-gb", type=float, default=4.3)
    parser.add_argument(
        "--work", type=Path, help="folder for the checkpoints (default: a temporary one)"
    )
    parser.add_argument(
        "--outputs",
        type=Path,
        help="folder for the conversions' outputs (default: --work), e.g. on another filesystem",
    )
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--make-checkpoint", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--kind", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.make_checkpoint:
        return make_checkpoint(args.kind, args.size_gb, args.make_checkpoint)

    work = args.work or Path(tempfile.mkdtemp(prefix="codegen-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    if args.outputs:
        args.outputs.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "XDG_CACHE_HOME": str(work / "cache"), "TORCHDYNAMO_DISABLE": "1"}
    workers = [int(n) for n in args.workers.split(",")]
    worst, spread = 0.0, 0.0
    for shape in args.shapes.split(","):
        source = work / f"{shape}-hf"
        info = _make(shape, args.size_gb, source, env)
        print(
            f"\n{shape}: synthetic checkpoint from {SHAPES[shape]}: {info['bytes'] / 1e9:.2f} GB, "
            f"{info['layers']} layers + 1 MTP, {info['experts']} experts, vocab {info['vocab']}; "
            f"largest group {info['largest_group'] / 1e9:.3f} GB"
        )
        megatron = megatron_sources(source, work, env)
        cases = conversion_cases(source, megatron, args.outputs or work, workers)
        results = measure_all(cases, env, args.repeats)
        shape_worst, shape_spread = report(shape, results)
        worst, spread = max(worst, shape_worst), max(spread, shape_spread)
        for folder in (source, *megatron.values()):
            shutil.rmtree(folder, ignore_errors=True)
    peak = big_expert(work, env, args.big_expert_gb) if args.big_expert_gb else 0
    if peak:
        print(f"big packed expert: peak RSS {peak / 1e9:.2f} GB (bound 2.5 GB)")
    print(
        f"worst ratio to baseline: {worst:.2f}; more workers / one worker: {spread:.2f}; "
        f"peak RSS: {peak / 1e9:.2f} GB"
    )


if __name__ == "__main__":
    main()
