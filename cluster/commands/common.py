"""Helpers shared by the CLI commands: store option, rich console, parquet reading."""

from __future__ import annotations

import argparse
import math
import os
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from profiler.errors import BadInputError

if TYPE_CHECKING:
    import polars as pl
    from rich.console import Console

    from profiler.store import Store


def add_store_option(parser: argparse.ArgumentParser) -> None:
    """Add ``--store DIR`` (default ``$WATTWISE_STORE`` or the per-user data directory)."""
    parser.add_argument(
        "--store",
        metavar="DIR",
        default=None,
        help="run store directory (default: $WATTWISE_STORE, else ~/.local/share/wattwise/store)",
    )


def open_store(args: argparse.Namespace) -> Store:
    """The store named by ``--store`` (or the default one).

    Raises:
        BadInputError: The path is a file, or a directory this user cannot list
            (a store that does not exist yet is fine: it is created on first write).

    """
    from profiler.store import Store

    store = Store(getattr(args, "store", None))
    try:
        os.listdir(store.root)
    except FileNotFoundError:
        pass
    except OSError as err:
        raise BadInputError(
            f"cannot read the store at {store.root}: {err.strerror or err}; expected a store "
            "directory this user can read (check its permissions, or give another --store)"
        ) from err
    return store


def console(stderr: bool = False) -> Console:
    """A rich console (plain text when not a terminal)."""
    from rich.console import Console

    return Console(stderr=stderr, highlight=False)


def check_positive(value: float, option: str, what: str = "a finite number") -> float:
    """``value`` if it is a finite number > 0.

    Raises:
        BadInputError: ``value`` is NaN, infinite, zero or negative (the message
            says ``option`` must be ``what`` > 0).

    """
    if not (math.isfinite(value) and value > 0):
        raise BadInputError(f"{option} must be {what} > 0; found {value}")
    return value


def whole_arg(minimum: int) -> Callable[[str], int]:
    """An argparse type: a whole number of at least ``minimum`` (else a usage error, exit 2)."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = minimum - 1
        if value < minimum:
            raise argparse.ArgumentTypeError(f"expected a whole number >= {minimum}, got {text!r}")
        return value

    return parse


def positive_arg(text: str) -> float:
    """An argparse type: a finite number above 0 (else a usage error, exit 2)."""
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"expected a finite number > 0, got {text!r}")
    return value


def widen(out: Console, *renderables: Any) -> Console:
    """Make ``out`` wide enough for ``renderables`` when it is not a terminal; returns it.

    Off a terminal rich falls back to 80 columns (or ``$COLUMNS``) and would cut
    a wide table's cells with an ellipsis; a file or pipe has no width, so there
    tables are printed whole, at their natural width.
    """
    if not out.is_terminal and renderables:
        wide = out.options.update_width(1_000_000)
        need = max(out.measure(r, options=wide).maximum for r in renderables)
        out.width = max(out.width, need)
    return out


def print_whole(out: Console, *renderables: Any) -> None:
    """Print ``renderables`` on ``out``, widened first (see :func:`widen`)."""
    widen(out, *renderables).print(*renderables)


def read_parquet(path: str, what: str) -> pl.DataFrame:
    """Read a parquet file given on the command line.

    Raises:
        BadInputError: The file is missing or not parquet.

    """
    import polars as pl

    p = Path(path)
    if not p.is_file():
        raise BadInputError(f"{path}: expected a parquet file of {what}; no such file")
    try:
        return pl.read_parquet(p)
    except Exception as err:  # polars raises several types for corrupt files
        raise BadInputError(
            f"{path}: expected a parquet file of {what}; could not read it ({err})"
        ) from err
