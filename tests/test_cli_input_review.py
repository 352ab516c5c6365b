"""Bad input the CLI review found: each is refused (exit 2) before any work or store write.

Unreadable inventory and PRE model files; ``--out`` paths that cannot be
written (``energy``, ``bench step``); ``probe --inventory``; implausible
planned epochs (``10**15``) in STEP's time mode; ``wattwise train`` input
that used to leave a ``failed`` run; ``report`` on a finished run without
epoch marks.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import polars as pl
import pytest

from cluster.cli import main
from conftest import at
from estimators.baselines import bench_step
from estimators.pre import PREModel, card_path
from estimators.recommend import NodeType
from estimators.step import RunPlan, Step
from profiler.errors import BadInputError
from profiler.store import Store
from tests.test_pre import SMALL, synthetic

REPO = Path(__file__).resolve().parents[1]
JOB = ["--arch", "arch0", "--batch-size", "32", "--train-size", "20000"]
JOB += ["--gflops", "5", "--layers", "50"]
INVENTORY = '[{"name": "t4", "gpu_model": "Tesla T4", "default": true}]'


@pytest.fixture(scope="module")
def model() -> PREModel:
    return PREModel(**SMALL).fit(synthetic(4, 5, sigma=0.02, seed=5))


def _save(model: PREModel, folder: Path) -> Path:
    path = folder / "pre-v1.json"
    model.save(path, card={"version": 1})
    return path


@pytest.fixture
def unreadable() -> Iterator[list[Path]]:
    """Files made unreadable (mode 000) by the test; their mode is given back after."""
    made: list[Path] = []
    yield made
    for p in made:
        p.chmod(0o644)


def _cli_without_read_rights(argv: list[str]) -> subprocess.CompletedProcess[str]:
    """Run ``wattwise ARGV`` in a process for which mode 000 means unreadable.

    Root reads any file whatever its mode: as root the process drops the
    capabilities that allow it (``setpriv``), as the reviewer's repro did.
    """
    cmd = [sys.executable, "-c", "import sys; from cluster.cli import main; sys.exit(main())"]
    if os.geteuid() == 0:
        if shutil.which("setpriv") is None:
            pytest.skip("running as root without setpriv: mode 000 cannot be made unreadable")
        caps = "-dac_override,-dac_read_search"
        cmd = ["setpriv", f"--inh-caps={caps}", f"--bounding-set={caps}", "--", *cmd]
    return subprocess.run(
        [*cmd, *argv], capture_output=True, text=True, cwd=REPO, timeout=300, check=False
    )


def _refused(done: subprocess.CompletedProcess[str], command: str, path: Path) -> str:
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr
    assert done.stderr.startswith(f"wattwise {command}: error: {path}: expected a readable")
    assert "Permission denied" in done.stderr
    return done.stderr


# ------------------------------------------------------------------------ 1. unreadable files


def test_an_unreadable_inventory_is_refused_by_recommend_and_placement(
    model: PREModel, tmp_path: Path, unreadable: list[Path]
) -> None:
    """Found in review: PermissionError traceback and exit 1 (load_inventory caught JSON only)."""
    inv = tmp_path / "inv.json"
    inv.write_text(INVENTORY)
    inv.chmod(0o000)
    unreadable.append(inv)
    model_file = _save(model, tmp_path)
    for command, extra in (
        ("recommend", ["--model", str(model_file)]),
        ("placement", ["--node-type", "t4"]),
    ):
        done = _cli_without_read_rights([command, *JOB, "--inventory", str(inv), *extra])
        _refused(done, command, inv)


def test_an_unreadable_model_or_card_is_refused(
    model: PREModel, tmp_path: Path, unreadable: list[Path]
) -> None:
    """Found in review: ``recommend --model`` and the store's model gave a traceback."""
    given = _save(model, tmp_path / "given")
    given.chmod(0o000)
    unreadable.append(given)
    done = _cli_without_read_rights(["recommend", *JOB, "--model", str(given)])
    _refused(done, "recommend", given)

    store = tmp_path / "store"
    stored = _save(model, store / "models")
    card_path(stored).chmod(0o000)
    unreadable.append(card_path(stored))
    done = _cli_without_read_rights(["recommend", *JOB, "--store", str(store)])
    _refused(done, "recommend", card_path(stored))


