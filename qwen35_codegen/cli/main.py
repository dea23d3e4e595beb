"""`codegen` command line. Each verb imports what it needs, so generating never imports torch."""

from __future__ import annotations

import argparse
import atexit
import json
import os
import re
import signal
import sys
import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import NoReturn

from qwen35_bridge.errors import BridgeError
from qwen35_bridge.targets import DEFAULT_TARGET, TARGETS
from qwen35_codegen.cli.heap import settled_heap
from qwen35_codegen.errors import CodegenError

LAYOUTS = ("packed", "per_expert")
HF_PREFIXES = ("model.", "model.language_model.")
DIRECTIONS = ("hf-to-megatron", "megatron-to-hf", "gpt-to-hybrid", "hybrid-to-gpt")


def _add_source_options(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "ref", help="catalog:ID, a local directory or config.json, or a hub id (owner/name)"
    )
    p.add_argument("--index", type=Path, help="model.safetensors.index.json to read layouts from")
    p.add_argument("--experts", choices=LAYOUTS, help="decoder experts layout, when no index says")
    p.add_argument(
        "--mtp-experts", choices=LAYOUTS, help="MTP experts layout, when no index or catalog says"
    )
    p.add_argument(
        "--hf-prefix", choices=HF_PREFIXES, help="HF prefix of a text-only Qwen3.5 checkpoint"
    )


def _request(args: argparse.Namespace):  # -> pipeline.Request
    from qwen35_codegen.pipeline import Request
    from qwen35_codegen.spec import LayoutChoices

    choices = LayoutChoices(
        experts=args.experts, mtp_experts=args.mtp_experts, hf_prefix=args.hf_prefix
    )
    return Request(
        ref=args.ref,
        index=args.index,
        choices=choices,
        name=getattr(args, "name", None),
        target=getattr(args, "target", None) or DEFAULT_TARGET,
    )


def _add_target_option(p: argparse.ArgumentParser, help: str) -> None:
    p.add_argument("--target", choices=TARGETS, help=help)


def cmd_generate(args: argparse.Namespace) -> int:
    from qwen35_codegen import checkout, pipeline

    if args.out is None and not checkout.is_checkout():
        raise CodegenError(
            "--out is required: this generator is installed, not run from the project's checkout, "
            "and committed bridges are written only into the checkout"
        )
    generated = pipeline.generate(_request(args))
    out = args.out or checkout.GENERATED
    for path in pipeline.write(generated, out):
        print(f"wrote {path}")
    source = generated.entry.source
    if out == checkout.GENERATED and not pipeline.committable(source):
        print(
            f"note: the source {source} ({generated.source.provenance}) is not in the repository, "
            "so `codegen check` cannot regenerate this bridge offline; to commit it, generate from "
            "a copy of the config inside the repository or from catalog:ID",
            file=sys.stderr,
        )
    return 0


def cmd_inspect(args: argparse.Namespace) -> int:
    from qwen35_codegen import pipeline

    source, spec = pipeline.infer(_request(args))
    data = {"model_id": source.model_id, "source": source.ref, "provenance": source.provenance}
    data |= spec.to_dict()
    if spec.needs_mtp_experts_choice:
        data["mtp_experts_layout_reason"] = (
            "no index and no catalog statement: choose with --mtp-experts"
        )
    data["spec_sha256"] = spec.fingerprint()
    print(json.dumps(data, indent=2))
    return 0


def cmd_check(args: argparse.Namespace) -> int:
    from qwen35_codegen import pipeline

    drifts = pipeline.check()
    if not drifts:
        print(
            "qwen35_bridge/generated/ matches the generator (bridges, manifests and summaries, byte for byte); every table matches its manifest"
        )
        return 0
    for drift in drifts:
        print(f"{drift.path}: {drift.problem}\n    fix: {drift.fix}")
    print(f"{len(drifts)} problem(s) in qwen35_bridge/generated/")
    return 1


def cmd_summary(args: argparse.Namespace) -> int:
    from qwen35_codegen import pipeline
    from qwen35_codegen.review import summary

    print(summary.render(pipeline.generate(_request(args))), end="")
    return 0


def cmd_diff(args: argparse.Namespace) -> int:
    from qwen35_codegen.review import diff as review_diff

    print(review_diff.render(review_diff.load(args.old), review_diff.load(args.new)), end="")
    return 0


def cmd_list(args: argparse.Namespace) -> int:
    from qwen35_codegen import catalog

    for model_id in catalog.model_ids():
        entry = catalog.entry(model_id)
        line = f"{model_id:40} {entry.provenance:14} {entry.source}"
        if entry.base:
            line += f" [{len(entry.assumed_fields())} fields assumed from {entry.base}]"
        print(line)
        for key, statement in entry.statements.items():
            print(f"{'':40} states {key} = {statement.value} ({statement.provenance})")
    return 0


