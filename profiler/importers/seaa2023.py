"""Import the SEAA 2023 dataset layout (``runs.parquet`` + ``traces.parquet``) into a run store.

The dataset (del Rey, Martínez-Fernández, Cruz, Franch: "Do DL models and
training environments have an impact on energy consumption?", SEAA 2023;
GAISSA-UPC/seaa2023_ect, CC BY 4.0) holds one row per training run and 1 Hz
``nvidia-smi`` power traces for most of them.

Mapping onto the store:

* ``traces.parquet`` -> ``samples``: node = slug of the run's ``environment``
  (``cloud``, ``local-ml-engineer-gamer``, ``local-normal-user``), device
  ``"0"`` (one GPU per run), model = ``gpu_model``, source ``nvidia-smi``.
  The traces' timestamps are naive local time of the measuring machine, whose
  zone the dataset does not record: they are stored as if they were UTC.
  Durations and energies do not depend on this; wall-clock times are off by
  the machine's UTC offset.
* ``runs.parquet`` -> ``runs``: ``job_name`` = ``run_id``; ``node_type`` =
  the environment slug; ``gpu_count`` 1; ``image_height`` and ``image_width``
  128 (the dataset does not record them; the authors' training code,
  ``src/models`` of the replication package, trains every architecture on
  128 x 128 images); ``planned_epochs`` null (the runs
  used early stopping, so the plan is unknown); status ``finished``; start
  and end from the trace (null without one); ``duration_s`` as reported;
  ``energy_j`` the trapezoidal integral of the trace
  (:func:`estimators.energy.run_energy`, ``energy_source`` ``measured``) or,
  without a trace, the reported ``gpu_energy_j`` (``reported``). ``config``
  is a JSON object of every column not mapped above (``environment``,
  ``run``, ``f1_score``, ``accuracy``, ``avg_power_w``, ``power_limit_w``,
  ``gpu_energy_j`` as reported, ``has_trace``...).

Everything is read and checked before anything is written; samples are
written first, the runs table last. Importing again changes nothing.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import TYPE_CHECKING

import polars as pl

from profiler.errors import BadInputError, where
from profiler.importers import (
    ImportSummary,
    RunImport,
    check_increasing,
    slug,
)
from profiler.schema import conform

if TYPE_CHECKING:
    from profiler.store import Store

#: runs.parquet columns copied into runs-table columns of the same name.
_SAME = (
    "run_id",
    "gpu_model",
    "architecture",
    "batch_size",
    "training_size",
    "validation_size",
    "gflops_forward",
    "trained_epochs",
    "duration_s",
)
#: Input size of every SEAA 2023 run (GAISSA-UPC/seaa2023_ect, src/models); not in the data.
SEAA_IMAGE_SIZE = 128
_RUNS_NEED = (*_SAME, "environment", "gpu_energy_j")
_TRACES_NEED = ("run_id", "timestamp", "power_w")
_TRACE_VALUES = ("power_w", "gpu_util_pct", "mem_util_pct", "mem_used_mib", "temp_c")


def _read(path: Path, need: tuple[str, ...], what: str) -> pl.DataFrame:
    if not path.is_file():
        raise BadInputError(
            f"{path}: expected the dataset's {what} file; no such file. Point the import at the "
            "folder holding runs.parquet and traces.parquet"
        )
    try:
        df = pl.read_parquet(path)
    except Exception as err:  # polars raises several types for a corrupt file
        raise BadInputError(
            f"{path}: expected a parquet file of {what}; cannot read it ({err})"
        ) from err
    missing = [c for c in need if c not in df.columns]
    if missing:
        raise BadInputError(
            f"{where(str(path))}expected column(s) {missing} in {what}; found {df.columns}"
        )
    return df


def _config(row: dict[str, object]) -> str:
    clean = {
        k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in row.items()
    }
    return json.dumps(clean, sort_keys=True, default=str)


def _check_runs(runs: pl.DataFrame, file: str) -> None:
    dup = runs.with_row_index("row", offset=1).filter(pl.col("run_id").is_duplicated()).head(1)
    if dup.height:
        r = dup.row(0, named=True)
        raise BadInputError(
            f"{where(file, r['row'], repr('run_id'))}run {r['run_id']!r} appears more than once; "
            "expected one row per run"
        )
    for col in _RUNS_NEED:
        if col in ("run_id", "environment") and runs[col].null_count():
            row = int(runs.with_row_index("row", offset=1).filter(pl.col(col).is_null())["row"][0])
            raise BadInputError(f"{where(file, row, repr(col))}expected a value; found null")


def _samples(traces: pl.DataFrame, runs: pl.DataFrame, file: str) -> pl.DataFrame:
    ts_type = traces.schema["timestamp"]
    if not isinstance(ts_type, pl.Datetime):
        raise BadInputError(
            f"{where(file, label=repr('timestamp'))}expected a datetime column; found {ts_type}"
        )
    ts = pl.col("timestamp")
    ts = (
        ts.dt.replace_time_zone("UTC")
        if ts_type.time_zone is None
        else ts.dt.convert_time_zone("UTC")
    )
    for col in _TRACE_VALUES:
        if col in traces.columns and not (
            traces.schema[col].is_numeric() or traces.schema[col] == pl.Null
        ):
            raise BadInputError(
                f"{where(file, label=repr(col))}expected numbers; found {traces.schema[col]}"
            )
    nodes = runs.select(
        "run_id",
        pl.col("environment").map_elements(slug, return_dtype=pl.String).alias("node"),
        pl.col("gpu_model").alias("model"),
    )
    df = traces.with_row_index("row", offset=1).with_columns(
        pl.col("row").cast(pl.Int64), ts.dt.cast_time_unit("us").alias("timestamp")
    )
    df = df.join(nodes, on="run_id", how="left", maintain_order="left")
    orphan = df.filter(pl.col("node").is_null()).head(1)
    if orphan.height:
        r = orphan.row(0, named=True)
        raise BadInputError(
            f"{where(file, r['row'], repr('run_id'))}run {r['run_id']!r} has samples but no row "
            "in runs.parquet; expected every traced run to be listed there"
        )
    bad = df.filter(pl.col("timestamp").is_null()).head(1)
    if bad.height:
        raise BadInputError(
            f"{where(file, bad['row'][0], repr('timestamp'))}expected a timestamp; found null"
        )
    bad = df.filter(pl.col("power_w") < 0).head(1)
    if bad.height:
        r = bad.row(0, named=True)
        raise BadInputError(
            f"{where(file, r['row'], repr('power_w'))}expected a power >= 0 W; found {r['power_w']}"
        )
    check_increasing(df.with_columns(pl.lit("0").alias("device")), file=file, key=("run_id",))
    out = df.select(
        "run_id",
        "node",
        pl.lit("0").alias("device"),
        "model",
        "timestamp",
        *[c for c in _TRACE_VALUES if c in df.columns],
        pl.lit("nvidia-smi").alias("source"),
    )
    return conform(out, "samples", file=file)


def _run_rows(runs: pl.DataFrame, energy: pl.DataFrame, file: str) -> pl.DataFrame:
    extra = [c for c in runs.columns if c not in _SAME]
    configs = [_config(r) for r in runs.select(extra).iter_rows(named=True)]
    df = runs.select(*_SAME, pl.col("environment"), pl.col("gpu_energy_j")).with_columns(
        pl.Series("config", configs, dtype=pl.String)
    )
    df = df.join(
        energy.select("run_id", "start", "end", pl.col("energy_j").alias("_measured")),
        on="run_id",
        how="left",
        maintain_order="left",
    )
    out = df.select(
        "run_id",
        pl.col("run_id").alias("job_name"),
        pl.col("environment").map_elements(slug, return_dtype=pl.String).alias("node_type"),
        "gpu_model",
        pl.lit(1, pl.Int64).alias("gpu_count"),
        "architecture",
        "batch_size",
        pl.lit(SEAA_IMAGE_SIZE, pl.Int64).alias("image_height"),
        pl.lit(SEAA_IMAGE_SIZE, pl.Int64).alias("image_width"),
        "training_size",
        "validation_size",
        pl.col("gflops_forward").cast(pl.Float64),
        pl.lit(None, pl.Int64).alias("planned_epochs"),
        "trained_epochs",
        pl.lit("finished").alias("status"),
        "start",
        "end",
        pl.col("duration_s").cast(pl.Float64),
        pl.coalesce(pl.col("_measured"), pl.col("gpu_energy_j").cast(pl.Float64)).alias("energy_j"),
        pl.when(pl.col("_measured").is_not_null())
        .then(pl.lit("measured"))
        .otherwise(pl.lit("reported"))
        .alias("energy_source"),
        "config",
    )
    return conform(out, "runs", file=file)


def import_seaa2023(store: Store, folder: str | Path, *, progress: bool = True) -> ImportSummary:
    """Import the dataset in ``folder`` into ``store``.

    Args:
        store: Target run store.
        folder: Folder holding ``runs.parquet`` and ``traces.parquet``.
        progress: Show a progress bar over runs on stderr.

    Returns:
        Per run: samples written and in the input, energy (J), duration (s),
        energy source and the dataset's own ``gpu_energy_j``; and how many
        rows of the runs table changed.

    Raises:
        BadInputError: A file is missing or unreadable, a column is missing
            or of the wrong type, a run id repeats, a trace belongs to no run,
            a power is negative, or a run's timestamps are unsorted or
            duplicated; or a sample is already stored with another value.
            Nothing is written then.

    """
    from estimators.energy import run_energy

    folder = Path(folder)
    runs_path, traces_path = folder / "runs.parquet", folder / "traces.parquet"
    runs = _read(runs_path, _RUNS_NEED, "runs")
    traces = _read(traces_path, _TRACES_NEED, "traces")
    _check_runs(runs, str(runs_path))
    samples = _samples(traces, runs, str(traces_path))
    energy = run_energy(samples, file=str(traces_path))
    rows = _run_rows(runs, energy, str(runs_path))

    new: dict[str, int] = {}

    def written(run_id: str | None, n: int) -> None:
        new[str(run_id)] = n

    if progress:
        from rich.console import Console
        from rich.progress import Progress

        with Progress(console=Console(stderr=True), transient=True) as bar:
            task = bar.add_task("importing seaa2023 runs", total=samples["run_id"].n_unique())

            def advance(run_id: str | None, n: int) -> None:
                written(run_id, n)
                bar.advance(task)

            store.write_samples(samples, file=str(traces_path), on_run=advance)
    else:
        store.write_samples(samples, file=str(traces_path), on_run=written)
    changed = store.write_runs(rows, file=str(runs_path))

    totals = dict(samples.group_by("run_id").len().iter_rows())
    reported = dict(runs.select("run_id", "gpu_energy_j").iter_rows())
    summary = [
        RunImport(
            run_id=r["run_id"],
            samples_new=new.get(r["run_id"], 0),
            samples_total=int(totals.get(r["run_id"], 0)),
            energy_j=r["energy_j"],
            duration_s=r["duration_s"],
            energy_source=r["energy_source"],
            reported_energy_j=reported.get(r["run_id"]),
        )
        for r in rows.sort("run_id").iter_rows(named=True)
    ]
    return ImportSummary(runs=tuple(summary), runs_changed=changed)
