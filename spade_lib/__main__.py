"""``python -m spade_lib COMMAND ...``: the package's command line.

Subcommands are entries of :data:`COMMANDS` (name -> help line, a function that adds the
arguments to its parser, and a function that runs it on the parsed arguments and returns the
exit status); add an entry to add a command. Only ``explain`` (:mod:`spade_lib.cli`) exists.

Every error a user can make is one line on stderr and exit status 2, with no traceback: argparse's
own errors (a missing or malformed argument) and the ``ValueError`` / ``OSError`` /
``ImportError`` a command raises for a bad input (a missing or unreadable file, an unknown model,
method or schedule).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from typing import NamedTuple, NoReturn

from spade_lib import cli

__all__ = ["COMMANDS", "Command", "main"]


class Command(NamedTuple):
    """One subcommand: its help line, ``add_arguments(parser)`` and ``run(args) -> status``."""

    help: str
    add_arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int]


COMMANDS: dict[str, Command] = {
    "explain": Command("dense and SPADE saliency maps of one's own photo on a real ImageNet "
                       "network", cli.add_explain_arguments, cli.run_explain),
}
"""The subcommands of ``python -m spade_lib``, by name."""


class _Parser(argparse.ArgumentParser):
    """An argument parser whose errors are one line (``prog: error: ...``), exit status 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="python -m spade_lib",
                     description="SPADE: sparsity-guided debugging of image classifiers.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True,
                                parser_class=_Parser)
    for name, command in COMMANDS.items():
        p = sub.add_parser(name, help=command.help, description=command.help)
        command.add_arguments(p)
        p.set_defaults(run=command.run)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``python -m spade_lib`` with ``argv`` (default ``sys.argv[1:]``); the exit status.

    A bad input is one line on stderr (``python -m spade_lib COMMAND: error: ...``) and status 2.
    """
    parser = _parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # argparse's --help (0) or its one-line error (2), already printed
        return e.code if isinstance(e.code, int) else 2
    try:
        return args.run(args)
    except (ValueError, OSError, ImportError) as e:
        message = " ".join(str(e).split()) or type(e).__name__
        print(f"{parser.prog} {args.command}: error: {message}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
