"""Schemas of the run store's tables: the contract between every part of wattwise.

Three tables (see ``profiler.store``):

* ``runs``: one row per training run, keyed by ``run_id``.
* ``samples``: power samples, keyed by (``node``, ``device``, ``timestamp``)
  within a run.
* ``epochs``: epoch marks, keyed by (``run_id``, ``epoch``).

All timestamps are ``Datetime("us", "UTC")``, from :data:`TIME_MIN` up to (not
including) :data:`TIME_END`. Energies are in joules, power in
watts, durations in seconds, memory in MiB, temperatures in degrees Celsius.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Literal

import polars as pl

from profiler.errors import SchemaError, where

UTC_US = pl.Datetime("us", "UTC")

TableName = Literal["runs", "samples", "epochs"]
RunStatus = Literal["running", "finished", "failed"]
RUN_STATUSES: tuple[str, ...] = ("running", "finished", "failed")
SOURCES: tuple[str, ...] = ("nvml", "dcgm", "rapl", "replay", "modelled", "nvidia-smi")

#: Earliest time a table holds (UTC): the Unix epoch. No power sample or epoch of a training
#: run is older; an earlier time is a wrong unit or a clock that was never set.
TIME_MIN = datetime(1970, 1, 1, tzinfo=UTC)
#: First time a table refuses (UTC). Nanoseconds since 1970 in an int64 (numpy, pandas, Arrow
#: ns timestamps) end on 2262-04-11; Python's datetime ends with year 9999, which an
#: offset can push into year 10000 in UTC (polars would store it, every reader then fails).
TIME_END = datetime(2262, 4, 11, tzinfo=UTC)
#: What a time must be, for messages.
TIME_RANGE = (
    f"a time from {TIME_MIN:%Y-%m-%dT%H:%M:%SZ} up to (not including) "
    f"{TIME_END:%Y-%m-%dT%H:%M:%SZ} (UTC)"
)

#: Run ids become directory names, so they are restricted to a safe alphabet
#: (no path separators, no leading dot): this is what stops path traversal.
RUN_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


@dataclass(frozen=True, slots=True)
class Column:
    """One column of a store table.

    Attributes:
        name: Column name.
        dtype: Polars dtype stored on disk.
        required: Whether nulls are refused (and the column must be present).
        doc: Meaning and unit.

    """

    name: str
    dtype: pl.DataType
    required: bool
    doc: str


SAMPLES: tuple[Column, ...] = (
    Column("run_id", pl.String(), False, "run the sample belongs to; null until assigned"),
    Column("node", pl.String(), True, "host name of the node"),
    Column("device", pl.String(), True, "device id on the node (GPU index or UUID, 'package-0')"),
    Column("model", pl.String(), False, "device model, e.g. 'NVIDIA GeForce RTX 3090'"),
    Column("timestamp", UTC_US, True, "when the sample was taken, UTC"),
    Column("power_w", pl.Float64(), False, "power draw in W; null when the source gave none"),
    Column("energy_j", pl.Float64(), False, "cumulative energy counter in J, where one exists"),
    Column("gpu_util_pct", pl.Float64(), False, "utilisation in percent"),
    Column("mem_util_pct", pl.Float64(), False, "memory-controller utilisation in percent"),
    Column("mem_used_mib", pl.Float64(), False, "device memory used in MiB"),
    Column("temp_c", pl.Float64(), False, "temperature in degrees Celsius"),
    Column("source", pl.String(), True, f"where the number came from: one of {SOURCES}"),
)

EPOCHS: tuple[Column, ...] = (
    Column("run_id", pl.String(), True, "run the epoch belongs to"),
    Column("epoch", pl.Int64(), True, "epoch number as the training code counts it"),
    Column("start", UTC_US, True, "epoch start, UTC"),
    Column("end", UTC_US, True, "epoch end, UTC"),
)

RUNS: tuple[Column, ...] = (
    Column("run_id", pl.String(), True, "unique run id"),
    Column("job_name", pl.String(), False, "human name of the job"),
    Column("node_type", pl.String(), False, "node type the run ran on"),
    Column("gpu_model", pl.String(), False, "GPU model name"),
    Column("gpu_count", pl.Int64(), False, "GPUs used"),
    Column("architecture", pl.String(), False, "model architecture name"),
    Column("batch_size", pl.Int64(), False, "samples per batch"),
    Column("image_height", pl.Int64(), False, "input height in pixels"),
    Column("image_width", pl.Int64(), False, "input width in pixels"),
    Column("training_size", pl.Int64(), False, "training samples per epoch"),
    Column("validation_size", pl.Int64(), False, "validation samples per epoch"),
    Column("gflops_forward", pl.Float64(), False, "forward GFLOPs per sample"),
    Column("planned_epochs", pl.Int64(), False, "epochs the run was configured for"),
    Column("trained_epochs", pl.Int64(), False, "epochs actually run"),
    Column("precision", pl.String(), False, "numeric precision, e.g. 'fp32', 'amp'"),
    Column("status", pl.String(), True, f"one of {RUN_STATUSES}"),
    Column("start", UTC_US, False, "run start, UTC"),
    Column("end", UTC_US, False, "run end, UTC; null while running"),
    Column("duration_s", pl.Float64(), False, "wall time in s"),
    Column("energy_j", pl.Float64(), False, "total energy of the run in J"),
    Column(
        "energy_source",
        pl.String(),
        False,
        "how energy_j was obtained: 'measured', 'modelled' (CPU model only), 'reported'",
    ),
    Column("config", pl.String(), False, "further configuration as a JSON object"),
)

#: The columns that hold a sample's measurement. A sample with both null (an nvidia-smi
#: ``[N/A]`` cell, a cut-off last line, a source that failed at that tick) is a
#: *placeholder*: a copy of it with a value fills it, and it is no conflict.
SAMPLE_VALUES: tuple[str, ...] = ("power_w", "energy_j")

TABLES: dict[str, tuple[Column, ...]] = {"runs": RUNS, "samples": SAMPLES, "epochs": EPOCHS}
KEYS: dict[str, tuple[str, ...]] = {
    "runs": ("run_id",),
    "samples": ("run_id", "node", "device", "timestamp"),
    "epochs": ("run_id", "epoch"),
}


def schema(table: str) -> pl.Schema:
    """The polars schema of a store table.

    Args:
        table: One of ``runs``, ``samples``, ``epochs``.

    Returns:
        Column names to dtypes, in storage order.

    """
    return pl.Schema({c.name: c.dtype for c in TABLES[table]})


def empty(table: str) -> pl.DataFrame:
    """An empty frame with a table's schema."""
    return pl.DataFrame(schema=schema(table))