SIZE_UNITS = {
    "": 1,
    "B": 1,
    "KB": 1000,
    "MB": 1000**2,
    "GB": 1000**3,
    "KIB": 1024,
    "MIB": 1024**2,
    "GIB": 1024**3,
}


def parse_size(text: str) -> int:
    """`5GB`, `500MB`, `1.5GiB` or a number of bytes."""
    match = re.fullmatch(r"\s*([0-9.]+)\s*([A-Za-z]*)\s*", text)
    unit = match.group(2).upper() if match else ""
    if not match or unit not in SIZE_UNITS:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (e.g. 5GB, 500MB)")
    return int(float(match.group(1)) * SIZE_UNITS[unit])


def cmd_convert(args: argparse.Namespace) -> int:
    from qwen35_bridge.workers import from_environment

    if args.workers is not None and args.workers < 1:
        raise CodegenError(f"--workers {args.workers}: at least one")
    if args.plan:
        from qwen35_codegen.cli import convert as conversion

        if args.direction not in ("hf-to-megatron", "megatron-to-hf"):
            raise CodegenError(
                f"--plan: for hf-to-megatron and megatron-to-hf, not {args.direction}"
            )
        print(
            conversion.plan(
                args.direction,
                args.src,
                output_format=args.format or "safetensors",
                run_layout=args.run_layout,
                hf_config=args.hf_config,
                iteration=args.iteration,
                experts=args.experts,
                mtp_experts=args.mtp_experts,
                target=args.target,
                max_shard_bytes=args.max_shard_size,
                budget=args.memory_budget,
                workers=args.workers or int(os.environ.get("WORLD_SIZE", "1")),
                bridge_dir=args.bridge_dir,
            ),
            end="",
        )
        return 0
    if (args.workers or 1) > 1 and "WORLD_SIZE" not in os.environ:
        from qwen35_codegen.cli.launch import run_workers

        return run_workers(args.argv, args.workers, args.dst)
    with from_environment() as workers:
        if args.workers is not None and args.workers != workers.size:
            raise CodegenError(
                f"--workers {args.workers}: this process is one of {workers.size} (torchrun's "
                "WORLD_SIZE)"
            )
        return _convert(args, workers)


def _convert(args: argparse.Namespace, workers) -> int:  # workers: qwen35_bridge.workers.Workers
    with settled_heap() as conversion, _output_files(page_cache=args.page_cache):
        return _convert_with(conversion, args, workers)


@contextmanager
def _output_files(*, page_cache: bool) -> Iterator[None]:
    """Output files written through the page cache for the block if asked, else with O_DIRECT
    where the filesystem allows it (qwen35_bridge.formats.direct says why)."""
    from qwen35_bridge.formats import direct

    previous, direct.enabled = direct.enabled, not page_cache
    try:
        yield
    finally:
        direct.enabled = previous


def _convert_with(conversion, args: argparse.Namespace, workers) -> int:
    quiet = args.quiet or not workers.first  # the first worker speaks for all
    common = dict(
        bridge_dir=args.bridge_dir,
        force=args.force,
        max_shard_bytes=args.max_shard_size,
        quiet=quiet,
        budget=args.memory_budget,
        workers=workers,
    )
    if args.direction in ("gpt-to-hybrid", "hybrid-to-gpt"):
        from qwen35_codegen.cli.retargeting import retarget

        refused = (
            "experts",
            "mtp_experts",
            "hf_config",
            "iteration",
            "fp8",
            "target",
            "run_layout",
        )
        for option in refused:
            if getattr(args, option) not in (None, False):
                raise CodegenError(
                    f"--{option.replace('_', '-')}: not an option of {args.direction}, which "
                    "renames the checkpoint's tensors and changes nothing else"
                )
        if args.accept_norm_rounding:
            raise CodegenError(
                f"--accept-norm-rounding: {args.direction} shifts no norm (tensors are copied)"
            )
        source_target, _, target = args.direction.partition("-to-")
        report = retarget(
            args.src, args.dst, source_target, target, output_format=args.format, **common
        )
    elif args.direction == "hf-to-megatron":
        report = conversion.hf_to_megatron(
            args.src,
            args.dst,
            output_format=args.format or "safetensors",
            allow_norm_rounding=args.accept_norm_rounding,
            dequantize_to=args.dequantize_to,
            run_layout=args.run_layout,
            target=args.target or DEFAULT_TARGET,
            **common,
        )
    else:
        report = conversion.megatron_to_hf(
            args.src,
            args.dst,
            experts=args.experts,
            mtp_experts=args.mtp_experts,
            fp8=args.fp8,
            allow_norm_rounding=args.accept_norm_rounding,
            hf_config=args.hf_config,
            iteration=args.iteration,
            target=args.target,
            **common,
        )
    if not quiet:
        spread = f" by {workers.size} workers" if workers.size > 1 else ""
        print(
            f"wrote {args.dst}{spread}: {report.tensors_written} tensors, {report.bytes_written / 1e9:.3f} GB (from {report.tensors_read} tensors)"
        )
    return 0