def test_retrain_if_new_runs_reports_an_unreadable_model_instead_of_a_traceback(
    model: PREModel, tmp_path: Path, unreadable: list[Path]
) -> None:
    store = tmp_path / "store"
    stored = _save(model, store / "models")
    stored.chmod(0o000)
    unreadable.append(stored)
    done = _cli_without_read_rights(["retrain", "--if-new-runs", "--store", str(store)])
    assert "Traceback" not in done.stderr, done.stderr
    assert done.returncode == 0, done.stderr
    assert f"{stored}: expected a readable PRE model file" in done.stdout.replace("\n", "")


def test_a_model_card_that_cannot_be_read_is_bad_input(tmp_path: Path) -> None:
    """Without permission tricks: a folder cannot be read as a card either (IsADirectoryError)."""
    from estimators.pre import read_card

    with pytest.raises(BadInputError, match=r"expected a readable PRE model card; could not"):
        read_card(tmp_path)


# ------------------------------------------------------------------ 2. --out that cannot be written


def _energy_files(tmp_path: Path) -> list[str]:
    samples = pl.DataFrame(
        {"run_id": "r", "timestamp": [at(i) for i in range(4)], "power_w": [100.0] * 4}
    )
    epochs = pl.DataFrame({"run_id": "r", "epoch": [1], "start": [at(0)], "end": [at(3)]})
    samples.write_parquet(tmp_path / "s.parquet")
    epochs.write_parquet(tmp_path / "e.parquet")
    return ["--samples", str(tmp_path / "s.parquet"), "--epochs", str(tmp_path / "e.parquet")]


def _bench_files(tmp_path: Path) -> list[str]:
    runs = pl.DataFrame({"run_id": ["a"], "duration_s": [100.0], "trained_epochs": [10]})
    traces = pl.DataFrame(
        {"run_id": "a", "timestamp": [at(i) for i in range(101)], "power_w": [100.0] * 101}
    )
    runs.write_parquet(tmp_path / "runs.parquet")
    traces.write_parquet(tmp_path / "traces.parquet")
    return [
        "--runs",
        str(tmp_path / "runs.parquet"),
        "--traces",
        str(tmp_path / "traces.parquet"),
        "--observe-fraction",
        "0.5",
        "--methods",
        "naive",
    ]


