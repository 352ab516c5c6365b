"""Benchmark: STEP against the baselines on the SEAA 2023 real traces, and the detectors compared.

For F in 0.05, 0.1, 0.2, 0.3 every method sees the first F of each traced run
(189 runs), the run's total duration and ``trained_epochs``, but no epoch
marks; its projected total is compared with the trapezoid integral of the
whole trace. Prints, per F and method: median and P90 absolute percentage
error, band coverage, median band half-width and the share of runs called
stable. Then the detector comparison (online CUSUM, PELT, no detector, and
FLUSS with ``--fluss``: stumpy needs ~30 s to compile and ~1 s per run); per F
and STEP variant, the band coverage and half-width over all bands next to those
over the stable runs' bands alone (a run not called stable carries the wide
"lowest power seen .. power cap" band, not the 90 % band); the
check of the issue's goals, and the cost of one online STEP update.

Run: ``.venv/bin/python bench/step.py [--data DIR] [--fluss] [--duration trace|runs]``.
Data: del Rey et al., SEAA 2023 replication package (GAISSA-UPC/seaa2023_ect), CC BY 4.0.
"""

from __future__ import annotations

import argparse
import platform
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from cluster.commands.step_cmds import print_summary  # noqa: E402
from estimators.baselines import bench_step, summarise  # noqa: E402
from estimators.step import OnlineStep  # noqa: E402

FRACTIONS = (0.05, 0.1, 0.2, 0.3)
METHODS = ("step", "carbontracker", "mlco2", "green_algorithms", "naive", "flops")
DETECTORS = ("step-online", "step-pelt", "step-none")


def online_cost(n_epochs: int = 10_000) -> float:
    """Mean seconds per :meth:`OnlineStep.update` over a noisy two-regime run."""
    rng = np.random.default_rng(0)
    values = np.r_[np.full(10, 1000.0), np.full(n_epochs - 10, 2000.0)]
    values = values + rng.normal(0, 20, n_epochs)
    online = OnlineStep(planned_epochs=n_epochs + 10, power_cap_w=350.0)
    start = time.perf_counter()
    for v in values:
        online.update(float(v), 10.0)
    return (time.perf_counter() - start) / n_epochs


def fmt(x: float | None, spec: str) -> str:
    """``x`` formatted with ``spec``, or ``-`` for a missing value."""
    return "-" if x is None else format(x, spec)


def band_line(r: dict[str, Any]) -> str:
    """One :func:`summarise` row's coverage and half-width, all bands then stable ones."""
    return (
        f"all {r['runs'] - r['no_answer']} bands: {fmt(r['coverage'], '.1%')} covered, "
        f"median +/- {fmt(r['median_half_width_pct'], '.2f')} % | "
        f"stable {r['stable_runs']} runs: {fmt(r['stable_coverage'], '.1%')} covered, "
        f"median +/- {fmt(r['stable_median_half_width_pct'], '.2f')} %"
    )


def stable_goal(f: float, r: dict[str, Any]) -> tuple[str, bool, float]:
    """The goal on the stable runs' 90 % bands: coverage >= 85 % (nominal 90 %)."""
    cov = r["stable_coverage"]
    return (
        f"F={f:g} stable runs' 90 % band coverage >= 85 % (nominal 90 %; "
        f"{r['stable_runs']} stable runs)",
        cov is not None and cov >= 0.85,
        float("nan") if cov is None else cov,
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default=str(REPO.parent / "shared" / "data" / "seaa2023"))
    ap.add_argument("--fluss", action="store_true", help="also run the FLUSS detector (slow)")
    ap.add_argument("--duration", choices=("trace", "runs"), default="trace")
    args = ap.parse_args()
    data = Path(args.data)
    if not (data / "runs.parquet").is_file():
        print(f"no data at {data}: expected runs.parquet and traces.parquet", file=sys.stderr)
        raise SystemExit(2)
    runs = pl.read_parquet(data / "runs.parquet")
    traces = pl.read_parquet(data / "traces.parquet")
    print(
        f"machine: {platform.machine()} {platform.processor() or ''}, python "
        f"{platform.python_version()}, polars {pl.__version__}; total duration = "
        f"{'span of the trace' if args.duration == 'trace' else 'runs.duration_s'}"
    )
    detectors = DETECTORS + (("step-fluss",) if args.fluss else ())
    results: dict[float, pl.DataFrame] = {}
    for f in FRACTIONS:
        t0 = time.perf_counter()
        pred = bench_step(
            runs, traces, fraction=f, methods=METHODS + detectors, duration=args.duration
        )
        results[f] = summarise(pred)
        main_rows = results[f].filter(pl.col("method").is_in(METHODS))
        print_summary(main_rows, title=f"F = {f:g}: methods ({time.perf_counter() - t0:.1f} s)")
    for f in FRACTIONS:
        print_summary(
            results[f].filter(pl.col("method").is_in(detectors)),
            title=f"F = {f:g}: stable-point detectors",
        )
    print(
        "\nband coverage, all bands (not-stable runs carry the 'lowest power seen .. power cap'"
        " band) against the stable runs' 90 % bands alone (nominal 90 %):"
    )
    for f in FRACTIONS:
        for r in results[f].filter(pl.col("stable_runs").is_not_null()).iter_rows(named=True):
            print(f"  F = {f:<4g} {r['method']:<12} {band_line(r)}")
    s2 = {r["method"]: r for r in results[0.2].iter_rows(named=True)}
    s1 = {r["method"]: r for r in results[0.1].iter_rows(named=True)}
    step = s2["step"]
    goals = [
        ("F=0.2 median APE <= 0.5 %", step["median_ape_pct"] <= 0.5, step["median_ape_pct"]),
        ("F=0.2 P90 APE <= 2.5 %", step["p90_ape_pct"] <= 2.5, step["p90_ape_pct"]),
        (
            "F=0.2 10x better than mlco2 (median)",
            s2["mlco2"]["median_ape_pct"] >= 10 * step["median_ape_pct"],
            s2["mlco2"]["median_ape_pct"] / step["median_ape_pct"],
        ),
        (
            "F=0.2 10x better than carbontracker (median)",
            s2["carbontracker"]["median_ape_pct"] >= 10 * step["median_ape_pct"],
            s2["carbontracker"]["median_ape_pct"] / step["median_ape_pct"],
        ),
        (
            "F=0.1 band coverage >= 85 % (all bands, not-stable ones included)",
            s1["step"]["coverage"] >= 0.85,
            s1["step"]["coverage"],
        ),
        (
            "F=0.2 band coverage >= 85 % (all bands, not-stable ones included)",
            step["coverage"] >= 0.85,
            step["coverage"],
        ),
        stable_goal(0.1, s1["step"]),
        stable_goal(0.2, step),
        (
            "F=0.2 median half-width < 5 %",
            step["median_half_width_pct"] < 5,
            step["median_half_width_pct"],
        ),
    ]
    print("\ngoals (issue 3):")
    for text, ok, value in goals:
        print(f"  {'PASS' if ok else 'FAIL'}  {text}: {value:.3f}")
    cost = online_cost()
    print(f"\nonline STEP update: {cost * 1e6:.1f} us per epoch (10,000 epochs, one core)")


if __name__ == "__main__":
    main()
