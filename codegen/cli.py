"""`codegen` command line. Each verb imports what it needs, so generating never imports torch."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from codegen.errors import CodegenError

LAYOUTS = ("packed", "per_expert")
HF_PREFIXES = ("model.", "model.language_model.")


def _add_source_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("ref", help="catalog:ID, a local directory or config.json, or a hub id (owner/name)")
    p.add_argument("--index", type=Path, help="model.safetensors.index.json to read layouts from")
    p.add_argument("--experts", choices=LAYOUTS, help="decoder experts layout, when no index says")
    p.add_argument("--mtp-experts", choices=LAYOUTS, help="MTP experts layout, when no index or catalog says")
    p.add_argument("--hf-prefix", choices=HF_PREFIXES, help="HF prefix of a text-only Qwen3.5 checkpoint")


def _request(args: argparse.Namespace):  # -> generator.Request
    from codegen.generator import Request
    from codegen.spec import LayoutChoices

    choices = LayoutChoices(experts=args.experts, mtp_experts=args.mtp_experts, hf_prefix=args.hf_prefix)
    return Request(ref=args.ref, index=args.index, choices=choices, name=getattr(args, "name", None))


def cmd_generate(args: argparse.Namespace) -> int:
    from codegen import generator

    generated = generator.generate(_request(args))
    out = args.out or generator.GENERATED
    for path in generator.write(generated, out):
        print(f"wrote {path}")
    return 0


def cmd_inspect(args: argparse.Namespace) -> int:
    from codegen import generator

    source, spec = generator.infer(_request(args))
    data = {"model_id": source.model_id, "source": source.ref, "provenance": source.provenance}
    data |= spec.to_dict()
    if spec.needs_mtp_experts_choice:
        data["mtp_experts_layout_reason"] = "no index and no catalog statement: choose with --mtp-experts"
    data["spec_sha256"] = spec.fingerprint()
    print(json.dumps(data, indent=2))
    return 0


def cmd_check(args: argparse.Namespace) -> int:
    from codegen import generator

    drifts = generator.check()
    if not drifts:
        print("generated/ matches the generator: every bridge regenerates byte for byte")
        return 0
    for drift in drifts:
        print(f"{drift.path}: {drift.problem}\n    fix: {drift.fix}")
    print(f"{len(drifts)} problem(s) in generated/")
    return 1


def cmd_list(args: argparse.Namespace) -> int:
    from codegen import catalog

    for model_id in catalog.model_ids():
        entry = catalog.entry(model_id)
        line = f"{model_id:40} {entry.provenance:14} {entry.source}"
        if entry.base:
            line += f" [{len(entry.assumed_fields())} fields assumed from {entry.base}]"
        print(line)
        for key, statement in entry.statements.items():
            print(f"{'':40} states {key} = {statement.value} ({statement.provenance})")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="codegen", description=__doc__)
    verbs = parser.add_subparsers(dest="verb", required=True)

    def verb(name: str, func: Callable[[argparse.Namespace], int], help: str) -> argparse.ArgumentParser:
        p = verbs.add_parser(name, help=help, description=help)
        p.set_defaults(func=func)
        return p

    p = verb("generate", cmd_generate, "render the bridge module of a model")
    _add_source_options(p)
    p.add_argument("--out", type=Path, help="output folder (default: generated/, whose index is updated)")
    p.add_argument("--name", help="module name (default: derived from the model id)")
    p = verb("inspect", cmd_inspect, "print the inferred spec as JSON")
    _add_source_options(p)
    verb("check", cmd_check, "regenerate every committed bridge and fail on any difference")
    verb("list", cmd_list, "list the bundled catalog with provenance")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except CodegenError as e:
        print(f"codegen {args.verb}: error: {e}", file=sys.stderr)
        return e.exit_code


if __name__ == "__main__":
    sys.exit(main())
