"""``moola-engine``: one subcommand per module in :mod:`moola_engine.commands`.

A :class:`~moola_engine.errors.MoolaError` prints as ``error: <message>`` and
exits with its code (2 for config/schedule errors, 3 for failed checks); no
traceback reaches a user unless ``MOOLA_DEBUG=1``.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from collections.abc import Sequence

from . import __version__
from .errors import MoolaError

# Each module defines add_parser(subparsers) and run(args) -> int.
COMMANDS = ["strategies", "plan", "train", "verify", "runs", "pretrain", "baseline", "ablate", "demo"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="moola-engine", description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--version", action="version", version=f"moola-engine {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in COMMANDS:
        module = importlib.import_module(f"moola_engine.commands.{name}")
        p = module.add_parser(sub)
        p.set_defaults(_run=module.run)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args._run(args) or 0)
    except MoolaError as exc:
        if os.environ.get("MOOLA_DEBUG"):
            raise
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
