"""The ``wattwise`` command line."""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys
from collections.abc import Sequence

from profiler.errors import BadInputError, WattwiseError


def build_parser() -> argparse.ArgumentParser:
    """The top-level parser with every registered sub-command."""
    from cluster.commands import MODULES

    parser = argparse.ArgumentParser(
        prog="wattwise",
        description="Energy profiling, projection (STEP) and prediction (PRE) for DL training.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug messages")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as err:
            if err.name == name:  # a command group not written yet
                continue
            raise
        module.register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI.

    Returns:
        0 on success, 2 on bad input or usage, 1 on other wattwise errors.

    """
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.WARNING,
        format="%(levelname)s %(name)s: %(message)s",
    )
    try:
        code = int(args.func(args) or 0)
        sys.stdout.flush()  # here, so that a closed pipe is handled below
        return code
    except BrokenPipeError:
        # The reader went away (`wattwise runs --json | head`): no traceback, and no second
        # error when Python flushes stdout at exit.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    except BadInputError as err:
        print(f"wattwise {args.command}: error: {err}", file=sys.stderr)
        return 2
    except WattwiseError as err:
        print(f"wattwise {args.command}: error: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
