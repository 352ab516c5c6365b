"""Schemas of the run store's tables: the contract between every part of wattwise.

Three tables (see ``profiler.store``):

* ``runs``: one row per training run, keyed by ``run_id``.
* ``samples``: power samples, keyed by (``node``, ``device``, ``timestamp``)
  within a run.
* ``epochs``: epoch marks, keyed by (``run_id``, ``epoch``).

All timestamps are ``Datetime("us", "UTC")``. Energies are in joules, power in
watts, durations in seconds, memory in MiB, temperatures in degrees Celsius.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal

import polars as pl

from profiler.errors import SchemaError, where

UTC_US = pl.Datetime("us", "UTC")

TableName = Literal["runs", "samples", "epochs"]
RunStatus = Literal["running", "finished", "failed"]
RUN_STATUSES: tuple[str, ...] = ("running", "finished", "failed")
SOURCES: tuple[str, ...] = ("nvml", "dcgm", "rapl", "replay", "modelled", "nvidia-smi")

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
    (int to float, int32 to int64); time zones are converted to UTC.

    Args:
        df: Rows to be written.
        table: Target table name.
        file: File the rows came from, for messages.

    Returns:
        The frame with exactly the table's columns, in order and dtype.

    Raises:
        SchemaError: Unknown or missing columns, wrong dtypes, nulls in
            required columns, bad run ids, statuses or sources, negative or
            non-finite power or energy, epochs ending before they start.

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


def _first_bad(df: pl.DataFrame, mask: pl.Expr) -> tuple[int, dict[str, object]] | None:
    hit = df.with_row_index("_row").filter(mask).head(1)
    if hit.height == 0:
        return None
    row = hit.row(0, named=True)
    return int(row.pop("_row")) + 1, row


def _check_values(df: pl.DataFrame, table: str, file: str | None) -> None:
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
