from __future__ import annotations

import hashlib
import json

import numpy as np
import polars as pl
import pytest

from conftest import RUN
from estimators.features import JobDescription, feature_frame, runs_features
from estimators.pre import PREModel, Prior, grouped_folds, random_folds
from profiler.errors import BadInputError, NotFittedError

GPUS = ["RTX 3090", "RTX 3070", "T4", "A100 40GB"]
SMALL = {"n_estimators": 60, "max_depths": (2,), "cv_folds": 3, "nthread": 1}


def synthetic(
    n_arch: int,
    runs_per_cell: int,
    *,
    sigma: float,
    seed: int,
    eta: float = 0.8,
    archs: list[tuple[float, int]] | None = None,
) -> pl.DataFrame:
    """Runs whose per-epoch energy follows the prior's law times lognormal noise.

    ``archs`` gives (forward GFLOPs, layers) per architecture instead of random ones.
    """
    rng = np.random.default_rng(seed)
    pairs = []
    for a in range(n_arch):
        gf = float(rng.uniform(0.1, 10.0))
        layers = int(rng.integers(10, 300))
        if archs is not None:
            gf, layers = archs[a]
        for g in GPUS:
            for _ in range(runs_per_cell):
                pairs.append(
                    (
                        JobDescription(
                            f"arch{a}", 32, 20000, 5000, gflops_forward=gf, layers=layers
                        ),
                        g,
                    )
                )
    df = feature_frame(pairs)
    c0, c1 = 0.004, 0.00005
    secs = df["batches_per_epoch"] * (c0 + c1 * df["layers"]) + df["tflop_per_epoch"] / (
        eta * df["gpu_fp32_tflops"]
    )
    noise = np.exp(rng.normal(0, sigma, df.height))
    return df.with_columns(
        (secs * df["gpu_board_power_w"] * noise).alias("epoch_energy_j"),
        (secs * noise).alias("epoch_time_s"),
        pl.Series("run_id", [f"r{i}" for i in range(df.height)]),
    )


def test_grouped_folds_never_split_an_architecture() -> None:
    groups = ["a"] * 5 + ["b"] * 7 + ["c"] * 3 + ["d"] * 9 + ["e"] * 2 + ["f"] * 4
    folds = grouped_folds(groups, 3, seed=1)
    assert len(folds) == 3
    seen_val = np.concatenate([va for _, va in folds])
    assert sorted(seen_val) == list(range(len(groups)))  # each row validated once
    for tr, va in folds:
        assert not {groups[i] for i in tr} & {groups[i] for i in va}
    with pytest.raises(BadInputError, match="at least 2 architectures"):
        grouped_folds(["a", "a"], 3)


def test_random_folds_partition_rows() -> None:
    folds = random_folds(10, 3)
    assert sorted(np.concatenate([va for _, va in folds])) == list(range(10))


def test_interval_coverage_on_synthetic_data_with_known_noise() -> None:
    train = synthetic(6, 40, sigma=0.05, seed=0)
    # same seed: same architectures; more rows: fresh noise draws
    test = synthetic(6, 84, sigma=0.05, seed=0).tail(2000)
    m = PREModel(**SMALL).fit(train)
    p = m.predict(test)
    y = test["epoch_energy_j"].to_numpy()
    cover = np.mean((y >= p["lower_j"].to_numpy()) & (y <= p["upper_j"].to_numpy()))
    assert 0.85 <= cover <= 0.95
    assert p["seen_architecture"].all()
    mape = np.mean(np.abs(p["predicted_epoch_energy_j"].to_numpy() - y) / y)
    assert mape < 0.06  # lognormal noise of sigma 0.05 alone has MAPE ~4 %


def test_new_architecture_gets_the_grouped_interval_and_extrapolates() -> None:
    data = synthetic(5, 6, sigma=0.03, seed=3)
    # hold out the architecture with the most FLOPs: trees alone could not reach it
    top = data.sort("gflops_forward").tail(1)["architecture"][0]
    m = PREModel(**SMALL).fit(data.filter(pl.col("architecture") != top))
    held = data.filter(pl.col("architecture") == top)
    p = m.predict(held)
    assert not p["seen_architecture"].any()
    y = held["epoch_energy_j"].to_numpy()
    assert np.mean(np.abs(p["predicted_epoch_energy_j"].to_numpy() - y) / y) < 0.15
    width_new = (p["upper_j"] / p["lower_j"]).mean()
    seen = m.predict(data.filter(pl.col("architecture") != top).head(5))
    assert width_new > (seen["upper_j"] / seen["lower_j"]).mean()


