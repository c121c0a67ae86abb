"""``moola-engine``: one subcommand per module in :mod:`moola_engine.cli.commands`.

A :class:`~moola_engine.errors.MoolaError` prints as ``error: <message>`` and
exits with its code (:class:`~moola_engine.errors.ExitCode`: 2 for usage and
config errors, 3 for failed checks); an unexpected exception prints one line
and saves its traceback to a file (``--debug`` or ``MOOLA_DEBUG=1`` shows it).
No traceback reaches a user otherwise.
"""

from __future__ import annotations

import argparse
import datetime as dt
import importlib
import os
import sys
import tempfile
import traceback
from collections.abc import Sequence
from pathlib import Path

from moola_engine.errors import ExitCode, MoolaError
from moola_engine.version import __version__

# Each module defines add_parser(subparsers) and run(args) -> int.
COMMANDS = ["strategies", "components", "plan", "train", "verify", "runs", "pretrain", "export", "baseline", "ablate", "demo"]

DESCRIPTION = ("moola-engine: train models with named transfer-learning strategies, prove with the run's\n"
               "event log what each group of weights did, and compare strategies against a random-encoder control.")

EXIT_CODES = {
    ExitCode.OK: "success (verify: every check passed)",
    ExitCode.VERIFY_FAILED: "verify found a failure in the run's log",
    ExitCode.USAGE: "usage or config error (bad argument, config, data or file); nothing more was trained",
    ExitCode.CHECK_FAILED: "check violation: a check stopped the run or refused to resume it",
    ExitCode.INTERNAL: "internal error: an unexpected exception (traceback saved to a file; --debug shows it)",
    ExitCode.INTERRUPTED: "interrupted (Ctrl-C); continue with train --resume or by rerunning ablate",
}


def exit_code_table() -> str:
    return "exit codes:\n" + "\n".join(f"  {int(c):<4} {text}" for c, text in EXIT_CODES.items())


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="moola-engine", description=DESCRIPTION, epilog=exit_code_table(),
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"moola-engine {__version__}",
                        help="print the version and exit")
    parser.add_argument("--debug", action="store_true", default=False,
                        help="show the traceback of an unexpected error (also: MOOLA_DEBUG=1)")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in COMMANDS:
        module = importlib.import_module(f"moola_engine.cli.commands.{name}")
        p = module.add_parser(sub)
        # also accepted after the command; SUPPRESS keeps a top-level --debug from being reset by the subparser
        p.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                       help="show the traceback of an unexpected error (also: MOOLA_DEBUG=1)")
        p.set_defaults(_run=module.run)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help, --version (0) or a usage error (argparse printed it; 2)
        return int(exc.code) if isinstance(exc.code, int) else ExitCode.USAGE
    debug = bool(getattr(args, "debug", False) or os.environ.get("MOOLA_DEBUG"))
    try:
        return int(args._run(args) or 0)
    except MoolaError as exc:
        if os.environ.get("MOOLA_DEBUG"):
            raise
        print(f"error: {exc}", file=sys.stderr)
        return int(exc.exit_code)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return ExitCode.INTERRUPTED
    except Exception as exc:
        if debug:
            traceback.print_exc(file=sys.stderr)
            print(f"internal error: {_one_line(exc)} (exit {int(ExitCode.INTERNAL)})", file=sys.stderr)
            return ExitCode.INTERNAL
        saved = save_traceback(exc)
        where = f"traceback saved to {saved}" if saved else "the traceback could not be saved"
        print(f"internal error: {_one_line(exc)} ({where}; rerun with --debug to show it). This is a bug in "
              "moola-engine or a plugin, not in your input: please report it with that file.", file=sys.stderr)
        return ExitCode.INTERNAL


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    if len(text) > 300:
        text = text[:297] + "..."
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def save_traceback(exc: BaseException) -> Path | None:
    """Write ``exc``'s traceback to a new file in the temp folder; None when even that fails."""
    stamp = dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%S")
    try:
        fd, name = tempfile.mkstemp(prefix=f"moola-engine-traceback-{stamp}-", suffix=".txt")
        with os.fdopen(fd, "w", encoding="utf-8", errors="backslashreplace") as fh:
            fh.write(f"moola-engine {__version__}, argv: {sys.argv!r}\n")
            fh.write("".join(traceback.format_exception(type(exc), exc, exc.__traceback__)))
        return Path(name)
    except OSError:
        return None


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
