"""The error tree every wattwise package raises.

::

    WattwiseError                  root; catch this to catch everything of ours
    ├── BadInputError              a file, frame, argument or payload is malformed
    │   └── SchemaError            a frame does not match a store table's schema
    ├── StoreError                 the run store cannot be read or written (disk full, lock)
    ├── SourceUnavailableError     a power source cannot be reached or opened
    ├── NotSupportedError          the hardware or source lacks the asked-for feature
    ├── PermissionDeniedError      the OS or driver refuses access
    └── NotFittedError             an estimator was used before ``fit``

Messages say what was expected, what was found and, where known, the file and
the row or label, so a user can fix the input without reading the code.
"""

from __future__ import annotations


class WattwiseError(Exception):
    """Root of every error wattwise raises on purpose."""


class BadInputError(WattwiseError, ValueError):
    """Input data or an argument is malformed; the message says where and why."""


class SchemaError(BadInputError):
    """A frame does not match the schema of the table it is written to."""


class StoreError(WattwiseError, OSError):
    """The run store could not be read or written; nothing half-written remains."""


class SourceUnavailableError(WattwiseError):
    """A power source cannot be reached or opened."""


class NotSupportedError(WattwiseError):
    """The hardware or source does not support the requested measurement."""


class PermissionDeniedError(WattwiseError, PermissionError):
    """The operating system or driver refuses access to a measurement."""


class NotFittedError(WattwiseError, AttributeError):
    """An estimator's ``predict`` was called before ``fit``."""


def where(file: str | None = None, row: int | None = None, label: str | None = None) -> str:
    """Format a location prefix such as ``trace.csv, row 12: ``.

    Args:
        file: Path of the offending file, if any.
        row: 1-based data row (header not counted), if known.
        label: A label, column or key that pins the place down, if known.

    Returns:
        The prefix, empty when nothing is known.

    """
    parts = [p for p in (file, f"row {row}" if row is not None else None, label) if p]
    return (", ".join(parts) + ": ") if parts else ""