def test_new_gpu_gets_the_gpu_grouped_interval() -> None:
    """A seen architecture on a GPU model not trained on: folds grouped by GPU, not random.

    Regression: the random-fold interval (about x1.1) was used, and on the real
    runs leave-one-GPU-out covered 0 % of the held-out GPU's runs.
    """
    data = synthetic(4, 6, sigma=0.03, seed=5)
    m = PREModel(**SMALL).fit(data.filter(pl.col("gpu_model") != "A100 40GB"))
    assert m.cv_["energy"]["gpu_grouped_coverage"] is not None
    held = m.predict(data.filter(pl.col("gpu_model") == "A100 40GB"))
    seen = m.predict(data.filter(pl.col("gpu_model") != "A100 40GB"))
    assert held["seen_architecture"].all() and not held["seen_gpu"].any()
    width = (held["upper_j"] / held["lower_j"]).to_numpy()
    assert width.min() > (seen["upper_j"] / seen["lower_j"]).max()
    fit = m.fitted_["energy"]
    assert fit.gpu_q is not None
    assert np.allclose(width, np.exp(fit.gpu_q[1] - fit.gpu_q[0]))
    # A new architecture on a new GPU: both half-widths added.
    job = feature_frame(
        [(JobDescription("new", 32, 20000, 5000, gflops_forward=3.0, layers=77), "T4")]
    )
    one = m.predict(job.with_columns(pl.lit("H100 SXM").alias("gpu_model")))
    assert fit.unseen_q is not None
    both = fit.unseen_q[1] + fit.gpu_q[1] - fit.unseen_q[0] - fit.gpu_q[0]
    assert float(one["upper_j"][0] / one["lower_j"][0]) == pytest.approx(np.exp(both))


def test_a_single_training_gpu_gives_no_interval_for_a_new_one() -> None:
    data = synthetic(3, 6, sigma=0.03, seed=6)
    m = PREModel(**SMALL).fit(data.filter(pl.col("gpu_model") == "T4"))
    p = m.predict(data.filter(pl.col("gpu_model") == "RTX 3090"))
    assert p["lower_j"].null_count() == p.height and p["predicted_epoch_energy_j"].null_count() == 0


def test_same_name_at_other_flops_is_an_unseen_architecture(tmp_path) -> None:
    data = synthetic(5, 6, sigma=0.03, seed=3)
    m = PREModel(**SMALL).fit(data)
    name = data["architecture"][0]
    same = data.filter(pl.col("architecture") == name).head(3)
    # The same name at 4x the FLOPs per sample (say, twice the image side) is
    # another workload: it must get the wider interval of a new architecture.
    bigger = same.with_columns(pl.col("gflops_forward") * 4, pl.col("tflop_per_epoch") * 4)
    m.save(tmp_path / "m.json")
    for model in (m, PREModel.load(tmp_path / "m.json")):
        p = model.predict(pl.concat([same, bigger]))
        assert p["seen_architecture"].to_list() == [True] * 3 + [False] * 3
        width = (p["upper_j"] / p["lower_j"]).to_list()
        assert width[3] > width[0]


