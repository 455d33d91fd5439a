"""The ``sdray`` command: one subcommand per pipeline stage (DESIGN.md §4).

Each subcommand lives in its own module exposing ``add_arguments(parser)`` and
``main(args) -> int``; modules are imported only when their subcommand runs, so ``sdray --help``
stays fast.
"""

from __future__ import annotations

import argparse
import importlib
import sys

SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "demo": ("pipelines.demo", "whole pipeline on the embedded defaults"),
    "synth": ("pipelines.synth", "generate image-text shards"),
    "featurize": ("pipelines.featurize", "frozen-backbone features of image-text shards"),
    "train": ("pipelines.train", "fine-tune a retriever on Ray Train (dense, d2s, joint)"),
    "eval": ("pipelines.evaluate", "recall and sparsity of a model on a split"),
    "index": ("pipelines.index", "build sharded dense and sparse indexes"),
    "serve": ("pipelines.serve", "serve an index over HTTP with Ray Serve"),
    "query": ("pipelines.query", "query a running endpoint"),
}


def _top_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sdray",
        description="Joint sparse-dense text-image retrieval on Ray (Song et al., CIKM 2025).",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, (_, summary) in SUBCOMMANDS.items():
        sub.add_parser(name, help=summary, add_help=False)
    return parser


def _load(command: str):
    module_name = SUBCOMMANDS[command][0]
    try:
        return importlib.import_module(module_name)
    except ModuleNotFoundError as err:
        if err.name != module_name:
            raise
        return None


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args, rest = _top_parser().parse_known_args(argv)
    module = _load(args.command)
    if module is None:
        print(f"sdray {args.command}: not built yet", file=sys.stderr)
        return 2
    parser = argparse.ArgumentParser(
        prog=f"sdray {args.command}", description=SUBCOMMANDS[args.command][1]
    )
    module.add_arguments(parser)
    return int(module.main(parser.parse_args(rest)) or 0)


if __name__ == "__main__":
    sys.exit(main())
