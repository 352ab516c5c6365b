"""Report of one run: power trace, epoch marks, stable point and the STEP projection as it evolved.

:func:`projection_history` replays a run epoch by epoch (or, without epoch
marks, one mean epoch of time at a time) and records the projection and band
STEP would have shown then; :func:`write_report` draws that against the final
truth as a PNG, or as a self-contained HTML page (the PNG inline plus the
numbers in a table). A run that has ended without epoch marks and without the
plan a time replay needs gets its measured total and the power trace, with
:data:`NO_MARKS_NOTE` saying why there is nothing else.
"""

from __future__ import annotations

import base64
import html
import io
import math
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import polars as pl

from estimators.step import (
    PLANNED_UNKNOWN,
    Detector,
    OnlineStep,
    Projection,
    RunPlan,
    Step,
    Trace,
    measured_energy_j,
    measured_epochs,
    run_epochs,
)
from profiler.errors import BadInputError, StoreError

if TYPE_CHECKING:
    from matplotlib.figure import Figure

#: Why the report of an ended run without epoch marks has no per-epoch energy or STEP replay.
NO_MARKS_NOTE = (
    "no epoch marks: per-epoch energy and STEP need marks from EpochHooks or `wattwise run`"
)

_HISTORY_SCHEMA = {
    "after_unit": pl.Int64,
    "t_s": pl.Float64,
    "energy_j": pl.Float64,
    "lower_j": pl.Float64,
    "upper_j": pl.Float64,
    "measured_j": pl.Float64,
    "stable": pl.Boolean,
    "stable_start_s": pl.Float64,
}


def projection_history(
    samples: pl.DataFrame,
    epochs: pl.DataFrame | None,
    plan: RunPlan,
    *,
    detector: Detector = "online",
    confidence: float = 0.9,
) -> pl.DataFrame:
    """The projection after every epoch (or every mean epoch of time without marks).

    With epoch marks the replay uses :class:`~estimators.step.OnlineStep`, the
    same O(1) update the aggregator runs live; without marks it refits
    :class:`~estimators.step.Step` in time mode on each prefix (this needs the
    plan's total duration and planned epochs). With marks, the measured energy
    after epoch k is what the run measured from its start to that epoch's end,
    as ``wattwise energy`` integrates it (:func:`~estimators.step.measured_epochs`:
    gaps 0 J, never bridged; the time between epochs counted), so after the last
    epoch of a run that ended then it is that command's run total.

    Args:
        samples: The run's samples (``timestamp``, ``power_w``).
        epochs: The run's epoch marks, or ``None``.
        plan: Planned epochs (and total duration without marks), power cap.
            A finished run's replay without planned epochs takes the epochs
            it recorded as planned.
        detector: Stable-point detector of the time-mode refits.
        confidence: Band coverage.

    Raises:
        BadInputError: A bad ``confidence``; epoch marks of a run not finished
            without planned epochs; no marks without the total duration and
            planned epochs.

    Returns:
        One row per step: ``after_unit`` (1-based), ``t_s`` (s since the
        first sample), ``energy_j``, ``lower_j``, ``upper_j``, ``measured_j``
        (J), ``stable``, ``stable_start_s``.

    """
    if not 0.0 < confidence < 1.0:  # OnlineStep takes it as given: refuse it here, as Step does
        raise BadInputError(f"confidence must be in (0, 1); found {confidence}")
    trace = Trace.from_samples(samples)
    finished = plan.finished
    plan = replace(plan, finished=False)  # replay as the run was seen while it ran
    rows: list[dict[str, object]] = []
    if epochs is not None and epochs.height:
        if plan.planned_epochs is None and not finished:
            # The epochs recorded so far are not the run's: projecting from them would call
            # the energy measured so far the total.
            raise BadInputError(f"run not finished and {PLANNED_UNKNOWN}")
        if trace.n_samples == 0:
            return pl.DataFrame(schema=_HISTORY_SCHEMA)
        per = run_epochs(samples, epochs, trace)
        # Measured energy since the previous epoch's end (the first: since the run's start).
        measured = measured_epochs(samples, epochs)
        t0, t1 = per["t0_s"].to_numpy(), per["t1_s"].to_numpy()
        # A finished run without a plan had the epochs it recorded.
        planned = plan.planned_epochs or per.height
        online = OnlineStep(planned_epochs=planned, confidence=confidence, power_cap_w=plan.cap_w())
        for k in range(per.height):
            # An epoch mostly without samples stays out of the stable mean (by its gap_s);
            # what it adds to the measured energy is its energy as `wattwise energy` has it.
            proj = online.update(
                float(per["energy_j"][k]),
                float(per["duration_s"][k]),
                gap_s=float(per["gap_s"][k]),
                measured_j=float(measured[k]),
            )
            start_s = float(t0[proj.stable_unit]) if proj.stable_unit is not None else None
            rows.append(_row(k + 1, float(t1[k]), proj, start_s))
        return pl.DataFrame(rows, schema=_HISTORY_SCHEMA)
    if not (plan.total_duration_s and plan.planned_epochs):
        raise BadInputError(
            "a projection history without epoch marks needs the total duration and planned "
            f"epochs; found total_duration_s={plan.total_duration_s}, "
            f"planned_epochs={plan.planned_epochs}"
        )
    unit = plan.total_duration_s / plan.planned_epochs
    n = int(math.floor(trace.end_s / unit + 1e-9))
    step = Step(detector=detector, confidence=confidence)
    # Each prefix as a samples frame (not a Trace): its measured energy is then
    # `wattwise energy`'s (gaps 0 J, counters), as `estimate` had it at that time.
    us = samples["timestamp"].dt.epoch("us")
    for k in range(1, n + 1):
        prefix = samples.filter(us <= trace.origin_us + round(k * unit * 1e6))
        proj = step.fit(prefix, plan=plan).predict()
        rows.append(_row(k, k * unit, proj, proj.stable_start_s))
    return pl.DataFrame(rows, schema=_HISTORY_SCHEMA)