def test_efficiency_is_chosen_by_grouped_cv_only_when_identifiable() -> None:
    # Two architectures per GPU (no three-architecture fit), one compute-bound:
    # at 2 GFLOPs x 3 x 32 samples the compute term is most of each batch.
    heavy = synthetic(2, 6, sigma=0.01, seed=4, eta=0.5, archs=[(2.0, 20), (0.05, 200)])
    m = PREModel(**SMALL).fit(heavy)
    assert m.cv_["energy"]["efficiency"] == 0.5
    assert m.cv_["energy"]["overlap"] == 1.0  # the data were made additive
    assert m.cv_["energy"]["efficiency_source"] == "grouped CV"
    scores = m.cv_["energy"]["efficiency_cv_log_error_pct"]
    assert scores["p=1,eta=0.5"] == min(v for v in scores.values() if v is not None)
    # Overhead-bound runs only: the data cannot tell 0.5 from 0.8, so the default stays.
    light = synthetic(2, 6, sigma=0.01, seed=4, eta=0.5, archs=[(0.002, 20), (0.001, 200)])
    m = PREModel(**SMALL, efficiency=0.7).fit(light)
    assert m.cv_["energy"]["efficiency"] == 0.7
    assert m.cv_["energy"]["efficiency_source"].startswith("default: not identifiable")
    # Three architectures on a GPU pin it down by least squares.
    three = synthetic(3, 4, sigma=0.0, seed=4, eta=0.5, archs=[(2.0, 20), (0.5, 200), (4.0, 60)])
    m = PREModel(**SMALL).fit(three)
    assert m.cv_["energy"]["efficiency"] == pytest.approx(0.5, rel=1e-6)
    assert "efficiency fitted" in m.cv_["energy"]["efficiency_source"]


def test_prior_overlaps_overhead_and_computation_by_a_soft_maximum() -> None:
    """Regression: an additive prior charged host overhead on top of computation.

    On compute-bound VGG16 that made the RTX 3070 look cheaper than the RTX 3090
    (overhead of the 3090's slower host added in full); the GPU hides host work
    behind computation, so per batch time is a soft maximum of the two.
    """
    row = feature_frame(
        [(JobDescription("a", 32, 3200, 0, gflops_forward=1.0, layers=10), "RTX 3090")]
    )
    # 100 batches; device per batch 3 * 1 GFLOP * 32 / (35.58 TFLOPS * 0.8) = 3.3727 ms
    d = 3 * 32 / (35.58e3 * 0.8)
    h = 0.002 + 0.0001 * 10  # c0 + c1 * layers = 3 ms
    coef = {"RTX 3090": (0.002, 0.0001)}
    for p, want in ((1.0, h + d), (2.0, (h * h + d * d) ** 0.5)):
        prior = Prior(False, coef, {"RTX 3090": 35.58}, (0.0, 0.0), (0.0, 0.0), 0.8, p)
        assert prior.predict(row)[0] == pytest.approx(100 * want, rel=1e-6)
        energy = Prior(True, coef, {"RTX 3090": 35.58}, (0.0, 0.0), (0.0, 0.0), 0.8, p)
        assert energy.predict(row)[0] == pytest.approx(350 * 100 * want, rel=1e-6)


def test_predict_before_fit_and_bad_rows_are_refused() -> None:
    with pytest.raises(NotFittedError, match="PREModel.*not fitted"):
        PREModel().predict(pl.DataFrame())
    data = synthetic(3, 4, sigma=0.05, seed=1)
    with pytest.raises(BadInputError, match="at least 10"):
        PREModel(**SMALL).fit(data.head(5))
    with pytest.raises(BadInputError, match=r"column\(s\) \['epoch_time_s'\]"):
        PREModel(**SMALL).fit(data.drop("epoch_time_s"))
    with pytest.raises(BadInputError, match=r"'gflops_forward' must be > 0 in every row"):
        PREModel(**SMALL).fit(data.with_columns(pl.lit(0.0).alias("gflops_forward")))
    m = PREModel(**SMALL).fit(data)
    with pytest.raises(BadInputError, match="'layers' has nulls"):
        m.predict(data.with_columns(pl.lit(None, pl.Float64).alias("layers")))


