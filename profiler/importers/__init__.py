"""Importers: recorded power traces from other tools into the run store's ``samples`` schema.

One module per format:

* :mod:`profiler.importers.nvidia_smi`: CSV written by
  ``nvidia-smi --query-gpu=... --format=csv`` (``read_nvidia_smi_csv``).
* :mod:`profiler.importers.dcgm`: NVIDIA dcgm-exporter's Prometheus text
  exposition, one scrape or a recorded series of scrapes (``parse_dcgm_text``,
  ``read_dcgm_file``, and the inverse ``format_dcgm_text``).
* :mod:`profiler.importers.seaa2023`: the SEAA 2023 dataset layout
  (``runs.parquet`` + ``traces.parquet``; ``import_seaa2023``).

Every reader returns a polars frame in the store's ``samples`` schema and
raises :class:`profiler.errors.BadInputError` for bad input: the message names
the file, the 1-based data row (header not counted) or the label set, what was
expected and what was found. Nothing is written to a store before the whole
input has been read and checked, so an import refused for bad input leaves the
store as it was (a store write that fails says what it stored).

This module holds the pieces the importers share: the per-device time-order
check, the check against samples already in a store, and the import summary.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import TYPE_CHECKING

import polars as pl

from profiler.errors import BadInputError, StoreError, where

if TYPE_CHECKING:
    from profiler.store import Store

__all__ = [
    "ImportSummary",
    "RunImport",
    "check_increasing",
    "import_samples",
    "slug",
]


@dataclass(frozen=True, slots=True)
class RunImport:
    """What an import did to one run.

    Attributes:
        run_id: The run.
        samples_new: Samples written by this import (0 on a re-import).
        samples_total: Samples of the run in the imported input.
        energy_j: Energy of the run stored in the ``runs`` table, in J.
        duration_s: Duration of the run stored in the ``runs`` table, in s.
        energy_source: ``measured`` (integrated from samples) or ``reported``.
        reported_energy_j: Energy the input itself reports, in J, if any.

    """

    run_id: str
    samples_new: int
    samples_total: int
    energy_j: float | None
    duration_s: float | None
    energy_source: str | None = None
    reported_energy_j: float | None = None

    @property
    def relative_error(self) -> float | None:
        """``energy_j / reported_energy_j - 1`` when both are known and measured, else ``None``."""
        if self.energy_source != "measured" or self.energy_j is None or not self.reported_energy_j:
            return None
        return self.energy_j / self.reported_energy_j - 1.0


@dataclass(frozen=True, slots=True)
class ImportSummary:
    """What an import did to the store.

    Attributes:
        runs: One entry per imported run, ordered by run id.
        runs_changed: Rows of the ``runs`` table inserted or updated (0 on a re-import).

    """

    runs: tuple[RunImport, ...]
    runs_changed: int

    @property
    def samples_new(self) -> int:
        """Samples written by this import, all runs."""
        return sum(r.samples_new for r in self.runs)

    @property
    def samples_total(self) -> int:
        """Samples in the imported input, all runs."""
        return sum(r.samples_total for r in self.runs)


def slug(text: str) -> str:
    """Lower-case ``text`` and join its runs of letters and digits with ``-``.

    ``"Local ML Engineer/Gamer"`` becomes ``"local-ml-engineer-gamer"``.
    """
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


def check_increasing(
    df: pl.DataFrame,
    *,
    file: str | None,
    key: tuple[str, ...] = ("run_id", "node", "device"),
    row: str = "row",
    row_is_line: bool = False,
    hint: str = "",
) -> None:
    """Refuse samples whose timestamps do not strictly increase per stream, in input order.

    Args:
        df: Samples with ``timestamp``, the ``key`` columns and a 1-based
            input row number in column ``row``.
        file: Input file, for messages.
        key: Columns that name one stream (one device of one run).
        row: Column holding the 1-based input row of each sample.
        row_is_line: The ``row`` column holds file line numbers, not data rows.
        hint: Extra advice appended to the message.

    Raises:
        BadInputError: A timestamp equals (duplicated) or precedes (unsorted)
            the previous one of the same stream; the message names both rows.

    """
    if df.height < 2:
        return
    key_cols = [k for k in key if k in df.columns]
    prev = [
        pl.col("timestamp").shift(1).alias("_prev_t"),
        pl.col(row).shift(1).alias("_prev_row"),
    ]
    if key_cols:
        prev = [e.over(key_cols) for e in prev]
    bad = (
        df.select(*key_cols, "timestamp", row)
        .with_columns(prev)
        .filter(pl.col("timestamp") <= pl.col("_prev_t"))
        .sort(row)
        .head(1)
    )
    if bad.height == 0:
        return
    r = bad.row(0, named=True)
    what = "duplicated" if r["timestamp"] == r["_prev_t"] else "unsorted"
    stream = ", ".join(f"{k} {r[k]!r}" for k in key_cols if r[k] is not None)
    word = "line" if row_is_line else "row"
    at = (
        where(file, label=f"line {r[row]}, 'timestamp'")
        if row_is_line
        else where(file, r[row], "'timestamp'")
    )
    raise BadInputError(
        f"{at}{what} timestamps: {r['timestamp']} follows "
        f"{r['_prev_t']} ({word} {r['_prev_row']}) for {stream or 'one device'}; expected "
        f"strictly increasing timestamps per device{hint}"
    )


def _run_rows(
    store: Store,
    samples: pl.DataFrame,
    run_ids: list[str],
    existing: pl.DataFrame,
    file: str | None,
) -> pl.DataFrame:
    """The ``runs`` rows of ``run_ids`` from their stored samples plus ``samples``.

    ``existing`` is the ``runs`` table; a run's row there is the base its new
    row updates.
    """
    from estimators.energy import run_energy
    from profiler.schema import conform, schema

    key = ["run_id", "node", "device", "timestamp"]
    rows = []
    for run_id in run_ids:
        mine = samples.filter(pl.col("run_id") == run_id)
        both = pl.concat([store.samples(run_id), mine]).unique(subset=key, keep="first")
        both = both.sort("node", "device", "timestamp")
        per_run = run_energy(both, file=file)
        # no row when no sample of the run has a power or counter value
        energy = per_run.row(0, named=True) if per_run.height else None
        old = existing.filter(pl.col("run_id") == run_id)
        row: dict[str, object] = old.row(0, named=True) if old.height else {"run_id": run_id}
        models = both["model"].drop_nulls()
        row.update(
            status="finished",
            start=energy["start"] if energy else None,
            end=energy["end"] if energy else None,
            duration_s=energy["duration_s"] if energy else None,
            energy_j=energy["energy_j"] if energy else None,
            energy_source="measured" if energy else None,
            gpu_count=both.select(pl.struct("node", "device").n_unique()).item(),
        )
        if row.get("job_name") is None:
            row["job_name"] = run_id
        if row.get("gpu_model") is None and models.len():
            row["gpu_model"] = models[0]
        rows.append(row)
    return conform(pl.DataFrame(rows, schema=schema("runs")), "runs", file=file)


def import_samples(
    store: Store, samples: pl.DataFrame, *, file: str | None = None
) -> ImportSummary:
    """Write imported samples and a ``finished`` run row for each run they belong to.

    Each run's row gets ``start``, ``end``, ``duration_s`` and ``energy_j``
    (``energy_source`` ``measured``) from every sample of the run, those
    already stored included (:func:`estimators.energy.run_energy`), plus
    ``gpu_model`` (when the run has none yet) and ``gpu_count`` (distinct
    node and device pairs); ``job_name`` defaults to the run id. Other columns
    of an existing run row are kept. The rows are computed and written under
    the store's lock (:meth:`Store.update_runs`), after the samples, so two
    imports into one run at once (two nodes' files, say) both end with every
    sample of the run counted.

    Args:
        store: Target run store.
        samples: Samples in the ``samples`` schema, every row with a run id.
        file: Where they came from, for messages.

    Returns:
        What was written, per run.

    Raises:
        BadInputError: A sample has no run id, conflicts with another sample
            of the input or with a stored one (the store refuses the whole
            batch then). Nothing is written then.
        StoreError: The store could not be written. If the samples were
            stored but the run rows were not, the message says so; running
            the import again writes the rows.

    """
    from profiler.schema import conform
    from profiler.store import NOT_DURABLE, UNCHANGED

    samples = conform(samples, "samples", file=file)
    if samples["run_id"].null_count():
        raise BadInputError(f"{where(file)}expected a run id for every sample; found none")
    run_ids = samples["run_id"].unique(maintain_order=True).sort().to_list()
    # Computed once before writing anything, so samples the energy integration refuses
    # leave the store as it was.
    _run_rows(store, samples, run_ids, store.runs(), file)
    totals = dict(samples.group_by("run_id").len().iter_rows())
    new: dict[str, int] = {}
    # One write for every run: the store checks all of them before writing any.
    store.write_samples(samples, file=file, on_run=lambda rid, n: new.__setitem__(str(rid), n))
    computed: list[pl.DataFrame] = []

    def rows(runs: pl.DataFrame) -> pl.DataFrame:
        # Again under the lock: another import may have stored samples of these runs since.
        computed.append(_run_rows(store, samples, run_ids, runs, file))
        return computed[-1]

    try:
        changed = store.update_runs(rows, file=file)
    except (StoreError, BadInputError) as err:
        if NOT_DURABLE in str(err):  # the rows are in place; the message says so
            raise
        n = sum(new.values())
        if len(run_ids) == 1:
            what = f"run {run_ids[0]!r} were stored but its run record was not"
        else:
            what = f"runs {run_ids} were stored but their run records were not"
        raise type(err)(
            f"{str(err).replace(f'; {UNCHANGED}', '')}; {n} new samples of {what}; run the "
            "import again to write " + ("it" if len(run_ids) == 1 else "them")
        ) from err
    return ImportSummary(
        runs=tuple(
            RunImport(
                run_id=r["run_id"],
                samples_new=new.get(r["run_id"], 0),
                samples_total=int(totals.get(r["run_id"], 0)),
                energy_j=r["energy_j"],
                duration_s=r["duration_s"],
                energy_source=r["energy_source"],
            )
            for r in computed[-1].iter_rows(named=True)
        ),
        runs_changed=changed,
    )