def _row(k: int, t_s: float, p: Projection, start_s: float | None) -> dict[str, object]:
    return {
        "after_unit": k,
        "t_s": t_s,
        "energy_j": p.energy_j,
        "lower_j": p.lower_j,
        "upper_j": p.upper_j,
        "measured_j": p.measured_j,
        "stable": p.stable,
        "stable_start_s": start_s if p.stable else None,
    }


def figure(
    samples: pl.DataFrame,
    epochs: pl.DataFrame | None,
    history: pl.DataFrame,
    *,
    truth_j: float | None,
    title: str,
    note: str = "",
) -> Figure:
    """Two panels: power with epoch marks and stable point; projection and band over time.

    ``note`` is written in the lower panel when there is no history to draw
    (why there is none).
    """
    import matplotlib

    matplotlib.use("Agg", force=False)
    from matplotlib.figure import Figure

    trace = Trace.from_samples(samples)
    fig = Figure(figsize=(11, 7), layout="constrained")
    ax1, ax2 = fig.subplots(2, 1, sharex=True)
    for t, p in zip(trace.t, trace.p, strict=True):
        ax1.plot(t / 60, p, lw=0.6, color="tab:blue")
    if epochs is not None and epochs.height:
        ends = (epochs["end"].dt.epoch("us").to_numpy() - trace.origin_us) / 6e7  # UTC
        for x in ends:
            ax1.axvline(x, color="0.8", lw=0.5, zorder=0)
    stable = history.filter(pl.col("stable"))
    if stable.height:
        at = stable["stable_start_s"][-1]
        if at is not None:
            for ax in (ax1, ax2):
                ax.axvline(at / 60, color="tab:green", ls="--", lw=1.2, label="stable point")
    ax1.set_ylabel("power (W)")
    ax1.set_title(title)
    if history.height:
        x = history["t_s"].to_numpy() / 60
        e = history["energy_j"].to_numpy(allow_copy=True).astype(float) / 1e3
        lo = history["lower_j"].to_numpy(allow_copy=True).astype(float) / 1e3
        hi = history["upper_j"].to_numpy(allow_copy=True).astype(float) / 1e3
        ax2.fill_between(x, lo, hi, color="tab:orange", alpha=0.25, step="post", label="band")
        ax2.step(x, e, where="post", color="tab:orange", label="projection")
        ax2.step(
            x,
            history["measured_j"].to_numpy() / 1e3,
            where="post",
            color="0.5",
            lw=0.8,
            label="measured so far",
        )
    if truth_j is not None:
        ax2.axhline(truth_j / 1e3, color="k", lw=1, label=f"final total ({truth_j / 1e3:,.1f} kJ)")
    if history.height and truth_j is not None:
        top = np.nanmax([truth_j / 1e3 * 1.6, *(e[np.isfinite(e)] if len(e) else [])])
        ax2.set_ylim(0, top)
    elif truth_j is not None and truth_j > 0:
        ax2.set_ylim(0, truth_j / 1e3 * 1.6)
    if note and not history.height:
        ax2.text(0.5, 0.5, note, transform=ax2.transAxes, ha="center", va="center", fontsize=9)
    ax2.set_xlabel("time since first sample (min)")
    ax2.set_ylabel("energy (kJ)")
    ax2.legend(loc="lower right", fontsize=8)
    return fig


