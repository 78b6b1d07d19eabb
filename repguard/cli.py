"""The ``repguard`` command line: one entry point, one module per subcommand in ``repguard.commands``."""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys

from ._version import __version__
from .errors import RepGuardError

# (subcommand, module); each module defines add_parser(subparsers) and sets a ``func`` default.
COMMANDS = (
    ("generate", "repguard.commands.generate"),
    ("calibrate", "repguard.commands.calibrate"),
    ("inspect", "repguard.commands.inspect"),
    ("models", "repguard.commands.models"),
    ("serve", "repguard.commands.serve"),
)


LOG_LEVELS = ["DEBUG", "INFO", "WARNING", "ERROR"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="repguard",
        description="Guard language-model decoding against repetition loops by switching off the model's "
        "repetition neurons for looping sequences only.",
    )
    parser.add_argument("--version", action="version", version=f"repguard {__version__}")
    parser.add_argument("--log-level", default="WARNING", choices=LOG_LEVELS, help="logging verbosity (default: WARNING)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, module in COMMANDS:
        try:
            mod = importlib.import_module(module)
        except ModuleNotFoundError as exc:
            if exc.name != module:
                raise
            continue  # a subcommand not present in this build
        mod.add_parser(sub)
    _log_level_after(sub)
    return parser


def _log_level_after(sub) -> None:
    """``--log-level`` after the subcommand too (`repguard calibrate ... --log-level INFO`, `repguard models list
    --log-level DEBUG`). Its default is SUPPRESS: not given there, the value before the subcommand stands."""
    for command in sub.choices.values():
        command.add_argument("--log-level", default=argparse.SUPPRESS, choices=LOG_LEVELS,
                             help="logging verbosity (default: WARNING; also accepted before the subcommand)")
        for action in command._actions:  # nested subcommands (models list/convert)
            if isinstance(action, argparse._SubParsersAction):
                _log_level_after(action)


def main(argv: list[str] | None = None) -> int:
    try:
        parser = build_parser()  # imports the subcommands (torch, for some): Ctrl-C may come here
    except KeyboardInterrupt:
        return 130
    args = parser.parse_args(argv)
    logging.basicConfig(level=getattr(logging, args.log_level), format="%(levelname)s %(name)s: %(message)s")
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        code = int(args.func(args) or 0)
        sys.stdout.flush()  # a reader that went away (`repguard inspect MAP | head`) shows here, not at exit
        return code
    except BrokenPipeError:  # as a shell tool does: stop quietly, with SIGPIPE's status
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # nothing left for the exit's own flush
        return 141
    except RepGuardError as exc:
        print(f"repguard: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
