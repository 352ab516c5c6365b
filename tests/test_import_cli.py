"""``wattwise import nvidia-smi | dcgm | seaa2023`` end to end (in process and as a script)."""

from __future__ import annotations

import shutil
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

import polars as pl
import pytest

from cluster.cli import main
from cluster.commands.import_cmds import default_run_id
from profiler.store import Store

DATA = Path(__file__).resolve().parent / "data"
SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "seaa2023"
needs_shared = pytest.mark.skipif(
    not (SHARED / "runs.parquet").is_file(), reason=f"shared dataset not found at {SHARED}"
)


def snapshot(root: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()
    }


def test_default_run_id() -> None:
    assert default_run_id("x/nvidia-smi-cloud-vgg16-00.csv") == "cloud-vgg16-00"
    assert default_run_id("trace.csv") == "trace"
    assert default_run_id("dcgm-run-7.txt", prefix="") == "dcgm-run-7"


def test_import_nvidia_smi_writes_samples_and_run(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    csv = tmp_path / "nvidia-smi-cloud-demo-00.csv"
    shutil.copy(DATA / "nvidia-smi-renamed.csv", csv)
    store_dir = tmp_path / "store"
    assert (
        main(["import", "nvidia-smi", str(csv), "--node", "cloud", "--store", str(store_dir)]) == 0
    )
    out = capsys.readouterr().out
    assert "cloud-demo-00" in out and "3/3" in out and "0.4" in out  # 400 J = 0.4 kJ
    store = Store(store_dir)
    run = store.run("cloud-demo-00")
    # 100, 200, 300 W one second apart: 150 J + 250 J
    assert run["energy_j"] == pytest.approx(400.0)
    assert (run["status"], run["energy_source"], run["gpu_model"], run["gpu_count"]) == (
        "finished",
        "measured",
        "NVIDIA GeForce RTX 3090",
        1,
    )
    assert run["duration_s"] == pytest.approx(2.0)
    assert run["start"] == datetime(2022, 12, 5, 9, 55, 42, 535000, tzinfo=UTC)
    samples = store.samples("cloud-demo-00")
    assert samples["power_w"].to_list() == [100.0, 200.0, 300.0]
    assert set(samples["node"]) == {"cloud"}

    before = snapshot(store_dir)
    assert (
        main(["import", "nvidia-smi", str(csv), "--node", "cloud", "--store", str(store_dir)]) == 0
    )
    assert "0/3" in capsys.readouterr().out
    assert snapshot(store_dir) == before  # idempotent: nothing rewritten


def test_import_nvidia_smi_several_files_into_one_run(tmp_path: Path) -> None:
    store_dir = tmp_path / "store"
    files = [str(DATA / "nvidia-smi-renamed.csv"), str(DATA / "nvidia-smi-two-gpus.csv")]
    assert main(["import", "nvidia-smi", *files, "--run", "multi", "--store", str(store_dir)]) == 0
    run = Store(store_dir).run("multi")
    # 400 J from the first file; GPU a: 105 + 115 J, GPU b (0.004 s later): 210 + 230 J
    assert run["energy_j"] == pytest.approx(400.0 + 220.0 + 440.0)
    assert run["gpu_count"] == 3  # node "renamed" device 0, node "two-gpus" devices a and b


def test_import_nvidia_smi_tz(tmp_path: Path) -> None:
    store_dir = tmp_path / "store"
    args = ["import", "nvidia-smi", str(DATA / "nvidia-smi-renamed.csv"), "--tz", "Europe/Madrid"]
    assert main([*args, "--store", str(store_dir)]) == 0
    run = Store(store_dir).run("renamed")  # default run id: stem less "nvidia-smi-"
    assert run["start"] == datetime(2022, 12, 5, 8, 55, 42, 535000, tzinfo=UTC)


NATIVE = (DATA / "nvidia-smi-native.csv").read_text().splitlines()


def _bad(kind: str) -> tuple[str, str, str]:
    """(file name, content, expected stderr fragment) of a bad input."""
    if kind == "negative power":
        return (
            "neg.csv",
            "\n".join([NATIVE[0], NATIVE[1].replace(" 8.14 W", " -8.14 W")]) + "\n",
            ("neg.csv, row 1, column 'power.draw [W]': expected a power >= 0 W; found -8.14 W"),
        )
    if kind == "non-numeric power":
        return (
            "nan.csv",
            "\n".join([NATIVE[0], NATIVE[1].replace(" 8.14 W", " lots")]) + "\n",
            ("expected a power in W such as '47.60 W' (or [N/A]); found 'lots'"),
        )
    if kind == "unsorted":
        return (
            "uns.csv",
            "\n".join([NATIVE[0], NATIVE[2], NATIVE[1]]) + "\n",
            ("uns.csv, row 2, 'timestamp': unsorted timestamps"),
        )
    if kind == "duplicated":
        return (
            "dup.csv",
            "\n".join([NATIVE[0], NATIVE[1], NATIVE[1]]) + "\n",
            ("dup.csv, row 2, 'timestamp': duplicated timestamps"),
        )
    if kind == "empty":
        return "empty.csv", "", "empty.csv: empty file"
    if kind == "wrong column":
        return (
            "col.csv",
            "timestamp, name, energy [J]\n2023/03/09 13:27:53.079, X, 5\n",
            ("col.csv, header: expected a 'power.draw' column"),
        )
    raise AssertionError(kind)


@pytest.mark.parametrize(
    "kind",
    ["negative power", "non-numeric power", "unsorted", "duplicated", "empty", "wrong column"],
)
def test_bad_nvidia_smi_exits_2_and_leaves_store(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], kind: str
) -> None:
    store_dir = tmp_path / "store"
    good = str(DATA / "nvidia-smi-native.csv")
    assert main(["import", "nvidia-smi", good, "--run", "r1", "--store", str(store_dir)]) == 0
    before = snapshot(store_dir)
    capsys.readouterr()
    name, text, fragment = _bad(kind)
    bad = tmp_path / name
    bad.write_text(text)
    # the good file first: a bad file anywhere in the list must stop the whole import
    assert (
        main(["import", "nvidia-smi", good, str(bad), "--run", "r2", "--store", str(store_dir)])
        == 2
    )
    err = capsys.readouterr().err.strip()
    assert err.startswith("wattwise import: error: ")
    assert fragment in err
    assert len(err.splitlines()) == 1
    assert snapshot(store_dir) == before


