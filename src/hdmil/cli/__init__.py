"""The ``hdmil`` command line: each sub-module registers a few commands over the model package."""

from __future__ import annotations

import argparse
import importlib
import sys

from hdmil.errors import HDMILError

# Each module defines ``register(subparsers)``; a command's handler is ``args.func(args) -> int``.
COMMAND_MODULES = (
    "hdmil.cli.slide_cmds",  # info, tissue, synth, model-card
    "hdmil.cli.features_cmds",  # features, encoders
    "hdmil.cli.lr_cmds",  # add-lr-patches
    "hdmil.cli.train_cmds",  # train-dmin, train-lipn, evaluate
    "hdmil.cli.predict_cmds",  # predict
    "hdmil.cli.batch_cmds",  # batch
    "hdmil.cli.cohort_cmds",  # synth-cohort, recipe
    "hdmil.cli.slpd_cmds",  # pretrain-slpd, similar
    "hdmil.cli.annotation_cmds",  # evaluate-annotations
    "hdmil.cli.review_cmds",  # review-summary
)


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The ``hdmil`` parser. With ``command``, the command modules are imported in order only until
    one registers it (``hdmil info`` does not import the pipeline's); all of them otherwise."""
    parser = argparse.ArgumentParser(
        prog="hdmil", description="Hierarchical distillation MIL for whole-slide images."
    )
    parser.add_argument("--debug", action="store_true", help="show full tracebacks")
    parser.set_defaults(func=None)  # each command sets its own
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as exc:
            if exc.name == name:  # a command group not written yet
                continue
            raise
        module.register(sub)
        if command is not None and command in sub.choices:
            break
    return parser


def _command(argv: list[str]) -> str | None:
    """The command word of ``argv`` (the first word that is not an option); None for top-level
    help, which lists every command."""
    for word in argv:
        if word in ("-h", "--help"):
            return None
        if not word.startswith("-"):
            return word
    return None


def main(argv: list[str] | None = None) -> int:
    parser = build_parser(_command(sys.argv[1:] if argv is None else list(argv)))
    args = parser.parse_args(argv)
    if args.func is None:
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except HDMILError as exc:
        if args.debug:
            raise
        print(f"hdmil {args.command}: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"hdmil {args.command}: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # e.g. `hdmil encoders | head`: the reader left; not an error of ours
        _silence_stdout()
        return 141


def _silence_stdout() -> None:
    """Point stdout at /dev/null so that the interpreter's final flush does not fail again."""
    import os

    try:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    except (OSError, ValueError):  # stdout without a file descriptor (tests' captured streams)
        pass


if __name__ == "__main__":
    sys.exit(main())
