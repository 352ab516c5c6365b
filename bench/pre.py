"""Benchmark: PRE accuracy on the SEAA 2023 runs, next to the paper and a kernel-ridge baseline.

Prints, for per-epoch energy (truth ``gpu_energy_j / trained_epochs``):

* random 70/30 splits (``--splits`` seeds): MAPE and 90 % interval coverage of
  PRE, and MAPE of kernel ridge on the paper's ten features; the paper's
  kernel ridge reached 6.0 %;
* leave-one-architecture-out: per held-out architecture, MAPE, coverage and
  median interval width (upper / lower) for energy, MAPE (time), kernel ridge
  MAPE, the prior's efficiency and overlap and how the training fold chose
  them, and
  whether the recommendation
  (lowest predicted energy among the GPUs that ran it) is the truly
  lowest-energy GPU;
* the same jobs without their run length (``epochs`` null, as a job without
  ``--epochs``): predicted by the model PRE trains without the length;
* leave-one-GPU-model-out: MAPE, coverage and width of the interval a GPU
  model not trained on gets (from folds grouped by GPU model);
* the sensitivity of leave-one-architecture-out to the efficiency (the prior
  alone at fixed efficiencies 0.7-0.9, overlap p = 1 and 2);
* retraining time on ``--retrain-rows`` synthetic runs resampled from the
  real ones (multiplicative jitter on the truths, architecture names kept):
  best and median of ``--retrain-repeats`` fits, with the machine's load
  average before and after (other jobs on the machine slow it down).

The paper's ten features are batch size, image height and width, RAM,
training and validation set sizes, GFLOPs, CUDA cores, GPU memory and board
power. In this dataset RAM is not recorded, and batch size, image size (128 x
128, from the authors' code) and set sizes are constant, so kernel ridge
effectively sees GFLOPs and the three GPU numbers (constant/unknown columns
are dropped).

Run: ``.venv/bin/python bench/pre.py [--data ../shared/data/seaa2023] [--splits 5]``.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl

REPO = Path(__file__).resolve().parents[1]
PAPER_FEATURES = (
    "batch_size",
    "image_height",
    "image_width",
    "ram_gb",  # not in the dataset: all null
    "training_size",
    "validation_size",
    "gflops_forward",
    "gpu_cuda_cores",
    "gpu_memory_gb",
    "gpu_board_power_w",
)


def paper_matrix(df: pl.DataFrame) -> np.ndarray:
    cols = [
        (pl.col(c) if c in df.columns else pl.lit(None)).cast(pl.Float64).alias(c)
        for c in PAPER_FEATURES
    ]
    return df.select(cols).fill_null(float("nan")).to_numpy()


def scores(train: pl.DataFrame, test: pl.DataFrame, **kw: Any) -> dict[str, Any]:
    from estimators.kernel_ridge import KernelRidge
    from estimators.pre import PREModel

    m = PREModel(**kw).fit(train)
    p = m.predict(test)
    # The same jobs without their length (a user who does not give --epochs).
    q = m.predict(test.with_columns(pl.lit(None, pl.Float64).alias("epochs")))
    y = test["epoch_energy_j"].to_numpy()
    yt = test["epoch_time_s"].to_numpy()
    pe = p["predicted_epoch_energy_j"].to_numpy()
    lo, hi = p["lower_j"].to_numpy(), p["upper_j"].to_numpy()
    kr = KernelRidge().fit(paper_matrix(train), train["epoch_energy_j"].to_numpy())
    pk = kr.predict(paper_matrix(test))
    t = test.with_columns(pl.Series("pred", pe))
    cells = t.group_by("gpu_model").agg(pl.col("epoch_energy_j").mean(), pl.col("pred").mean())
    true_best = cells.sort("epoch_energy_j")["gpu_model"][0]
    pred_best = cells.sort("pred")["gpu_model"][0]
    return {
        "mape": 100 * float(np.mean(np.abs(pe - y) / y)),
        "mape_nolen": 100
        * float(np.mean(np.abs(q["predicted_epoch_energy_j"].to_numpy() - y) / y)),
        "cover_nolen": 100
        * float(np.mean((y >= q["lower_j"].to_numpy()) & (y <= q["upper_j"].to_numpy()))),
        "cover": 100 * float(np.mean((y >= lo) & (y <= hi))),
        "width": float(np.median(hi / lo)),
        "eta": m.cv_["energy"]["efficiency"],
        "overlap": m.cv_["energy"]["overlap"],
        "eta_how": m.cv_["energy"]["efficiency_source"],
        "time_mape": 100 * float(np.mean(np.abs(p["predicted_epoch_time_s"].to_numpy() - yt) / yt)),
        "kr_mape": 100 * float(np.mean(np.abs(pk - y) / y)),
        "true_best": true_best,
        "pred_best": pred_best,
        "cells": cells.sort("gpu_model").rows(),
    }


def sensitivity(df: pl.DataFrame, etas: tuple[float, ...] = (0.7, 0.75, 0.8, 0.85, 0.9)) -> None:
    """Print leave-one-architecture-out MAPE of the prior alone at fixed efficiencies.

    With two training architectures the efficiency is not identified (one of
    them is compute-bound), and on the RTX cards the per-batch overhead is
    what is left of that run's time once its computation is taken out: a
    small difference of large numbers. This shows how much the folds move
    with it.
    """
    from estimators.pre import Prior, _arrays, _take

    arch = df["architecture"].to_numpy()
    y = df["epoch_energy_j"].to_numpy()
    a = _arrays(df)
    names = sorted(set(arch.tolist()))
    print(
        "\nsensitivity: leave-one-architecture-out MAPE of the prior alone (no correction) "
        "by efficiency and overlap p (each fold's own choice is printed above)"
    )
    print(
        "  "
        + f"{'p':>3}{'efficiency':>11}"
        + "".join(f"{n:>15}" for n in names)
        + f"{'all runs':>10}"
    )
    for overlap in (1.0, 2.0):
        for eta in etas:
            cells, total = [], 0.0
            for n in names:
                tr, te = np.flatnonzero(arch != n), np.flatnonzero(arch == n)
                prior = Prior._fit(
                    _take(a, tr), y[tr], energy=True, efficiency=eta, overlap=overlap
                )
                m = 100 * float(np.mean(np.abs(prior._predict(_take(a, te)) / y[te] - 1)))
                cells.append(m)
                total += m * len(te)
            print(
                "  "
                + f"{overlap:>3g}{eta:>11.2f}"
                + "".join(f"{m:>14.1f}%" for m in cells)
                + f"{total / len(y):>9.1f}%"
            )


def synthetic(df: pl.DataFrame, n: int, seed: int) -> pl.DataFrame:
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, df.height, n)
    out = df[idx]
    jitter = np.exp(rng.normal(0, 0.03, n))
    return out.with_columns(
        pl.col("epoch_energy_j") * jitter,
        pl.col("epoch_time_s") * jitter,
        pl.Series("run_id", [f"syn-{i}" for i in range(n)]),
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default=str(REPO.parent / "shared" / "data" / "seaa2023"))
    ap.add_argument("--splits", type=int, default=5)
    ap.add_argument("--retrain-rows", type=int, default=10_000)
    ap.add_argument("--retrain-repeats", type=int, default=3)
    args = ap.parse_args()
    sys.path.insert(0, str(REPO))
    from estimators.features import runs_features
    from estimators.pre import PREModel

    path = Path(args.data) / "runs.parquet"
    if not path.is_file():
        sys.exit(f"skipped: {path} not found (the shared SEAA 2023 data)")
    df = runs_features(pl.read_parquet(path))
    print(
        f"machine: {platform.machine()} {platform.processor() or ''}, "
        f"python {platform.python_version()}"
    )
    print(f"runs: {df.height}; truth = gpu_energy_j / trained_epochs (per-epoch energy)\n")

    print("random 70/30 split (per-epoch energy)")
    rows = []
    for s in range(args.splits):
        perm = np.random.default_rng(s).permutation(df.height)
        n = int(0.7 * df.height)
        rows.append(scores(df[perm[:n]], df[perm[n:]]))
    for s, r in enumerate(rows):
        print(
            f"  seed {s}: PRE MAPE {r['mape']:5.2f} %  cover90 {r['cover']:5.1f} %  "
            f"width x{r['width']:.2f}  "
            f"time MAPE {r['time_mape']:5.2f} %  kernel ridge {r['kr_mape']:5.2f} %"
        )
    print(
        f"  mean  : PRE MAPE {np.mean([r['mape'] for r in rows]):5.2f} %  cover90 "
        f"{np.mean([r['cover'] for r in rows]):5.1f} %  median upper/lower x"
        f"{np.median([r['width'] for r in rows]):.2f}  kernel ridge "
        f"{np.mean([r['kr_mape'] for r in rows]):5.2f} %  (paper, kernel ridge: 6.0 %)\n"
    )

    print("leave one architecture out (per-epoch energy)")
    print(
        f"  {'held out':14} {'MAPE':>7} {'cover90':>8} {'width':>7} {'time MAPE':>10} "
        f"{'KR MAPE':>8}  best GPU (pred / true)"
    )
    pooled: list[tuple[int, float, float]] = []
    loao: list[tuple[str, dict[str, Any]]] = []
    for a in sorted(df["architecture"].unique().to_list()):
        held = df.filter(pl.col("architecture") == a)
        r = scores(df.filter(pl.col("architecture") != a), held)
        pooled.append((held.height, r["mape"], r["cover"]))
        loao.append((a, r))
        ok = "ok" if r["pred_best"] == r["true_best"] else "WRONG"
        print(
            f"  {a:14} {r['mape']:6.2f}% {r['cover']:7.1f}% {'x':>2}{r['width']:5.2f} "
            f"{r['time_mape']:9.2f}% {r['kr_mape']:7.2f}%  {r['pred_best']} / {r['true_best']} {ok}"
        )
        print(f"      efficiency {r['eta']:.2f}, overlap p={r['overlap']:g} ({r['eta_how']})")
        for g, t, p in r["cells"]:
            print(
                f"      {g:12} true {t:9.0f} J  predicted {p:9.0f} J  ({100 * (p - t) / t:+.1f} %)"
            )

    n_all = sum(n for n, _, _ in pooled)
    print(
        f"  all {n_all} runs, each predicted by a model that never saw its architecture: "
        f"MAPE {sum(n * m for n, m, _ in pooled) / n_all:.2f} %, cover90 "
        f"{sum(n * c for n, _, c in pooled) / n_all:.1f} % (goal: MAPE <= 12 %, cover >= 80 %)"
    )

    # The run's length (epochs) is a feature: the SEAA runs train 10 epochs on a frozen
    # base, then fine-tune until early stopping, so a run's per-epoch average depends on
    # how long it ran. Above, every test run is described with the epochs it trained; a job
    # that does not say (no --epochs) is predicted by the model trained without the length.
    folds = ", ".join(f"{a} {r['mape_nolen']:.2f} %" for a, r in loao)
    n_all = sum(n for n, _, _ in pooled)
    pooled_nolen = (
        sum(
            held_n * r["mape_nolen"]
            for held_n, r in zip([n for n, _, _ in pooled], [r for _, r in loao], strict=True)
        )
        / n_all
    )
    cover_nolen = (
        sum(
            held_n * r["cover_nolen"]
            for held_n, r in zip([n for n, _, _ in pooled], [r for _, r in loao], strict=True)
        )
        / n_all
    )
    print(
        "\nthe same jobs without their length (no --epochs: the model trained without it): "
        f"random 70/30 MAPE {np.mean([r['mape_nolen'] for r in rows]):.2f} %, cover90 "
        f"{np.mean([r['cover_nolen'] for r in rows]):.1f} %; leave one architecture out "
        f"{folds}; all runs {pooled_nolen:.2f} %, cover90 {cover_nolen:.1f} %"
    )

    # A GPU model not trained on (an inventory's A100 when PRE learnt from RTX cards):
    # its runs get the interval from folds grouped by GPU model.
    print("\nleave one GPU model out (per-epoch energy; the interval from GPU-grouped folds)")
    gpu_cells = []
    for g in sorted(df["gpu_model"].unique().to_list()):
        held = df.filter(pl.col("gpu_model") == g)
        r = scores(df.filter(pl.col("gpu_model") != g), held)
        gpu_cells.append((held.height, r["mape"], r["cover"]))
        print(
            f"  {g:12} MAPE {r['mape']:6.2f} %  cover90 {r['cover']:5.1f} %  "
            f"width x{r['width']:.2f}"
        )
    n_g = sum(n for n, _, _ in gpu_cells)
    print(
        f"  all {n_g} runs: MAPE {sum(n * m for n, m, _ in gpu_cells) / n_g:.2f} %, cover90 "
        f"{sum(n * c for n, _, c in gpu_cells) / n_g:.1f} % (no goal in the issue)"
    )

    sensitivity(df)

    syn = synthetic(df, args.retrain_rows, 0)
    load0 = os.getloadavg()[0]
    times = []
    for _ in range(args.retrain_repeats):
        t0 = time.perf_counter()
        PREModel().fit(syn)
        times.append(time.perf_counter() - t0)
    print(
        f"\nretrain on {syn.height} synthetic runs (defaults, nthread=1), "
        f"{len(times)} repeats: best {min(times):.1f} s, median {np.median(times):.1f} s "
        f"(goal < 30 s; {os.cpu_count()} cores, 1-min load average {load0:.1f} before, "
        f"{os.getloadavg()[0]:.1f} after)"
    )


if __name__ == "__main__":
    main()