@pytest.mark.parametrize("command", ["energy", "bench step"])
def test_an_out_that_is_a_folder_or_below_a_file_is_refused_up_front(
    command: str,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Found in review: exit 1 "could not write ...; the store is unchanged" (no store is
    involved), and for bench step only after the whole benchmark ran."""
    argv = [*command.split(), *(_energy_files if command == "energy" else _bench_files)(tmp_path)]
    ran: list[str] = []
    if command == "bench step":
        import estimators.baselines

        real = estimators.baselines.bench_step

        def counted(*args: Any, **kwargs: Any) -> pl.DataFrame:
            ran.append("bench")
            return real(*args, **kwargs)

        monkeypatch.setattr(estimators.baselines, "bench_step", counted)
    (tmp_path / "dir.parquet").mkdir()
    (tmp_path / "file").write_text("")
    for out, says in (
        (tmp_path / "dir.parquet", "is a folder; expected a file name"),
        (tmp_path / "file" / "out.parquet", "is a file, not a folder"),
    ):
        assert main([*argv, "--out", str(out)]) == 2
        err = capsys.readouterr().err
        assert f"--out {out}: " in err and says in err, err
        assert "store" not in err and "trained" not in err
    assert not ran  # refused before the benchmark


@pytest.mark.parametrize("command", ["energy", "bench step"])
def test_an_out_whose_write_fails_names_the_file_not_a_store(
    command: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = [*command.split(), *(_energy_files if command == "energy" else _bench_files)(tmp_path)]
    out = tmp_path / ("p" * 300 + ".parquet")  # longer than a file name may be
    assert main([*argv, "--out", str(out)]) == 1
    err = capsys.readouterr().err
    assert "File name too long" in err and f"{out} is unchanged" in err
    assert "store" not in err


# ------------------------------------------------------------------------ 3. probe --inventory


def _no_ray(monkeypatch: pytest.MonkeyPatch) -> None:
    def connect(address: str | None = "auto") -> None:
        raise AssertionError(f"connected to Ray at {address!r} before checking the input")

    monkeypatch.setattr("cluster.runner.connect", connect)


@pytest.mark.parametrize(
    ("content", "message"),
    [(None, "expected an inventory JSON file; no such file"), ("{", "expected JSON")],
)
def test_probe_reads_its_inventory_before_connecting(
    content: str | None,
    message: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """Found in review: --inventory was never read; a missing file went on to connect (hang)."""
    _no_ray(monkeypatch)
    inv = tmp_path / "inv.json"
    if content is not None:
        inv.write_text(content)
    argv = ["probe", "--store", str(tmp_path), "--epochs", "3", "--inventory", str(inv)]
    assert main([*argv, "--", "true"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"wattwise probe: error: {inv}: ") and message in err


def test_probe_probes_the_inventorys_alive_node_types(capsys: pytest.CaptureFixture[str]) -> None:
    from cluster.commands.run_cmds import probe_candidates

    inventory = [NodeType("a", "Tesla T4"), NodeType("gone", "Tesla T4"), NodeType("b", "A100")]
    types: dict[str, dict[str, Any]] = {
        "a": {"alive": ["n1"], "dead": []},
        "b": {"alive": ["n2"], "dead": []},
        "c": {"alive": ["n3"], "dead": []},
        "dead": {"alive": [], "dead": ["n4"]},
    }
    assert probe_candidates(inventory, types, "inv.json") == ["a", "b"]
    assert "not probed: gone (not in this cluster)" in capsys.readouterr().err
    with pytest.raises(BadInputError, match=r"no node type of the inventory has alive nodes"):
        probe_candidates([NodeType("dead", "T4")], types, "inv.json")


# ------------------------------------------------------------- 4. implausible planned epochs


def test_bench_step_gives_a_run_with_implausible_epochs_a_reason_not_an_allocation() -> None:
    """Found in review: trained_epochs 10**15 made numpy ask for 1.42 PiB (ArrayMemoryError)."""
    traces = pl.concat(
        pl.DataFrame(
            {"run_id": r, "timestamp": [at(i) for i in range(101)], "power_w": [100.0] * 101}
        )
        for r in ("huge", "zero", "ok")
    )
    runs = pl.DataFrame(
        {
            "run_id": ["huge", "zero", "ok"],
            "duration_s": [100.0] * 3,
            "trained_epochs": [10**15, 0, 10],
        }
    )
    pred = bench_step(runs, traces, fraction=0.5, methods=["step", "carbontracker", "naive"])
    by = {r: pred.filter(pl.col("run_id") == r) for r in ("huge", "zero", "ok")}
    assert by["huge"]["predicted_energy_j"].is_null().all()
    assert all(
        "runs.trained_epochs is 1000000000000000 for this run" in r
        and "shorter than the 1 s between samples" in r
        and "expected at most 100 epochs" in r
        for r in by["huge"]["reason"]
    )
    assert by["zero"]["predicted_energy_j"].is_null().all()
    assert all("runs.trained_epochs is 0" in r for r in by["zero"]["reason"])
    assert by["ok"]["predicted_energy_j"].is_not_null().all()


def test_step_time_mode_refuses_epochs_shorter_than_the_sample_interval() -> None:
    samples = pl.DataFrame({"timestamp": [at(i) for i in range(50)], "power_w": [100.0] * 50})
    plan = RunPlan(total_duration_s=100.0, planned_epochs=10**15)
    with pytest.raises(BadInputError, match=r"an epoch of 1e-13 s, shorter than the 1 s"):
        Step().fit(samples, plan=plan)
    # One epoch per sample interval is still measurable.
    ok = Step().fit(samples, plan=RunPlan(total_duration_s=100.0, planned_epochs=100)).predict()
    assert ok.energy_j is not None


def _store_without_marks(root: Path, status: str, **record: Any) -> list[str]:
    """Run "r1": 200 samples at 100 W, 1 s apart, and no epoch marks; its CLI arguments."""
    n = 200
    store = Store(root)
    store.write_samples(
        pl.DataFrame(
            {
                "run_id": "r1",
                "node": "n1",
                "device": "0",
                "timestamp": [at(i) for i in range(n)],
                "power_w": [100.0] * n,
                "source": "replay",
            }
        )
    )
    row = {"run_id": ["r1"], "status": [status], "start": [at(0)]}
    store.write_runs(pl.DataFrame(row | {k: [v] for k, v in record.items()}))
    return ["--run", "r1", "--store", str(root)]


@pytest.mark.parametrize("command", ["estimate", "report"])
def test_estimate_and_report_refuse_implausible_planned_epochs(
    command: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Found in review: estimate allocated petabytes; report looped 10**15 times."""
    run = _store_without_marks(tmp_path / "s", "running", duration_s=400.0)
    out = ["--out", str(tmp_path / "r.html")] if command == "report" else []
    assert main([command, *run, *out, "--planned-epochs", str(10**15)]) == 2
    assert "shorter than the 1 s between samples" in capsys.readouterr().err
    assert not (tmp_path / "r.html").exists()


# ------------------------------------------------------------------------------- 5. train


def _runs(root: Path) -> list[str]:
    return Store(root).runs()["run_id"].to_list() if (root / "runs.parquet").exists() else []


TINY = ["--epochs", "1", "--image-size", "32", "--train-size", "8", "--batch-size", "4"]


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (["--arch", "resnet81"], r"unknown architecture 'resnet81'"),
        (["--arch", "squeezenet1_0", "--image-size", "8"], r"cannot train on 8x8 images"),
        (
            ["--arch", "resnet18", "--train-size", "9"],
            r"--train-size 9 with --batch-size 4 leaves a last batch of 1 image",
        ),
    ],
)
def test_train_checks_its_input_before_recording_the_run(
    options: list[str],
    message: str,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Found in review: a bad --arch left run 'myrun' failed, and the id could not be reused."""
    monkeypatch.delenv("WATTWISE_RUNNER", raising=False)
    store = tmp_path / "s"
    argv = ["train", *TINY, "--store", str(store), "--run-id", "myrun"]
    assert main([*argv, *options]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and re.search(message, err), err
    assert "myrun" not in _runs(store)
    assert main([*argv, "--arch", "mobilenet_v3_small"]) == 0
    assert Store(store).run("myrun")["status"] == "finished"


def test_train_without_a_gpu_refuses_cuda_before_recording(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a CUDA GPU")
    monkeypatch.delenv("WATTWISE_RUNNER", raising=False)
    store = tmp_path / "s"
    argv = ["train", *TINY, "--store", str(store), "--run-id", "myrun", "--device", "cuda"]
    assert main(argv) == 2
    assert "device cuda requested but torch sees no CUDA GPU" in capsys.readouterr().err
    assert _runs(store) == []


def test_googlenet_trains_on_its_main_output(tmp_path: Path) -> None:
    """Found with the review: GoogLeNet's training output (with auxiliary heads) reached the
    loss as a tuple and the run failed."""
    from cluster.train import TrainConfig, train

    cfg = TrainConfig(arch="googlenet", epochs=1, image_size=32, train_size=4, batch_size=2)
    assert train(cfg).epochs == 1


# -------------------------------------------------------------- 6. report without epoch marks


def test_report_on_a_finished_run_without_marks_gives_its_measured_total(tmp_path: Path) -> None:
    """Found in review: an imported nvidia-smi log (finished, no epochs) was refused by report,
    while estimate gave its measured total. It now gets a report with that total."""
    run = _store_without_marks(tmp_path / "s", "finished", duration_s=199.0)
    out = tmp_path / "r.html"
    assert main(["report", *run, "--out", str(out)]) == 0
    assert "Measured total: <b>19.9 kJ</b>" in out.read_text()
    out.unlink()
    assert main(["report", *run, "--out", str(out), "--planned-epochs", "10"]) == 0
    assert out.exists()
