"""Replay source: plays recorded traces back in real time or faster, as fake devices.

Inputs: a store ``samples`` table, the shared dataset's ``traces.parquet``
(one device per run), an nvidia-smi CSV, or any frame with ``device``,
``timestamp`` and ``power_w``. Each device's trace starts at the replay's
anchor (by default the moment the source is created) and keeps its own
sample spacing to the microsecond, so replaying at any speed yields exactly
the recorded samples and therefore exactly the recorded energy; ``speed``
only sets how fast they are released. This is the source tests and demos use
on machines without a GPU.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from datetime import datetime, timedelta
from pathlib import Path

import numpy as np
import polars as pl

from profiler.errors import BadInputError, where
from profiler.sources.base import PowerSample, utc_now

_EXTRA = ("gpu_util_pct", "mem_util_pct", "mem_used_mib", "temp_c")

#: A looping replay releases at most this many laps per read: a speed so high that more are
#: due (``1e306``) makes the replay fall behind the clock instead of never returning.
MAX_LAPS_PER_READ = 16


def load_trace(
    path: str | Path,
    *,
    run_ids: Sequence[str] | None = None,
    tz: str = "UTC",
    max_runs: int | None = None,
) -> pl.DataFrame:
    """Read a recorded trace into a replayable frame.

    Args:
        path: A store samples parquet, the shared ``traces.parquet``, or an
            nvidia-smi CSV (``.csv``).
        run_ids: Runs to keep (for files holding several); ``None`` keeps all.
        tz: Time zone of naive timestamps (the shared traces are local time).
        max_runs: Keep at most this many runs (the first in file order).

    Returns:
        Columns ``device``, ``model``, ``timestamp`` (UTC), ``power_w`` and,
        where present, ``energy_j`` and the utilisation, memory and
        temperature columns. Traces without a ``device`` column (the shared
        ``traces.parquet``) get one device per run, named after the run.

    Raises:
        BadInputError: The file is missing, unreadable or lacks the columns.

    """
    p = Path(path)
    if not p.is_file():
        raise BadInputError(
            f"{p}: expected a trace file (store samples parquet, traces.parquet or nvidia-smi "
            "CSV); no such file"
        )
    if p.suffix.lower() == ".csv":
        from profiler.importers.nvidia_smi import read_nvidia_smi_csv

        df = read_nvidia_smi_csv(p, node="replay", run_id=p.stem.replace("nvidia-smi-", ""), tz=tz)
    else:
        try:
            df = pl.read_parquet(p)
        except Exception as err:  # polars raises several types for corrupt files
            raise BadInputError(
                f"{p}: expected a parquet trace; could not read it ({err})"
            ) from err
    missing = [c for c in ("timestamp", "power_w") if c not in df.columns]
    if missing:
        raise BadInputError(
            f"{where(str(p))}expected columns 'timestamp' and 'power_w' in a trace; "
            f"missing {missing}; found {df.columns}"
        )
    if run_ids is not None:
        if "run_id" not in df.columns:
            raise BadInputError(f"{p}: run ids {list(run_ids)} asked for, but it has no run_id")
        df = df.filter(pl.col("run_id").is_in(list(run_ids)))
        absent = sorted(set(run_ids) - set(df["run_id"].unique().to_list()))
        if absent:
            raise BadInputError(f"{p}: expected runs {absent} in the trace; they are not there")
    if max_runs is not None and "run_id" in df.columns:
        keep = df["run_id"].unique(maintain_order=True).head(max_runs).to_list()
        df = df.filter(pl.col("run_id").is_in(keep))
    if "device" not in df.columns:
        df = df.with_columns(
            device=pl.col("run_id").cast(pl.String) if "run_id" in df.columns else pl.lit("0")
        )
    elif "node" in df.columns and df["node"].n_unique() > 1:
        df = df.with_columns(device=pl.col("node") + "/" + pl.col("device"))
    if "model" not in df.columns:
        df = df.with_columns(model=_models_for(p, df))
    ts = df.schema["timestamp"]
    if not isinstance(ts, pl.Datetime):
        raise BadInputError(
            f"{where(str(p), label=repr('timestamp'))}expected datetimes; found {ts}"
        )
    tsx = pl.col("timestamp")
    tsx = tsx.dt.replace_time_zone(tz) if ts.time_zone is None else tsx
    keep_cols = ["device", "model", "timestamp", "power_w"] + [
        c for c in ("energy_j", *_EXTRA) if c in df.columns
    ]
    return (
        df.with_columns(tsx.dt.convert_time_zone("UTC").dt.cast_time_unit("us"))
        .select(keep_cols)
        .with_columns(pl.col("device").cast(pl.String), pl.col("model").cast(pl.String))
        .sort("device", "timestamp")
    )


def _models_for(path: Path, df: pl.DataFrame) -> pl.Expr:
    """GPU model per run from a ``runs.parquet`` beside the traces, else null."""
    runs = path.with_name("runs.parquet")
    if "run_id" in df.columns and runs.is_file():
        try:
            r = pl.read_parquet(runs, columns=["run_id", "gpu_model"])
        except Exception:  # optional metadata only
            return pl.lit(None, dtype=pl.String)
        mapping = dict(zip(r["run_id"].to_list(), r["gpu_model"].to_list(), strict=True))
        return pl.col("run_id").replace_strict(mapping, default=None, return_dtype=pl.String)
    return pl.lit(None, dtype=pl.String)


class ReplaySource:
    """Plays a recorded trace back as live samples.

    Each call to :meth:`read` returns every recorded sample whose time offset
    (from its device's first sample) has been reached, at ``speed`` times
    real time, since the previous call. Timestamps are ``anchor`` plus the
    offset, so the intervals (and the energy) are those recorded.

    Args:
        trace: Frame with ``device``, ``timestamp`` (timezone-aware) and
            ``power_w``; optional ``model``, ``energy_j`` and utilisation
            columns (see :func:`load_trace`).
        speed: Playback speed, a finite number > 0; 1.0 is real time, 100.0
            plays 100 s of trace per s. A looping replay releases at most
            :data:`MAX_LAPS_PER_READ` laps per read, so at speeds that would
            need more it falls behind the clock.
        model: Report every device under this model name (a fake GPU); default
            the trace's own ``model`` column.
        device_prefix: Rename devices to ``<prefix>0``, ``<prefix>1``, ... in
            sorted order (``""`` gives GPU-like ids "0", "1"); ``None`` keeps
            the trace's device names.
        loop: Start over at the end (timestamps and counter keep increasing).
            Between the last sample of one lap and the first of the next, a
            device's counter rises by its last power times the time between
            them, so the counter stays continuous and matches the power.
        counter: Give the fake device a cumulative energy counter in J, the
            trapezoid of the recorded power (as Volta and newer GPUs have);
            intervals with a missing power reading add nothing. A recorded
            ``energy_j`` column takes precedence; its missing values stay null.
        anchor: UTC time of the first sample of every device; default now.
        clock: Monotonic clock in s; replaceable to step time in tests.

    Raises:
        BadInputError: ``speed`` is not a finite number > 0 or the trace is empty.

    """

    name = "replay"

    def __init__(
        self,
        trace: pl.DataFrame,
        *,
        speed: float = 1.0,
        model: str | None = None,
        device_prefix: str | None = None,
        loop: bool = False,
        counter: bool = False,
        anchor: datetime | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if not (speed > 0 and math.isfinite(speed)):
            raise BadInputError(
                f"replay speed (--speed) must be a finite number > 0 (1.0 = real time); "
                f"found {speed}"
            )
        trace = trace.filter(pl.col("timestamp").is_not_null())
        if trace.height == 0:
            raise BadInputError("replay needs a trace with at least one sample; it is empty")
        self.speed = float(speed)
        self.loop = loop
        self._clock = clock
        self._mono0 = clock()
        self.anchor = anchor or utc_now()
        trace = trace.sort("device", "timestamp").unique(
            ["device", "timestamp"], keep="first", maintain_order=True
        )
        devices = trace["device"].unique(maintain_order=True).cast(pl.String).to_list()
        names = (
            {d: f"{device_prefix}{i}" for i, d in enumerate(devices)}
            if device_prefix is not None
            else {d: d for d in devices}
        )
        models = (
            trace.group_by("device", maintain_order=True).agg(pl.col("model").first())
            if "model" in trace.columns
            else None
        )
        model_of = dict(models.iter_rows()) if models is not None else {}
        t_us = trace["timestamp"].dt.epoch("us").to_numpy()
        dev_codes = trace["device"].cast(pl.String).to_numpy()
        # Offsets from each device's own first sample, exact in microseconds.
        first = trace.group_by("device").agg(pl.col("timestamp").min().dt.epoch("us"))
        t0_of = dict(first.iter_rows())
        t0 = np.array([t0_of[d] for d in dev_codes], dtype=np.int64)
        offset = t_us - t0
        power = trace["power_w"].cast(pl.Float64).to_numpy(allow_copy=True).astype(float)
        energy: np.ndarray | None = None
        if "energy_j" in trace.columns and trace["energy_j"].null_count() < trace.height:
            energy = trace["energy_j"].cast(pl.Float64).fill_null(np.nan).to_numpy().astype(float)
        elif counter:
            energy = np.empty_like(power)
            for d in devices:
                idx = np.flatnonzero(dev_codes == d)
                p = power[idx]
                dt = np.diff(offset[idx]) / 1e6
                inc = 0.5 * (p[:-1] + p[1:]) * dt
                inc = np.where(np.isnan(inc), 0.0, inc)
                energy[idx] = np.concatenate(([0.0], np.cumsum(inc)))
        # Play order: by offset, then device; stable so equal offsets keep device order.
        order = np.lexsort((dev_codes, offset))
        self._offset_us = offset[order]
        self._device = [names[d] for d in dev_codes[order]]
        self._model = [model or model_of.get(d) for d in dev_codes[order]]
        self._power = power[order]
        self._energy = energy[order] if energy is not None else None
        self._extra = {
            c: trace[c].cast(pl.Float64).fill_null(np.nan).to_numpy()[order]
            for c in _EXTRA
            if c in trace.columns
        }
        # A lap is the longest device trace plus its typical step, so a loop does not
        # put two samples at the same instant.
        span = int(self._offset_us.max())
        step = int(np.median(np.diff(np.unique(self._offset_us)))) if span > 0 else 1_000_000
        self._lap_us = span + max(step, 1)
        self._lap_energy: dict[str, float] = {}
        if self._energy is not None:
            played = np.array(self._device)
            for d in set(self._device):
                idx = np.flatnonzero(played == d)
                self._lap_energy[d] = self._lap_increment(
                    self._offset_us[idx], self._power[idx], self._energy[idx]
                )
        self._pos = 0
        self._lap = 0
        self.devices = sorted(set(self._device))

    def _lap_increment(self, offset_us: np.ndarray, power: np.ndarray, energy: np.ndarray) -> float:
        """How far one device's counter moves per lap, in J, so laps join up seamlessly.

        A recorded counter starts wherever the hardware's was (NVML and DCGM count
        from driver load, often megajoules), so a lap adds the counter's own rise
        over the lap (last valid minus first valid value) plus the energy of the
        stretch from the last valid counter of one lap to the first of the next:
        the mean of the lap's last and first power over that time (the trapezoid
        the power samples give; the counter's mean rate where the trace has no
        power). Missing counter values are skipped,
        never read as 0, so the counter cannot run backwards at a lap boundary.

        Args:
            offset_us: The device's sample offsets in µs from its first sample, increasing.
            power: Its power in W at each sample (NaN where missing).
            energy: Its counter in J at each sample (NaN where missing).

        Returns:
            The counter increase per lap in J; 0 when the device has no counter value.

        """
        valid = np.flatnonzero(~np.isnan(energy))
        if len(valid) == 0:
            return 0.0
        i0, i1 = int(valid[0]), int(valid[-1])
        rise = float(energy[i1] - energy[i0])
        watts = power[~np.isnan(power)]
        span_s = float(offset_us[i1] - offset_us[i0]) / 1e6
        if len(watts):
            # The trapezoid from the lap's last power to the next lap's first, as the
            # power samples themselves integrate over that step.
            held_w = (float(watts[-1]) + float(watts[0])) / 2
        elif span_s > 0:
            held_w = max(rise, 0.0) / span_s
        else:
            held_w = 0.0
        bridge_s = float(self._lap_us - offset_us[i1] + offset_us[i0]) / 1e6
        return rise + held_w * bridge_s

    @classmethod
    def from_file(
        cls,
        path: str | Path,
        *,
        run_ids: Sequence[str] | None = None,
        tz: str = "UTC",
        max_runs: int | None = None,
        **kwargs: object,
    ) -> ReplaySource:
        """A replay of a trace file (see :func:`load_trace` for formats, the class for options)."""
        return cls(load_trace(path, run_ids=run_ids, tz=tz, max_runs=max_runs), **kwargs)  # type: ignore[arg-type]

    @classmethod
    def from_store(cls, store: object, run_id: str, **kwargs: object) -> ReplaySource:
        """A replay of one run's samples in a :class:`profiler.store.Store`."""
        df = store.samples(run_id)  # type: ignore[attr-defined]
        if df.height == 0:
            raise BadInputError(f"run {run_id!r} has no samples in {store} to replay")
        if df["node"].n_unique() > 1:
            df = df.with_columns(device=pl.col("node") + "/" + pl.col("device"))
        return cls(df, **kwargs)  # type: ignore[arg-type]

    @property
    def duration_s(self) -> float:
        """Length of one pass of the trace in trace seconds."""
        return float(self._offset_us[-1]) / 1e6

    @property
    def exhausted(self) -> bool:
        """Whether every sample has been played (never, when looping)."""
        return not self.loop and self._pos >= len(self._device)

    def _elapsed_us(self) -> int:
        """Trace time played so far in µs, clamped to what the next read can release.

        Computed in floats (a huge speed gives ``inf``, not an error) and clamped to
        the end of the trace, or, when looping, to :data:`MAX_LAPS_PER_READ` laps past
        the current one, so that ``int()`` and the read loop stay bounded.
        """
        elapsed = (self._clock() - self._mono0) * self.speed * 1e6
        if self.loop:
            ceiling = (self._lap + MAX_LAPS_PER_READ) * self._lap_us
        else:
            ceiling = int(self._offset_us[-1])
        return int(min(elapsed, ceiling))

    def read(self) -> list[PowerSample]:
        """Every sample due since the previous call (none once exhausted)."""
        now_us = self._elapsed_us()
        out: list[PowerSample] = []
        n = len(self._device)
        while True:
            base = self._lap * self._lap_us
            end = int(np.searchsorted(self._offset_us, now_us - base, side="right"))
            for i in range(self._pos, end):
                out.append(self._sample(i, base))
            self._pos = max(self._pos, end)
            if self._pos < n or not self.loop:
                return out
            self._lap += 1
            self._pos = 0

    def _sample(self, i: int, base_us: int) -> PowerSample:
        dev = self._device[i]
        p = float(self._power[i])
        e = None
        if self._energy is not None:
            v = float(self._energy[i])
            e = None if np.isnan(v) else v + self._lap * self._lap_energy.get(dev, 0.0)
        extra: dict[str, float | None] = {}
        for c, a in self._extra.items():
            v = float(a[i])
            extra[c] = None if np.isnan(v) else v
        return PowerSample(
            device=dev,
            model=self._model[i],
            timestamp=self.anchor + timedelta(microseconds=int(self._offset_us[i]) + base_us),
            power_w=None if np.isnan(p) else p,
            energy_j=e,
            gpu_util_pct=extra.get("gpu_util_pct"),
            mem_util_pct=extra.get("mem_util_pct"),
            mem_used_mib=extra.get("mem_used_mib"),
            temp_c=extra.get("temp_c"),
            source="replay",
        )

    def close(self) -> None:
        """Nothing to release."""