def _cell(name: str, value: object) -> str:
    """One HTML table cell's text: energies in kJ, other floats to 0.1."""
    if value is None:
        return ""
    if name.endswith("_j") and isinstance(value, float):
        return f"{value / 1e3:,.1f}"
    if isinstance(value, float):
        return f"{value:.1f}"
    return html.escape(str(value))


def write_report(
    samples: pl.DataFrame,
    epochs: pl.DataFrame | None,
    plan: RunPlan,
    out: str | Path,
    *,
    title: str = "Run",
    detector: Detector = "online",
    confidence: float = 0.9,
    status: str = "finished",
) -> Path:
    """Write the report as PNG or HTML, chosen by ``out``'s suffix.

    The final truth is the measured total of a finished run
    (:func:`~estimators.step.measured_energy_j`, what ``wattwise energy --run``
    totals); for a run still going, the last projection is shown without a
    truth line. A finished run (``plan.finished``) without epoch marks and
    without the total duration and planned epochs of a time replay gets its
    measured total and power trace only, with :data:`NO_MARKS_NOTE`. The file is
    written through a temporary file and a rename, so it is either the whole
    report or absent (an old one is kept); a missing folder is created, as
    every ``--out`` of the CLI does.

    Args:
        samples: The run's samples (``timestamp``, ``power_w``; optional ``energy_j``).
        epochs: The run's epoch marks, or ``None``.
        plan: As :func:`projection_history`; ``finished`` for a run that has ended.
        out: ``FILE.png`` or ``FILE.html``.
        title: Page and figure title.
        detector: Stable-point detector of the time-mode replay.
        confidence: Band coverage.
        status: The ended run's status (``finished``, ``failed``), shown beside
            its measured total when there is no replay.

    Raises:
        BadInputError: ``out`` is neither ``.png`` nor ``.html``, a bad
            ``confidence``, or no history can be made (see
            :func:`projection_history`).
        StoreError: The file could not be written.

    """
    out = Path(out)
    suffix = out.suffix.lower()
    if suffix not in (".png", ".html"):
        raise BadInputError(f"report output must end in .png or .html; found {str(out)!r}")
    no_marks = epochs is None or epochs.height == 0
    note = ""
    if no_marks and plan.finished and not (plan.total_duration_s and plan.planned_epochs):
        # Nothing to replay: the run's energy is measured, as `wattwise estimate` gives it.
        history = pl.DataFrame(schema=_HISTORY_SCHEMA)
        note = NO_MARKS_NOTE
    else:
        history = projection_history(
            samples, epochs, plan, detector=detector, confidence=confidence
        )
    truth = measured_energy_j(samples, epochs) if plan.finished else None
    fig = figure(samples, epochs, history, truth_j=truth, title=title, note=note)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    png = buf.getvalue()
    if suffix == ".png":
        _write(png, out)
        return out
    last = history.row(-1, named=True) if history.height else None
    rows = "".join(
        "<tr>" + "".join(f"<td>{_cell(k, v)}</td>" for k, v in r.items()) + "</tr>"
        for r in history.iter_rows(named=True)
    )
    head = "".join(f"<th>{html.escape(c.replace('_j', ' (kJ)'))}</th>" for c in history.columns)
    summary = ""
    if note and truth is not None:
        summary = (
            f"<p>Measured total: <b>{truth / 1e3:,.1f} kJ</b> (run {html.escape(status)}).</p>"
            f"<p>{html.escape(note)}.</p>"
        )
    elif last is not None:
        summary = (
            f"<p>Last projection: <b>{(last['energy_j'] or 0) / 1e3:,.1f} kJ</b> "
            f"({confidence:.0%} band {(last['lower_j'] or 0) / 1e3:,.1f} .. "
            f"{(last['upper_j'] or 0) / 1e3:,.1f} kJ), "
            f"{'stable' if last['stable'] else 'not stable yet'}."
            + (f" Final measured total: <b>{truth / 1e3:,.1f} kJ</b>." if truth else "")
            + "</p>"
        )
    doc = (
        "<!doctype html><html><head><meta charset='utf-8'>"
        f"<title>{html.escape(title)}</title>"
        "<style>body{font-family:sans-serif;max-width:1100px;margin:auto}"
        "table{border-collapse:collapse;font-size:12px}td,th{border:1px solid #ccc;"
        "padding:2px 6px;text-align:right}</style></head><body>"
        f"<h1>{html.escape(title)}</h1>{summary}"
        "<img alt='power and projection' src='data:image/png;base64,"
        f"{base64.b64encode(png).decode()}'>"
        + (
            "<p>Energy measured from the power trace, as <code>wattwise energy --run</code> "
            "totals it.</p></body></html>"
            if note
            else "<p>Energy measured from the power trace; projections by STEP (stable "
            "training epoch projection) with their band, as they would have been shown after "
            f"each epoch.</p><table><tr>{head}</tr>{rows}</table></body></html>"
        )
    )
    _write(doc.encode("utf-8"), out)
    return out