def is_placeholder(columns: Sequence[str]) -> pl.Expr:
    """True for sample rows without a measurement: every one of ``SAMPLE_VALUES`` is null.

    Args:
        columns: The frame's columns; a value column it lacks counts as null.

    """
    expr = pl.lit(True)
    for c in SAMPLE_VALUES:
        if c in columns:
            expr = expr & pl.col(c).is_null()
    return expr


def drop_filled_placeholders(
    df: pl.DataFrame, key: Sequence[str] = KEYS["samples"]
) -> tuple[pl.DataFrame, pl.DataFrame]:
    """``df`` without the placeholder rows whose key also has a row with a measurement.

    A placeholder (see :data:`SAMPLE_VALUES`) is no conflict with a valued copy
    of the same sample: the valued copy fills it, whichever comes first. Other
    rows (placeholders alone, identical or conflicting valued copies) are kept.

    Args:
        df: Sample rows (conformed or not). A frame lacking a key column is
            returned as is (:func:`conform` then says what is missing).
        key: The sample key.

    Returns:
        The rows kept, in order, and the keys (one row each) whose first row
        was a placeholder that a later valued row filled; a placeholder after
        a valued row is a plain duplicate and not among them.

    """
    key = list(key)
    none = df.select(key).clear() if set(key) <= set(df.columns) else pl.DataFrame()
    if not set(key) <= set(df.columns) or df.height < 2:
        return df, none
    empty_ = is_placeholder(df.columns)
    flags = df.select(
        empty_.alias("_empty"),
        (~empty_).any().over(key).alias("_valued"),
        empty_.first().over(key).alias("_first_empty"),
    )
    drop = flags["_empty"] & flags["_valued"]
    if not drop.any():
        return df, none
    filled = df.filter(drop & flags["_first_empty"]).select(key).unique(maintain_order=True)
    # The valued copy keeps what the placeholder knew that it does not (model, utilisation,
    # temperature...): its missing columns are taken from the other rows of its sample.
    others = [c for c in df.columns if c not in key and c not in SAMPLE_VALUES]
    if others:
        df = df.with_columns(
            pl.col(c).fill_null(strategy="forward").fill_null(strategy="backward").over(key)
            for c in others
        )
    return df.filter(~drop), filled