def cmd_verify(args: argparse.Namespace) -> int:
    from qwen35_bridge.megatron.shims import training_advice_silenced
    from qwen35_codegen.cli.verify import verify

    with training_advice_silenced():
        verdict = verify(
            args.hf_dir,
            args.megatron_dir,
            tokens=args.tokens,
            seed=args.seed,
            tolerance=args.tolerance,
            iteration=args.iteration,
            target=args.target,
        )
    print(f"max |delta| logits: {verdict.logits_delta:.3e}")
    for i, delta in enumerate(verdict.mtp_deltas):
        print(f"max |delta| MTP layer {i} logits: {delta:.3e}")
    print(f"{'PASS' if verdict.passed else 'FAIL'} (tolerance {verdict.tolerance:.1e})")
    return 0 if verdict.passed else 1


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="codegen", description=__doc__)
    verbs = parser.add_subparsers(dest="verb", required=True)

    def verb(
        name: str, func: Callable[[argparse.Namespace], int], help: str
    ) -> argparse.ArgumentParser:
        p = verbs.add_parser(name, help=help, description=help)
        p.set_defaults(func=func)
        return p

    p = verb("generate", cmd_generate, "render the bridge module of a model")
    _add_source_options(p)
    p.add_argument(
        "--out",
        type=Path,
        help="output folder (default, in a checkout: qwen35_bridge/generated/, whose index is updated; required when installed)",
    )
    p.add_argument(
        "--name",
        help="module name (default: derived from the model id, with _hybrid for --target hybrid)",
    )
    _add_target_option(
        p,
        "the megatron-core model class whose names the bridge maps: gpt (GPTModel, default) or hybrid (HybridModel)",
    )
    p = verb("inspect", cmd_inspect, "print the inferred spec as JSON")
    _add_source_options(p)
    p = verb(
        "convert",
        cmd_convert,
        "convert a checkpoint on disk (HF safetensors <-> Megatron, or a Megatron checkpoint between the GPTModel and HybridModel layouts)",
    )
    p.add_argument("direction", choices=DIRECTIONS)
    p.add_argument("src", type=Path)
    p.add_argument("dst", type=Path)
    p.add_argument(
        "--format",
        choices=("safetensors", "torch_dist"),
        help="Megatron output format of hf-to-megatron (default safetensors) and of gpt-to-hybrid / "
        "hybrid-to-gpt (default: the source's); megatron-to-hf reads either",
    )
    _add_target_option(
        p,
        "hf-to-megatron: the megatron-core model class to write for, gpt (GPTModel, default) or "
        "hybrid (HybridModel); megatron-to-hf: the class a trainer's checkpoint comes from (a "
        "checkpoint written by codegen convert records its own)",
    )
    p.add_argument(
        "--run-layout",
        choices=("megatron-lm", "megatron-bridge"),
        help="hf-to-megatron --format torch_dist: the trainer whose run tree to write (default "
        "megatron-lm: tracker + release/; megatron-bridge: iter_0000000/ with run_config.yaml and "
        "train state)",
    )
    p.add_argument(
        "--experts",
        choices=LAYOUTS,
        help="megatron-to-hf: store routed experts this way (default: as the source did)",
    )
    p.add_argument(
        "--mtp-experts", choices=LAYOUTS, help="megatron-to-hf: store MTP experts this way"
    )
    p.add_argument(
        "--bridge-dir", type=Path, help="where to generate a bridge when no committed one matches"
    )
    p.add_argument(
        "--max-shard-size",
        type=parse_size,
        default="5GB",
        help="largest output shard (default 5GB)",
    )
    p.add_argument(
        "--hf-config",
        metavar="DIR|REF",
        help="megatron-to-hf of a trainer's checkpoint (no codegen.json): the model, as a folder "
        "with config.json, an HF checkpoint, or any generate REF",
    )
    p.add_argument(
        "--iteration",
        type=int,
        help="megatron-to-hf of a run root: this iteration instead of the tracker's",
    )
    p.add_argument(
        "--memory-budget",
        type=parse_size,
        default=str(2 * 1000**3),
        help="tensors held at once, read and converted (default 2GB); a group too large for it (a "
        "packed expert tensor, an embedding) is converted in even parts of at most half of it, "
        "or one expert",
    )
    p.add_argument(
        "--workers",
        type=int,
        help="spread the conversion over this many processes on this machine (under torchrun, "
        "over its WORLD_SIZE processes without this option)",
    )
    p.add_argument(
        "--plan",
        action="store_true",
        help="print what the conversion would write (bytes in all and per worker, the most held "
        "in memory, the files) and write nothing; SRC may be a config alone (a generate REF, or "
        "for megatron-to-hf --hf-config)",
    )
    p.add_argument(
        "--page-cache",
        action="store_true",
        help="write the output through the page cache (by default tensor data goes to the disk "
        "with O_DIRECT where the filesystem takes it: faster where memory is slow to come by, and "
        "it leaves the page cache to the source); for an output read again at once",
    )
    p.add_argument("--force", action="store_true", help="replace an existing destination")
    p.add_argument("--quiet", action="store_true", help="no progress or messages")
    p.add_argument(
        "--accept-norm-rounding",
        action="store_true",
        help="convert even if the GDN norm shift (w - 1 on import, g + 1 on export) rounds",
    )
    p.add_argument(
        "--dequantize-to",
        choices=("bfloat16", "float32"),
        default="bfloat16",
        help="hf-to-megatron: dtype of FP8 weights once dequantised",
    )
    p.add_argument(
        "--fp8",
        action="store_true",
        help="megatron-to-hf: quantise back to FP8 the tensors that were FP8",
    )
    p = verb(
        "verify", cmd_verify, "compare the HF model's logits with the converted Megatron model's"
    )
    p.add_argument("hf_dir", type=Path)
    p.add_argument("megatron_dir", type=Path)
    p.add_argument(
        "--tokens", type=int, default=80, help="sequence length (default 80: two GDN chunks)"
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tolerance", type=float, default=1e-4)
    p.add_argument(
        "--iteration",
        type=int,
        help="a trainer's run root: this iteration instead of the tracked one",
    )
    _add_target_option(
        p,
        "a trainer's checkpoint: the megatron-core model class it comes from, gpt (GPTModel, "
        "default) or hybrid (HybridModel); a checkpoint written by codegen convert records its own",
    )
    verb("check", cmd_check, "regenerate every committed bridge and fail on any difference")
    p = verb("summary", cmd_summary, "describe a bridge in Markdown for its pull request")
    _add_source_options(p)
    _add_target_option(p, "the bridge's target model class (gpt by default), as for generate")
    p = verb("diff", cmd_diff, "what changes between two bridges: spec, key manifest, then code")
    side = (
        "a reference as for generate (default layouts), a generated module file (qwen35_bridge/generated/x.py), "
        "or one as of a git revision (main:qwen35_bridge/generated/x.py)"
    )
    p.add_argument("old", help=side)
    p.add_argument("new", help=side)
    verb("list", cmd_list, "list the bundled catalog with provenance")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    args.argv = argv
    terminate = signal.getsignal(signal.SIGTERM)
    main_thread = threading.current_thread() is threading.main_thread()  # signals go only there
    if main_thread:
        # A killed conversion (kill, timeout, a batch scheduler) unwinds like an interrupted one,
        # so that its staging folder is removed.
        signal.signal(signal.SIGTERM, _exit_on_signal)
    try:
        return args.func(args)
    except BridgeError as e:  # the runtime's and the generator's user errors alike
        return _fail(args.verb, str(e), e.exit_code)
    except OSError as e:  # the machine's side of a problem: permissions, a full disk, a lost file
        where = f"{e.filename}: " if e.filename else ""
        return _fail(args.verb, f"{where}{e.strerror or e}", BridgeError.exit_code)
    except KeyboardInterrupt:
        return _fail(args.verb, "interrupted", 130)
    except SystemExit as e:
        if e.code == 128 + signal.SIGTERM:
            return _fail(args.verb, "terminated", e.code)
        raise
    finally:
        if main_thread:
            signal.signal(signal.SIGTERM, terminate)


def run() -> NoReturn:
    """The `codegen` command: `main`, then an exit that skips unloading the interpreter's modules.
    With torch imported that took half a second of every command (measured), and a finished
    command needs none of it: its files are closed, and exit handlers still run and output is
    flushed here."""
    code = main()
    atexit._run_exitfuncs()
    with suppress(BrokenPipeError):  # a reader of our output that left early
        sys.stdout.flush()
        sys.stderr.flush()
    os._exit(code)


def _fail(verb: str, message: str, code: int) -> int:
    if os.environ.get("RANK", "0") == "0":  # one of several workers: the first speaks for all
        print(f"codegen {verb}: error: {message}", file=sys.stderr)
    return code


def _exit_on_signal(signum: int, _frame: object) -> None:
    raise SystemExit(128 + signum)


if __name__ == "__main__":
    run()
