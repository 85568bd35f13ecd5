"""The ``wsi-mil`` command line.

Each subcommand lives in ``workflows/commands/<name>.py`` and exposes
``add_parser(subparsers)`` and ``run(args) -> int``; the commands call the same public
functions that users import. User errors (:class:`wsi_mil.errors.WsiMilError`) print one
line to stderr and exit with status 2; no traceback.
"""

from __future__ import annotations

import argparse
import copy
import importlib
import os
import sys
from collections.abc import Sequence
from typing import Any

from wsi_mil import __version__
from wsi_mil.errors import WsiMilError

__all__ = ["COMMANDS", "HelpFormatter", "Parser", "build_parser", "main"]

#: Subcommand modules under ``wsi_mil.workflows.commands``, in help order.
COMMANDS = (
    "info",
    "tile",
    "encoders",
    "extract",
    "train",
    "predict",
    "validate",
    "heatmap",
    "report",
    "run",
    "init",
    "verify",
    "demo",
)


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Keeps descriptions as written and shows every option's default in ``--help``.

    Unlike :class:`argparse.ArgumentDefaultsHelpFormatter` it also shows the default of
    options without a help text, and says nothing for defaults of ``None`` / ``False``
    or where the help text already explains its default.
    """

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        shown = not any(action.default is v for v in (None, False, argparse.SUPPRESS, ""))
        if action.option_strings and shown and "default" not in text:
            text += " (default: %(default)s)"
        return text.strip()

    def _format_action(self, action: argparse.Action) -> str:
        if action.help is None and self._get_help_string(action):
            action = copy.copy(action)
            action.help = self._get_help_string(action)
        return super()._format_action(action)


class Parser(argparse.ArgumentParser):
    """An :class:`argparse.ArgumentParser` whose help uses :class:`HelpFormatter`; the
    subcommands' parsers are of this class too."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)


def build_parser() -> argparse.ArgumentParser:
    """Build the argument parser with one subparser per available command."""
    parser = Parser(
        prog="wsi-mil",
        description="Whole-slide images → tiles → features → MIL → reports.",
    )
    parser.add_argument("--version", action="version", version=f"wsi-mil {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in COMMANDS:
        module = importlib.import_module(f"wsi_mil.workflows.commands.{name}")
        sp = module.add_parser(sub)
        sp.set_defaults(_run=module.run)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``wsi-mil`` console script; returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args._run(args) or 0)
    except WsiMilError as exc:
        print(f"wsi-mil {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # e.g. `wsi-mil info slide.svs | head`
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 0
    except KeyboardInterrupt:
        print(f"wsi-mil {args.command}: interrupted; re-run to resume", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