def test_save_load_round_trip_and_tamper_detection(tmp_path) -> None:
    data = synthetic(3, 5, sigma=0.05, seed=2)
    m = PREModel(**SMALL).fit(data)
    path = tmp_path / "models" / "pre-v1.json"
    card = m.save(path, card={"version": 1})
    assert card.name == "pre-v1.card.json"
    meta = json.loads(card.read_text())
    assert meta["training_rows"] == data.height and meta["version"] == 1
    body = json.loads(path.read_text())
    assert body["targets"]["energy"]["booster"]["learner"]  # XGBoost's own JSON
    again = PREModel.load(path)
    a, b = m.predict(data), again.predict(data)
    assert np.allclose(a["predicted_epoch_energy_j"], b["predicted_epoch_energy_j"], rtol=1e-6)
    assert np.allclose(a["upper_j"], b["upper_j"], rtol=1e-6)

    path.write_text(path.read_text().replace('"coverage":0.9', '"coverage":0.5'))
    with pytest.raises(BadInputError, match="checksum mismatch"):
        PREModel.load(path)
    m.save(path)
    meta = json.loads(card.read_text())
    meta["format_version"] = 99
    card.write_text(json.dumps(meta))
    with pytest.raises(BadInputError, match="version 99"):
        PREModel.load(path)
    with pytest.raises(BadInputError, match="no such file"):
        PREModel.load(tmp_path / "nope.json")

    # A file whose card checksum matches but whose FLOPs record is not an object.
    m.save(path)
    body = json.loads(path.read_text())
    body["architecture_gflops"] = [1.0]
    raw = json.dumps(body, separators=(",", ":")).encode()
    path.write_bytes(raw)
    meta = json.loads(card.read_text())
    meta["sha256"] = hashlib.sha256(raw).hexdigest()
    card.write_text(json.dumps(meta))
    with pytest.raises(BadInputError, match="malformed PRE model file.*architecture_gflops"):
        PREModel.load(path)


def _with_run_length(data: pl.DataFrame, seed: int) -> pl.DataFrame:
    """Runs of 20-120 epochs whose first 10 epochs cost a third: per-epoch averages fall
    with shorter runs, as in a frozen-base-then-fine-tune schedule."""
    rng = np.random.default_rng(seed)
    n = rng.integers(20, 121, data.height).astype(float)
    share = (10 / 3 + (n - 10)) / n
    return data.with_columns(
        pl.Series("epochs", n),
        pl.col("epoch_energy_j") * share,
        pl.col("epoch_time_s") * share,
    )


def test_run_length_is_a_feature_and_a_missing_one_is_the_reference(tmp_path) -> None:
    data = _with_run_length(synthetic(3, 20, sigma=0.02, seed=5), seed=6)
    train, test = data[::2], data[1::2]
    y = test["epoch_energy_j"].to_numpy()

    def mape(m: PREModel) -> float:
        p = m.predict(test)["predicted_epoch_energy_j"].to_numpy()
        return float(100 * np.mean(np.abs(p - y) / y))

    with_len = PREModel().fit(train)
    without = PREModel(epochs_feature=False).fit(train)
    # The share spans 0.67-0.95: without the length the model cannot tell the runs apart
    # (measured: 2.5 % against 6.9 %).
    assert mape(with_len) < 0.6 * mape(without)
    assert with_len.reference_epochs_ == pytest.approx(float(np.median(train["epochs"])))

    # A job that does not say its length is predicted by the model trained without it,
    # with that model's (wider) interval: the same figures as a model without the feature.
    row = test.head(1)
    blank = with_len.predict(row.with_columns(pl.lit(None, pl.Float64).alias("epochs")))
    alone = without.predict(row)
    for c in ("predicted_epoch_energy_j", "lower_j", "upper_j", "predicted_epoch_time_s"):
        assert blank[c][0] == pytest.approx(alone[c][0], rel=1e-9)
    known = with_len.predict(row)
    assert blank["upper_j"][0] / blank["lower_j"][0] > known["upper_j"][0] / known["lower_j"][0]
    assert with_len.uses_length and not without.uses_length
    # Shorter runs cost less per epoch (truth: 0.67 / 0.94 = 0.71; measured mean 0.80).
    short = with_len.predict(test.with_columns(pl.lit(20.0).alias("epochs")))
    long = with_len.predict(test.with_columns(pl.lit(120.0).alias("epochs")))
    ratio = short["predicted_epoch_energy_j"] / long["predicted_epoch_energy_j"]
    assert float(ratio.mean()) < 0.85  # type: ignore[operator]
    # Switched off, the length changes nothing.
    a = without.predict(row.with_columns(pl.lit(20.0).alias("epochs")))
    b = without.predict(row.with_columns(pl.lit(120.0).alias("epochs")))
    assert a["predicted_epoch_energy_j"][0] == b["predicted_epoch_energy_j"][0]

    # A length that is not a finite number > 0 is refused, in training and prediction rows.
    for bad in (0.0, -5.0, float("inf"), float("nan")):
        with pytest.raises(BadInputError, match="'epochs' .*must be a finite number > 0"):
            with_len.predict(row.with_columns(pl.lit(bad).alias("epochs")))
        with pytest.raises(BadInputError, match="'epochs' .*must be a finite number > 0"):
            PREModel(**SMALL).fit(train.with_columns(pl.lit(bad).alias("epochs")))

    # Both survive saving.
    for m, name in ((with_len, "a.json"), (without, "b.json")):
        m.save(tmp_path / name)
        again = PREModel.load(tmp_path / name)
        assert again.epochs_feature is m.epochs_feature
        assert again.reference_epochs_ == m.reference_epochs_
        assert np.allclose(
            again.predict(test)["predicted_epoch_energy_j"],
            m.predict(test)["predicted_epoch_energy_j"],
            rtol=1e-6,
        )