def _castable(found: pl.DataType, want: pl.DataType) -> bool:
    if found == want or found == pl.Null:
        return True
    if want == pl.Float64:
        return found.is_numeric()
    if want == pl.Int64:
        return found.is_integer()
    if isinstance(want, pl.Datetime) and isinstance(found, pl.Datetime):
        return found.time_zone is not None  # naive timestamps are ambiguous: refuse
    return False


def check_run_id(run_id: str, *, context: str = "") -> str:
    """Return ``run_id`` unchanged, or raise if it is not a safe run id.

    Raises:
        BadInputError: The id is empty, too long, or contains characters
            outside ``[A-Za-z0-9._-]`` (or starts with ``.``, ``_`` or ``-``).

    """
    # fullmatch: with match, '$' would also accept a trailing line break ("a\n").
    if not isinstance(run_id, str) or not RUN_ID_RE.fullmatch(run_id):
        raise SchemaError(
            f"{context}run_id must match {RUN_ID_RE.pattern} (letters, digits, '.', '_', '-', "
            f"at most 128, no path separators); found {run_id!r}"
        )
    return run_id


def conform(df: pl.DataFrame, table: str, *, file: str | None = None) -> pl.DataFrame:
    """Check a frame against a table's schema and return it in storage form.

    Missing optional columns are added as nulls; numeric columns are widened
    (int to float, int32 to int64); time zones are converted to UTC. Rows
    sharing a key must be identical, except that a sample without a
    measurement (a placeholder, see :data:`SAMPLE_VALUES`) may share its key
    with a valued copy; such rows are returned as they are (the store keeps
    the valued copy, see :func:`drop_filled_placeholders`).

    Args:
        df: Rows to be written.
        table: Target table name.
        file: File the rows came from, for messages.

    Returns:
        The frame with exactly the table's columns, in order and dtype.

    Raises:
        SchemaError: Unknown or missing columns, wrong dtypes, nulls in
            required columns, times outside :data:`TIME_MIN` ..
            :data:`TIME_END`, bad run ids, statuses or sources, negative or
            non-finite power or energy, epochs ending before they start, two
            different rows with one key.

    """
    cols = TABLES[table]
    known = {c.name for c in cols}
    unknown = [n for n in df.columns if n not in known]
    if unknown:
        raise SchemaError(
            f"{where(file)}table {table!r} has no column(s) {unknown}; known columns: "
            f"{sorted(known)}"
        )
    out = []
    for c in cols:
        if c.name not in df.columns:
            if c.required:
                raise SchemaError(
                    f"{where(file)}table {table!r} needs column {c.name!r} ({c.doc}); "
                    f"found columns {df.columns}"
                )
            out.append(pl.lit(None, dtype=c.dtype).alias(c.name))
            continue
        found = df.schema[c.name]
        if not _castable(found, c.dtype):
            raise SchemaError(
                f"{where(file, label=repr(c.name))}expected {c.dtype} ({c.doc}); found {found}"
            )
        expr = pl.col(c.name)
        if isinstance(c.dtype, pl.Datetime) and isinstance(found, pl.Datetime):
            expr = expr.dt.convert_time_zone("UTC").dt.cast_time_unit("us")
        else:
            expr = expr.cast(c.dtype)
        out.append(expr.alias(c.name))
    try:
        res = df.select(out)
    except pl.exceptions.InvalidOperationError:
        # A value does not fit the stored type (an Int128 epoch past 2**63, say): name the column.
        for c, expr in zip(cols, out, strict=True):
            try:
                df.select(expr)
            except pl.exceptions.InvalidOperationError:
                raise SchemaError(
                    f"{where(file, label=repr(c.name))}expected {c.dtype} ({c.doc}); found "
                    f"values of {df.schema[c.name]} that do not fit it"
                ) from None
        raise
    _check_values(res, table, file)
    return res