def test_conflicting_reimport_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    store_dir = tmp_path / "store"
    csv = tmp_path / "t.csv"
    csv.write_text("timestamp, power.draw [W]\n2023/03/09 13:27:53.079, 5 W\n")
    assert main(["import", "nvidia-smi", str(csv), "--store", str(store_dir)]) == 0
    before = snapshot(store_dir)
    csv.write_text("timestamp, power.draw [W]\n2023/03/09 13:27:53.079, 6 W\n")
    assert main(["import", "nvidia-smi", str(csv), "--store", str(store_dir)]) == 2
    assert "already in the store" in capsys.readouterr().err
    assert snapshot(store_dir) == before


def test_a_conflict_in_a_later_file_writes_none_of_the_files(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Regression: files were written run by run, so a conflict in the second file's run
    left the first file's samples stored."""
    store_dir = tmp_path / "store"
    first, second = tmp_path / "a.csv", tmp_path / "b.csv"
    second.write_text("timestamp, power.draw [W]\n2023/03/09 13:27:53.079, 5 W\n")
    assert main(["import", "nvidia-smi", str(second), "--store", str(store_dir)]) == 0
    before = snapshot(store_dir)
    first.write_text("timestamp, power.draw [W]\n2023/03/09 13:27:53.079, 7 W\n")
    second.write_text("timestamp, power.draw [W]\n2023/03/09 13:27:53.079, 6 W\n")
    args = ["import", "nvidia-smi", str(first), str(second), "--store", str(store_dir)]
    assert main(args) == 2
    assert "already in the store" in capsys.readouterr().err
    assert snapshot(store_dir) == before


def test_import_dcgm_series(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    store_dir = tmp_path / "store"
    assert main(["import", "dcgm", str(DATA / "dcgm-scrapes.txt"), "--store", str(store_dir)]) == 0
    assert "dcgm-scrapes" in capsys.readouterr().out
    run = Store(store_dir).run("dcgm-scrapes")
    assert run["energy_j"] == pytest.approx(650.0)  # counter deltas 100 + 150 + 200 + 200 J
    assert (run["gpu_count"], run["gpu_model"], run["duration_s"]) == (
        2,
        "NVIDIA H100 80GB HBM3",
        pytest.approx(2.0),
    )
    samples = Store(store_dir).samples("dcgm-scrapes")
    assert set(samples["source"]) == {"dcgm"} and samples.height == 6


def test_import_dcgm_single_scrape(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    scrape = tmp_path / "scrape.txt"
    scrape.write_text('DCGM_FI_DEV_POWER_USAGE{gpu="0",UUID="GPU-a",Hostname="h"} 70.5\n')
    store_dir = tmp_path / "store"
    args = [
        "import",
        "dcgm",
        str(scrape),
        "--run",
        "one",
        "--node",
        "n1",
        "--store",
        str(store_dir),
    ]
    assert main([*args, "--timestamp", "2024-05-01T12:00:00Z"]) == 0
    s = Store(store_dir).samples("one").row(0, named=True)
    assert (s["node"], s["device"], s["power_w"]) == ("n1", "GPU-a", 70.5)
    assert s["timestamp"] == datetime(2024, 5, 1, 12, tzinfo=UTC)
    capsys.readouterr()
    assert main([*args, "--timestamp", "noon"]) == 2
    assert "--timestamp: expected an ISO 8601 time" in capsys.readouterr().err


def test_bad_dcgm_exits_2_and_leaves_store(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    store_dir = tmp_path / "store"
    assert main(["import", "dcgm", str(DATA / "dcgm-scrapes.txt"), "--store", str(store_dir)]) == 0
    before = snapshot(store_dir)
    capsys.readouterr()
    text = (DATA / "dcgm-scrapes.txt").read_text().replace("} 128.800000", "} -128.8")
    bad = tmp_path / "dcgm-scrapes.txt"
    bad.write_text(text)
    assert main(["import", "dcgm", str(bad), "--store", str(store_dir)]) == 2
    err = capsys.readouterr().err
    assert 'dcgm-scrapes.txt, line 32 DCGM_FI_DEV_POWER_USAGE{gpu="0"' in err
    assert "expected a value >= 0; found -128.8" in err
    assert snapshot(store_dir) == before


def test_import_seaa2023_missing_folder(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)  # no ../shared/data/seaa2023 from here
    assert main(["import", "seaa2023", "--store", str(tmp_path / "s")]) == 2
    err = capsys.readouterr().err
    assert "seaa2023: expected the SEAA 2023 dataset folder" in err and "give FOLDER" in err
    assert not (tmp_path / "s").exists()


def test_console_script_exit_status(tmp_path: Path) -> None:
    """The installed ``wattwise`` prints one line and exits 2 on bad input."""
    bad = tmp_path / "bad.csv"
    bad.write_text("")
    exe = Path(sys.executable).parent / "wattwise"
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "cluster.cli"]
    proc = subprocess.run(
        [*cmd, "import", "nvidia-smi", str(bad), "--store", str(tmp_path / "s")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        f"wattwise import: error: {bad}: empty file; "
        "expected a header line such as 'timestamp, name, "
        "power.draw [W]' followed by one row per sample"
    ]


@pytest.fixture(scope="module")
def seaa_store(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, float]:
    store_dir = tmp_path_factory.mktemp("seaa") / "store"
    t0 = time.perf_counter()
    rc = main(["import", "seaa2023", str(SHARED), "--store", str(store_dir)])
    assert rc == 0
    return store_dir, time.perf_counter() - t0


@needs_shared
@pytest.mark.shared_data
def test_import_seaa2023_whole_dataset(seaa_store: tuple[Path, float]) -> None:
    store_dir, elapsed = seaa_store
    print(f"wattwise import seaa2023: {elapsed:.1f} s")
    store = Store(store_dir)
    runs = store.runs()
    assert runs.height == 249
    assert store.samples().height == 600_070
    assert runs.filter(pl.col("energy_source") == "measured").height == 189
    assert sorted(runs["node_type"].unique()) == [
        "cloud",
        "local-ml-engineer-gamer",
        "local-normal-user",
    ]
    reported = pl.read_parquet(SHARED / "runs.parquet").select("run_id", "gpu_energy_j")
    rel = (
        runs.join(reported, on="run_id")
        .filter(pl.col("energy_source") == "measured")
        .select((pl.col("energy_j") / pl.col("gpu_energy_j") - 1).abs().max())
        .item()
    )
    assert rel < 0.01  # every traced run within 1 % of the authors' figure (max ~0.99 %)
    assert elapsed < 30


@needs_shared
@pytest.mark.shared_data
def test_import_seaa2023_again_changes_nothing(
    seaa_store: tuple[Path, float], capsys: pytest.CaptureFixture[str]
) -> None:
    store_dir, _ = seaa_store
    before = snapshot(store_dir)
    assert main(["import", "seaa2023", str(SHARED), "--store", str(store_dir)]) == 0
    out = capsys.readouterr().out
    assert "0 new samples of 600,070, 0 runs added or changed" in out
    assert snapshot(store_dir) == before