def test_runs_features_take_the_run_length_from_trained_then_planned_epochs() -> None:
    base = RUN
    runs = pl.DataFrame(
        [
            {**base, "run_id": "a", "trained_epochs": 42, "planned_epochs": 90},
            {**base, "run_id": "b", "trained_epochs": None, "planned_epochs": 90},
            {**base, "run_id": "c", "trained_epochs": None, "planned_epochs": None},
        ],
        schema_overrides={"trained_epochs": pl.Int64, "planned_epochs": pl.Int64},
    )
    got = runs_features(runs, with_truth=False)["epochs"].to_list()
    assert got == [42.0, 90.0, None]
    row = feature_frame(
        [
            (
                JobDescription(
                    "vgg16", 32, 23807, image_height=128, image_width=128, planned_epochs=7
                ),
                "RTX 3070",
            )
        ]
    )
    assert row["epochs"].to_list() == [7.0]


@pytest.fixture
def seaa(shared_data) -> pl.DataFrame:
    return runs_features(pl.read_parquet(shared_data / "runs.parquet"))


def test_real_runs_leave_one_gpu_out_intervals(seaa: pl.DataFrame) -> None:
    """Each GPU model held out, its runs predicted with the GPU-grouped interval.

    Measured with the defaults: coverage 0 / 100 / 100 % (GTX 750 Ti, RTX
    3070, RTX 3090 held out), 76 % over all 249 runs; before, 0 % for every
    GPU. With two training GPUs each inner fold trains on one: the GTX 750
    Ti (slowest, oldest) is unlike either RTX card, so its interval, learnt
    from the two RTX cards, is too narrow (MAPE 65 %); the RTX cards' are
    very wide.
    """
    covered, n = 0, 0
    for g in sorted(set(seaa["gpu_model"].to_list())):
        held = seaa.filter(pl.col("gpu_model") == g)
        p = PREModel().fit(seaa.filter(pl.col("gpu_model") != g)).predict(held)
        assert not p["seen_gpu"].any()
        y = held["epoch_energy_j"].to_numpy()
        covered += int(np.sum((y >= p["lower_j"].to_numpy()) & (y <= p["upper_j"].to_numpy())))
        n += held.height
    assert covered / n >= 0.75


def test_real_runs_random_split_mape(seaa: pl.DataFrame) -> None:
    """The issue's goal, as bench/pre.py measures it: five random 70/30 splits, defaults.

    Measured (2-core x86): mean MAPE 3.44 %, mean coverage 91.5 % (5.72 % and 89.6 %
    without the run-length feature ``epochs``).
    """
    mapes, covers = [], []
    for seed in range(5):
        perm = np.random.default_rng(seed).permutation(seaa.height)
        n = int(0.7 * seaa.height)
        m = PREModel().fit(seaa[perm[:n]])
        test = seaa[perm[n:]]
        p = m.predict(test)
        y = test["epoch_energy_j"].to_numpy()
        mapes.append(100 * np.mean(np.abs(p["predicted_epoch_energy_j"].to_numpy() - y) / y))
        covers.append(np.mean((y >= p["lower_j"].to_numpy()) & (y <= p["upper_j"].to_numpy())))
    assert np.mean(mapes) <= 6.0  # the paper's kernel ridge reported 6.0 %
    assert 0.85 <= np.mean(covers) <= 0.95


