"""The ``sdray`` command: one subcommand per pipeline stage (DESIGN.md §4).

Each subcommand lives in its own module exposing ``add_arguments(parser)`` and
``main(args) -> int``; modules are imported only when their subcommand runs, so ``sdray --help``
stays fast.

Options every subcommand takes (before or after its name): ``--log-level``, ``--quiet``,
``--debug``. Known failures end with one line on stderr and an exit code per kind
(:data:`EXIT_CODES`); ``--debug`` shows the traceback instead.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "demo": ("pipelines.demo", "whole pipeline on the embedded defaults"),
    "synth": ("pipelines.synth", "generate image-text shards"),
    "featurize": ("pipelines.featurize", "frozen-backbone features of image-text shards"),
    "train": ("pipelines.train", "fine-tune a retriever on Ray Train (dense, d2s, joint)"),
    "eval": ("pipelines.evaluate", "recall and sparsity of a model on a split"),
    "index": ("pipelines.index", "build sharded dense and sparse indexes; list|rollback|gc versions"),
    "serve": ("pipelines.serve", "serve an index over HTTP with Ray Serve"),
    "query": ("pipelines.query", "query a running endpoint"),
    "export": ("pipelines.export", "dense + sparse vectors of a corpus as Parquet for vector databases"),
    "config": ("pipelines.config_show", "print a resolved train, index or serve config"),
}
INDEX_VERSIONS = "pipelines.index_versions"

EXIT_OK, EXIT_ERROR, EXIT_USAGE, EXIT_CONFIG, EXIT_STORAGE, EXIT_TRAINING = 0, 1, 2, 3, 4, 5
EXIT_INTERRUPTED = 130
EXIT_CODES = {
    "usage": EXIT_USAGE, "config": EXIT_CONFIG, "storage": EXIT_STORAGE,
    "training": EXIT_TRAINING, "other": EXIT_ERROR, "interrupted": EXIT_INTERRUPTED,
}
log = logging.getLogger("pipelines.cli")


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Shows each option's default (not for required ones) and keeps the docstrings' layout."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.required:
            return action.help
        return super()._get_help_string(action)


def _version() -> str:
    from sdray import __version__

    return __version__


def add_common(parser: argparse.ArgumentParser, top: bool) -> None:
    """``--log-level``, ``--quiet``, ``--debug`` (a sub-parser's copies never reset the top's)."""
    keep = {} if top else {"default": argparse.SUPPRESS}
    parser.add_argument("--log-level", choices=["DEBUG", "INFO", "WARNING", "ERROR"],
                        type=str.upper, help="messages shown on stderr", **({"default": "INFO"} | keep))
    parser.add_argument("--quiet", action="store_true", help="only warnings and errors (no progress)",
                        **({"default": False} | keep))
    parser.add_argument("--debug", action="store_true",
                        help="show the traceback of a failure (and DEBUG messages)", **({"default": False} | keep))


def _top_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sdray", formatter_class=HelpFormatter,
        description="Joint sparse-dense text-image retrieval on Ray (Song et al., CIKM 2025).",
        epilog="Exit codes: 0 ok, 1 unexpected error, 2 usage, 3 bad configuration or input, "
               "4 storage, 5 training failed, 130 interrupted.",
    )
    parser.add_argument("--version", action="version", version=f"sdray {_version()}",
                        help="print the version and exit")
    add_common(parser, top=True)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, (_, summary) in SUBCOMMANDS.items():
        sub.add_parser(name, help=summary, add_help=False)
    return parser


def module_for(command: str, rest: list[str]) -> str:
    """The module that handles ``command`` with arguments ``rest``."""
    if command == "index" and rest and rest[0] in ("list", "rollback", "gc"):
        return INDEX_VERSIONS
    return SUBCOMMANDS[command][0]


def _load(module_name: str):
    try:
        return importlib.import_module(module_name)
    except ModuleNotFoundError as err:
        if err.name != module_name:
            raise
        return None


def build_parser(command: str, module) -> argparse.ArgumentParser:
    """The argument parser of one subcommand (what ``sdray COMMAND --help`` prints)."""
    epilog = None
    if command == "index" and module.__name__ != INDEX_VERSIONS:
        epilog = ("Index versions: sdray index list INDEX_ROOT | sdray index rollback VERSION INDEX_ROOT | "
                  "sdray index gc --keep N INDEX_ROOT (see 'sdray index list --help').")
    parser = argparse.ArgumentParser(prog=f"sdray {command}", description=module.__doc__,
                                     formatter_class=HelpFormatter, epilog=epilog)
    module.add_arguments(parser)
    add_common(parser, top=False)
    return parser


def classify(err: BaseException) -> str:
    """The failure kind of ``err``: ``config``, ``storage``, ``training`` or ``other``."""
    from sdray.errors import TrainingFailed

    from sdray.storage import storage_fault

    if isinstance(err, TrainingFailed):
        return "training"
    if storage_fault(err) is not None:  # a storage error, also behind Ray's task wrappers
        return "storage"
    if isinstance(err, OSError) or type(err).__name__ in ("IndexFileError", "ClientError", "BotoCoreError",
                                                          "EndpointConnectionError", "NoCredentialsError"):
        return "storage"
    import yaml

    if isinstance(err, (ValueError, yaml.YAMLError)):
        return "config"
    return "other"


def one_line(err: BaseException) -> str:
    text = " ".join(str(err).split()) or type(err).__name__
    return text if len(text) <= 600 else text[:597] + "..."


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    top, rest = _top_parser().parse_known_args(argv)
    module_name = module_for(top.command, rest)
    module = _load(module_name)
    if module is None:
        print(f"sdray {top.command}: not built yet", file=sys.stderr)
        return EXIT_USAGE
    command = top.command if module_name != INDEX_VERSIONS else "index"
    args = build_parser(command, module).parse_args(rest)
    debug = getattr(args, "debug", top.debug)
    quiet = getattr(args, "quiet", top.quiet)
    level = "DEBUG" if debug else getattr(args, "log_level", top.log_level)

    from sdray.progress import configure_logging

    configure_logging(level, quiet)
    try:
        return int(module.main(args) or 0)
    except KeyboardInterrupt:
        print(f"sdray {command}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except Exception as err:  # noqa: BLE001 - the one place failures become exit codes
        if debug:
            raise
        kind = classify(err)
        if kind == "storage":
            from sdray.storage import storage_fault

            err = storage_fault(err) or err
        label = {"config": "bad configuration or input", "storage": "storage error",
                 "training": "training failed", "other": f"unexpected {type(err).__name__}"}[kind]
        print(f"sdray {command}: {label}: {one_line(err)} (--debug shows the traceback)", file=sys.stderr)
        return EXIT_CODES[kind]


if __name__ == "__main__":
    sys.exit(main())
