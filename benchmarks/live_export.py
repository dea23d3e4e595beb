"""Live-export speed: `iter_hf` on a loaded megatron-core model, against a plain `state_dict()`
copy of the same model in the same run (not a test).

Builds a synthetic checkpoint from a real catalog config (real head structure, 4 layers, packed
experts, the hidden and expert sizes below), loads it into the model at TP=1 and at TP=2 (two gloo
ranks on this machine), and times, median of 3 after a warm-up:

  state_dict copy      every parameter of this rank's shard cloned (the cost floor: no gather)
  iter_hf packed       the whole model under HF names, packed experts, on every rank
  iter_hf per_expert   the same, experts one by one, in 256 MB buckets

and prints seconds, GB/s of HF bytes streamed, and each ratio to the state_dict copy.

    python benchmarks/live_export.py [--model Qwen/Qwen3.5-35B-A3B] [--work DIR]
"""

from __future__ import annotations

import argparse
import collections
import statistics
import sys
import tempfile
import time
from functools import partial
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
ROUNDS = 3
BUCKET = 256 * 2**20


def make_model_checkpoint(model_id: str, folder: Path) -> Path:
    import torch

    from qwen35_codegen import catalog
    from tests.support import TinyDims, make_checkpoint

    dims = TinyDims(
        hidden_size=1024,
        head_dim=128,
        linear_key_head_dim=128,
        linear_value_head_dim=128,
        intermediate_size=2048,
        moe_intermediate_size=512,
        shared_expert_intermediate_size=512,
        vocab_size=8192,
    )
    config = catalog.entry(model_id).config
    checkpoint = make_checkpoint(
        folder,
        config,
        seed=0,
        text_only=True,
        experts=32,
        periods=1,
        dims=dims,
        shards=4,
        experts_layout="packed",
        mtp_experts_layout="packed",
        dtype=torch.bfloat16,
    )
    return checkpoint.path


def measure_rank(hf_dir: Path, bridge_dir: Path, *, tp: int) -> dict[str, list[float]]:
    """On each rank: the model at `tp`, then timed rounds of each case."""
    import torch

    from qwen35_bridge.megatron.parallel import destroy_parallel, init_parallel
    from qwen35_codegen.registry.lookup import bridge_for_checkpoint

    bridge, _, _ = bridge_for_checkpoint(hf_dir, bridge_dir=bridge_dir, quiet=True)
    parallel = init_parallel(tp)
    try:
        model = bridge.build_model(params_dtype=torch.bfloat16, **parallel)
        bridge.load_hf(model, hf_dir)
        cases = {
            "state_dict copy": lambda: {
                k: v.detach().clone()
                for k, v in model.state_dict().items()
                if v is not None and torch.is_tensor(v)
            },
            "iter_hf packed": lambda: collections.deque(bridge.iter_hf(model), maxlen=0),
            "iter_hf per_expert": lambda: collections.deque(
                bridge.iter_hf(model, experts="per_expert", bucket_bytes=BUCKET), maxlen=0
            ),
        }
        times: dict[str, list[float]] = {name: [] for name in cases}
        for round_ in range(ROUNDS + 1):
            for name, case in cases.items():
                torch.distributed.barrier()
                start = time.perf_counter()
                case()
                torch.distributed.barrier()
                if round_:  # the first round warms up
                    times[name].append(time.perf_counter() - start)
        hf_bytes = sum(t.numel() * t.element_size() for _, t in bridge.iter_hf(model))
        times["hf_bytes"] = [float(hf_bytes)]
    finally:
        destroy_parallel()
    return times


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="Qwen/Qwen3.5-35B-A3B")
    parser.add_argument("--work", type=Path, default=None)
    args = parser.parse_args()
    sys.path.insert(0, str(REPO))  # the test factory (tests.support) is not installed
    from qwen35_bridge.megatron.ranks import run_ranks
    from qwen35_codegen.registry.lookup import bridge_for_checkpoint

    with tempfile.TemporaryDirectory(dir=args.work) as work:
        hf_dir = make_model_checkpoint(args.model, Path(work) / "hf")
        bridge_dir = Path(work) / "bridges"
        bridge_for_checkpoint(hf_dir, bridge_dir=bridge_dir, quiet=True)
        for tp in (1, 2):
            times = run_ranks(partial(measure_rank, tp=tp), tp, hf_dir, bridge_dir)[0]
            hf_bytes = times.pop("hf_bytes")[0]
            baseline = statistics.median(times["state_dict copy"])
            print(f"TP={tp}: model {hf_bytes / 1e9:.2f} GB under HF names (bf16)")
            for name, samples in times.items():
                seconds = statistics.median(samples)
                print(
                    f"  {name:<20} {seconds:7.3f} s  {hf_bytes / seconds / 1e9:6.2f} GB/s  "
                    f"ratio {seconds / baseline:5.2f}"
                )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