def test_cli_bench_recommend_and_tampered_model(tmp_path, capsys) -> None:
    from cluster.cli import main

    data = synthetic(3, 5, sigma=0.05, seed=2)
    m = PREModel(**SMALL).fit(data)
    path = tmp_path / "pre-v1.json"
    m.save(path)
    args = [
        "recommend",
        "--arch",
        "arch0",
        "--gflops",
        "2",
        "--layers",
        "40",
        "--batch-size",
        "32",
        "--train-size",
        "1000",
        "--epochs",
        "5",
        "--model",
        str(path),
        "--json",
    ]
    assert main(args) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["placement"]["ray_resources"] == {f"node_type:{out['chosen']}": 0.001}
    assert all(not r["seen_architecture"] for r in out["node_types"])
    # The table says why the interval is wide: arch0 was trained at other FLOPs.
    trained = sorted(set(data.filter(pl.col("architecture") == "arch0")["gflops_forward"]))
    assert 2.0 not in trained
    assert main([a for a in args if a != "--json"]) == 0
    text = " ".join(capsys.readouterr().out.split())
    assert "arch0 at 2 GFLOPs per sample is new to PRE" in text
    assert f"trained on arch0 at: {trained[0]:.3g}" in text
    path.write_bytes(path.read_bytes().replace(b'"coverage":0.9', b'"coverage":0.8'))
    assert main(args) == 2
    assert "checksum mismatch" in capsys.readouterr().err

    runs = pl.DataFrame(
        {
            "run_id": data["run_id"],
            "gpu_model": data["gpu_model"],
            "architecture": data["architecture"],
            "batch_size": 32,
            "training_size": 20000,
            "validation_size": 5000,
            "gflops_forward": data["gflops_forward"],
            "layers": data["layers"],
            "trained_epochs": 2,
            "duration_s": data["epoch_time_s"] * 2,
            "gpu_energy_j": data["epoch_energy_j"] * 2,
        }
    )
    runs.write_parquet(tmp_path / "runs.parquet")
    assert (
        main(
            [
                "bench",
                "pre",
                "--train",
                str(tmp_path / "runs.parquet"),
                "--test",
                str(tmp_path / "runs.parquet"),
                "--out",
                str(tmp_path / "p.parquet"),
            ]
        )
        == 0
    )
    pred = pl.read_parquet(tmp_path / "p.parquet")
    assert pred.columns[:5] == [
        "run_id",
        "predicted_epoch_energy_j",
        "lower_j",
        "upper_j",
        "predicted_epoch_time_s",
    ]
    assert pred.height == data.height

    # --plot draws predicted against measured (a real PNG); another suffix is refused.
    bench = ["bench", "pre", "--train", str(tmp_path / "runs.parquet")]
    bench += ["--test", str(tmp_path / "runs.parquet"), "--out", str(tmp_path / "q.parquet")]
    assert main([*bench, "--plot", str(tmp_path / "pre.png")]) == 0
    png = (tmp_path / "pre.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
    capsys.readouterr()
    assert main([*bench, "--plot", str(tmp_path / "pre.svg")]) == 2
    assert "--plot must name a .png file" in capsys.readouterr().err
    assert not (tmp_path / "pre.svg").exists()


def test_pre_figure_without_truth_draws_sorted_predictions() -> None:
    from estimators.report import figure_png, pre_figure

    data = synthetic(3, 5, sigma=0.05, seed=2)
    p = PREModel(**SMALL).fit(data).predict(data)
    fig = pre_figure(p, data["gpu_model"].to_list(), None)
    ax = fig.axes[0]
    assert ax.get_xlabel() == "run (sorted by prediction)"
    assert figure_png(fig)[:4] == b"\x89PNG"
    # with truth the title carries MAPE and coverage
    fig = pre_figure(p, data["gpu_model"].to_list(), data["epoch_energy_j"].to_numpy())
    assert "MAPE" in fig.axes[0].get_title() and fig.axes[0].get_xscale() == "log"
    # an architecture the model never saw is drawn in its own (open-marker) series
    held = data["architecture"][0]
    m2 = PREModel(**SMALL).fit(data.filter(pl.col("architecture") != held))
    p2 = m2.predict(data)
    fig = pre_figure(p2, data["gpu_model"].to_list(), data["epoch_energy_j"].to_numpy())
    labels = fig.axes[0].get_legend_handles_labels()[1]
    assert any("(new architecture)" in x for x in labels)
    assert any("(seen architecture)" in x for x in labels)


def test_a_failed_save_leaves_no_model_without_its_card(tmp_path) -> None:
    """The card is written first; a model file exists only with its card.

    Regression: the model was written first, so a failed card write left a
    model without its card, which `recommend` refused and the next retrain
    replaced without comparing it to anything.
    """
    from cluster.retrain import latest_model, versions

    m = PREModel(**SMALL).fit(synthetic(3, 4, sigma=0.03, seed=7))
    m.save(tmp_path / "pre-v1.json")
    (tmp_path / "pre-v2.card.json").mkdir()  # the card cannot be written there
    with pytest.raises(BadInputError, match="pre-v2.card.json: is a folder"):
        m.save(tmp_path / "pre-v2.json")
    assert not (tmp_path / "pre-v2.json").exists()
    assert versions(tmp_path) == [1]
    assert latest_model(tmp_path).n_rows_ == m.n_rows_
    # And a model file that cannot be written takes its new card away again.
    (tmp_path / "pre-v2.card.json").rmdir()
    (tmp_path / "pre-v2.json").mkdir()
    with pytest.raises(BadInputError, match="pre-v2.json: is a folder"):
        m.save(tmp_path / "pre-v2.json")
    assert not (tmp_path / "pre-v2.card.json").exists()


def test_the_cards_coverage_is_measured_on_runs_the_bounds_did_not_see() -> None:
    """Found in review: the card's coverage checked bounds on the residuals they came from.

    Two folds, one predicted within 1 %, one 2.7x off: bounds from the good fold miss
    the bad one, bounds from the bad fold cover the good one; 50 %, where checking
    the pooled bounds on the same residuals says 100 %.
    """
    from estimators.pre import _held_out_cover

    y = np.full(20, 100.0)
    p = np.concatenate([np.full(10, 99.0), np.full(10, 37.0)])
    folds = [(np.arange(10, 20), np.arange(10)), (np.arange(10), np.arange(10, 20))]
    assert _held_out_cover(p, y, folds, 0.9) == 0.5
    m = PREModel(**SMALL).fit(synthetic(4, 6, sigma=0.05, seed=9))
    assert 0.7 <= m.cv_["energy"]["random_coverage"] <= 1.0


def test_predicted_energy_never_implies_more_than_board_power(seaa: pl.DataFrame) -> None:
    """Found in review: a big job on cards PRE did not train on came out at 854 W on a
    700 W H100 (energy / time, the two predicted by separate models). The time gives way:
    a run takes at least its energy at board power."""
    from estimators.pre import _arrays

    m = PREModel().fit(seaa)
    jobs = [
        JobDescription("big", 64, 50000, 0, gflops_forward=gf, layers=layers, planned_epochs=90)
        for gf, layers in ((17.5, 150), (35.0, 150), (1.0, 30))
    ]
    rows = feature_frame([(j, g) for j in jobs for g in ("H100 SXM", "A100", "GTX 750 Ti")])
    p = m.predict(rows)
    watts = p["predicted_epoch_energy_j"].to_numpy() / p["predicted_epoch_time_s"].to_numpy()
    assert np.all(watts <= _arrays(rows)["power_w"] * (1 + 1e-9))
    assert (p["time_lower_s"] <= p["predicted_epoch_time_s"]).all()
    assert (p["predicted_epoch_time_s"] <= p["time_upper_s"]).all()