def first_time_out_of_range(
    df: pl.DataFrame, columns: Sequence[str] | None = None
) -> tuple[int, str, str] | None:
    """The first time outside :data:`TIME_MIN` .. :data:`TIME_END` in ``df``'s datetime columns.

    Nulls are not checked (the schema check says whether they are allowed).

    Args:
        df: A frame; only its time-zone-aware ``Datetime`` columns are looked at.
        columns: The columns to check, in this order; default every such column.

    Returns:
        ``None`` when every time is in range, else (row index counted from 0,
        column, the value as ISO 8601 text in UTC), first by column then by row.
        The text is formatted by polars: the value may lie beyond what Python's
        ``datetime`` can hold.

    """
    names = df.columns if columns is None else list(columns)
    for name in names:
        dtype = df.schema.get(name)
        if not isinstance(dtype, pl.Datetime) or dtype.time_zone is None:
            continue
        col = pl.col(name)
        bad = df.select(
            (col.is_not_null() & ((col < TIME_MIN) | (col >= TIME_END))).arg_true().first()
        ).item()
        if bad is not None:
            text = df.select(
                col.gather(int(bad))
                .dt.convert_time_zone("UTC")
                .dt.to_string("%Y-%m-%dT%H:%M:%S%.f%:z")
            ).item()
            return int(bad), name, str(text)
    return None


def _first_bad(df: pl.DataFrame, mask: pl.Expr) -> tuple[int, dict[str, object]] | None:
    hit = df.with_row_index("_row").filter(mask).head(1)
    if hit.height == 0:
        return None
    row = hit.row(0, named=True)
    return int(row.pop("_row")) + 1, row


def _check_values(df: pl.DataFrame, table: str, file: str | None) -> None:
    # First: the other checks quote rows as Python values, and Python cannot hold year 10000.
    bad_time = first_time_out_of_range(df, [c.name for c in TABLES[table]])
    if bad_time:
        i, name, text = bad_time
        raise SchemaError(f"{where(file, i + 1, repr(name))}expected {TIME_RANGE}; found {text}")
    for c in TABLES[table]:
        if c.required:
            bad = _first_bad(df, pl.col(c.name).is_null())
            if bad:
                raise SchemaError(
                    f"{where(file, bad[0], repr(c.name))}expected a value ({c.doc}); found null"
                )
    for name in ("power_w", "energy_j"):
        if name in df.columns and df.schema[name] == pl.Float64:
            bad = _first_bad(df, ~pl.col(name).is_finite() | (pl.col(name) < 0))
            if bad:
                raise SchemaError(
                    f"{where(file, bad[0], repr(name))}expected a finite number >= 0; "
                    f"found {bad[1][name]}"
                )
    if "run_id" in df.columns:
        bad = _first_bad(
            df, pl.col("run_id").is_not_null() & ~pl.col("run_id").str.contains(RUN_ID_RE.pattern)
        )
        if bad:
            check_run_id(str(bad[1]["run_id"]), context=where(file, bad[0]))
    if table == "runs":
        bad = _first_bad(df, ~pl.col("status").is_in(RUN_STATUSES))
        if bad:
            raise SchemaError(
                f"{where(file, bad[0], repr('status'))}expected one of {RUN_STATUSES}; "
                f"found {bad[1]['status']!r}"
            )
    if table == "samples":
        bad = _first_bad(df, ~pl.col("source").is_in(SOURCES))
        if bad:
            raise SchemaError(
                f"{where(file, bad[0], repr('source'))}expected one of {SOURCES}; "
                f"found {bad[1]['source']!r}"
            )
    if table in ("epochs", "runs"):
        bad = _first_bad(df, pl.col("end") < pl.col("start"))
        if bad:
            raise SchemaError(
                f"{where(file, bad[0], 'run ' + str(bad[1]['run_id']))}expected end >= start; "
                f"found start {bad[1]['start']} and end {bad[1]['end']}"
            )
    key = KEYS[table]
    if table == "samples":
        # A placeholder (no power, no counter) and a valued copy of it are no conflict:
        # the value fills it (the store keeps the valued copy).
        df = drop_filled_placeholders(df, key)[0]
    dup = df.filter(pl.struct(key).is_duplicated())
    if dup.height:
        # Identical duplicates are harmless (stored once); conflicting ones are not.
        conflicting = df.unique().filter(pl.struct(key).is_duplicated())
        if conflicting.height:
            row = conflicting.row(0, named=True)
            raise SchemaError(
                f"{where(file)}two different rows share the key "
                f"{ {k: row[k] for k in key} } of table {table!r}; expected each key once"
            )