def _write(data: bytes, out: Path) -> None:
    """Write ``data`` to ``out`` atomically, creating its folder.

    Raises:
        StoreError: The folder or the file could not be written; ``out`` is untouched.

    """
    from profiler.store import atomic_write_bytes

    try:
        atomic_write_bytes(data, out)
    except StoreError:
        raise
    except OSError as err:  # the folder could not be made (a file in the way, no permission)
        raise StoreError(f"{out}: could not write ({err})") from err


def pre_figure(
    predictions: pl.DataFrame,
    gpu_model: list[str],
    truth_j: np.ndarray | None = None,
    *,
    title: str = "PRE: per-epoch energy",
) -> Figure:
    """Predicted per-epoch energy with 90 % intervals, against the truth when known.

    With truth: a log-log scatter of predicted against measured J per epoch,
    one colour per GPU, the interval as a vertical bar, filled markers for
    architectures PRE was trained on and open ones for new architectures,
    the line y = x and a +-12 % band. Without truth: each run's prediction
    and interval, sorted.

    Args:
        predictions: :meth:`estimators.pre.PREModel.predict` rows
            (``predicted_epoch_energy_j``, ``lower_j``, ``upper_j``,
            ``seen_architecture``).
        gpu_model: GPU per row.
        truth_j: Measured J per epoch per row, if known.
        title: Figure title.

    """
    import matplotlib

    matplotlib.use("Agg", force=False)
    from matplotlib.figure import Figure

    p = predictions["predicted_epoch_energy_j"].to_numpy()
    lo = predictions["lower_j"].fill_null(float("nan")).to_numpy()
    hi = predictions["upper_j"].fill_null(float("nan")).to_numpy()
    seen = predictions["seen_architecture"].to_numpy()
    gpus = np.asarray(gpu_model, dtype=object)
    fig = Figure(figsize=(7.5, 6.0))
    ax = fig.add_subplot(1, 1, 1)
    colours = matplotlib.colormaps["tab10"]
    if truth_j is None:
        order = np.argsort(p)
        x = np.arange(len(p))
        ax.errorbar(x, p[order], yerr=[p[order] - lo[order], hi[order] - p[order]], fmt="o", ms=3)
        ax.set_xlabel("run (sorted by prediction)")
        ax.set_ylabel("predicted J per epoch (90 % interval)")
    else:
        y = np.asarray(truth_j, dtype=float)
        for i, g in enumerate(sorted(set(gpus.tolist()))):
            for flag, face in ((True, None), (False, "none")):
                m = (gpus == g) & (seen == flag)
                if not m.any():
                    continue
                c = colours(i % 10)
                ax.errorbar(
                    y[m],
                    p[m],
                    yerr=[p[m] - lo[m], hi[m] - p[m]],
                    fmt="o",
                    ms=4,
                    color=c,
                    mfc=c if face is None else face,
                    elinewidth=0.6,
                    alpha=0.8,
                    label=f"{g} ({'seen' if flag else 'new'} architecture)",
                )
        span = np.array([np.nanmin([y.min(), p.min()]) * 0.8, np.nanmax([y.max(), p.max()]) * 1.2])
        ax.plot(span, span, "k-", lw=0.8, label="predicted = measured")
        ax.fill_between(span, span * 0.88, span * 1.12, color="grey", alpha=0.15, label="+-12 %")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("measured J per epoch")
        ax.set_ylabel("predicted J per epoch (90 % interval)")
        mape = 100 * float(np.mean(np.abs(p - y) / y))
        cover = 100 * float(np.mean((y >= lo) & (y <= hi)))
        title += f" (MAPE {mape:.1f} %, coverage {cover:.0f} %)"
        ax.legend(fontsize=7, loc="upper left")
    ax.set_title(title, fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    return fig


def figure_png(fig: Figure) -> bytes:
    """A figure as PNG bytes."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    return buf.getvalue()
