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


# ---------------------------------------------------------------------------------------------
# which node and run a file goes to

SMI_HEADER = "timestamp, index, power.draw [W]"


def smi_file(path: Path, rows: list[tuple[str, float]], *, end: str = "\n") -> Path:
    """An nvidia-smi CSV of GPU 0: (time of day on 2024-01-10, power in W) per row."""
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = [SMI_HEADER, *(f"2024/01/10 {t}, 0, {p:.2f} W" for t, p in rows)]
    path.write_text("\n".join(lines) + end)
    return path


def two_hosts(tmp_path: Path) -> tuple[Path, Path]:
    """n1/nvidia-smi.csv and n2/nvidia-smi.csv: two hosts' GPU 0 over the same 2.5 s."""
    n1 = smi_file(
        tmp_path / "n1" / "nvidia-smi.csv",
        [("08:00:00.000", 100.0), ("08:00:01.000", 200.0), ("08:00:02.000", 300.0)],
    )
    n2 = smi_file(
        tmp_path / "n2" / "nvidia-smi.csv",
        [("08:00:00.500", 50.0), ("08:00:01.500", 50.0), ("08:00:02.500", 50.0)],
    )
    return n1, n2


def test_same_file_names_from_two_hosts_are_not_merged(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Regression: n1/nvidia-smi.csv and n2/nvidia-smi.csv both became node 'nvidia-smi',
    device 0: the two GPUs' samples were interleaved into one stream, energy about halved."""
    n1, n2 = two_hosts(tmp_path)
    store_dir = tmp_path / "store"
    base = ["import", "nvidia-smi", "--run", "job", "--store", str(store_dir)]
    assert main([*base, str(n1), str(n2)]) == 2
    err = capsys.readouterr().err
    assert f"{n1} and {n2} both get node 'nvidia-smi' from their file name" in err
    assert "import each host's file with its own --node NODE" in err
    assert not store_dir.exists()

    # one --node for both: the files overlap in time, so they are not one GPU's log
    assert main([*base, str(n1), str(n2), "--node", "x"]) == 2
    err = capsys.readouterr().err
    assert (
        f"{n2}, row 1: its sample at 2024-01-10 08:00:00.500000+00:00 lies in the time span of "
        f"{n1} (rows 1-3, 2024-01-10 08:00:00+00:00 to 2024-01-10 08:00:02+00:00) for run "
        "'job', node 'x', device '0'"
    ) in err
    assert not store_dir.exists()

    # each host with its own node: two GPUs, energies add up (400 J + 2 s x 50 W)
    assert main([*base, str(n1), "--node", "n1"]) == 0
    assert main([*base, str(n2), "--node", "n2"]) == 0
    run = Store(store_dir).run("job")
    assert (run["gpu_count"], run["energy_j"]) == (2, pytest.approx(500.0))

    # the run now has two nodes: a file whose name gives neither must say where it goes
    before = snapshot(store_dir)
    capsys.readouterr()
    assert main([*base, str(n2)]) == 2
    err = capsys.readouterr().err
    assert (
        "run 'job' is stored with samples of nodes 'n1', 'n2', and the file name gives node "
        "'nvidia-smi', none of them; pass --node NODE"
    ) in err
    assert snapshot(store_dir) == before


def test_a_second_gpu_into_a_stored_stream_is_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Another GPU's trace must not be interleaved with a stored stream, import by import."""
    n1, n2 = two_hosts(tmp_path)
    store_dir = tmp_path / "store"
    base = ["import", "nvidia-smi", "--run", "job", "--node", "x", "--store", str(store_dir)]
    assert main([*base, str(n1)]) == 0
    before = snapshot(store_dir)
    capsys.readouterr()
    assert main([*base, str(n2)]) == 2
    err = capsys.readouterr().err
    assert (
        f"{n2}, row 2: run 'job', node 'x', device '0' has a sample at 2024-01-10 "
        "08:00:01+00:00 in the store that this file does not hold (between its rows 1 and 2)"
    ) in err
    assert snapshot(store_dir) == before


def test_files_of_one_gpu_may_follow_one_another_in_any_order(tmp_path: Path) -> None:
    """A log split in two (rotated) is one stream: its parts, given in any order, join up."""
    second = smi_file(tmp_path / "b.csv", [("08:00:03.000", 300.0), ("08:00:04.000", 300.0)])
    first = smi_file(
        tmp_path / "a.csv",
        [("08:00:00.000", 100.0), ("08:00:01.000", 200.0), ("08:00:02.000", 300.0)],
    )
    store_dir = tmp_path / "store"
    args = ["import", "nvidia-smi", str(second), str(first), "--run", "r", "--node", "x"]
    assert main([*args, "--store", str(store_dir)]) == 0
    run = Store(store_dir).run("r")
    # 150 + 250 + 300 + 300 J over 0-4 s
    assert (run["gpu_count"], run["energy_j"]) == (1, pytest.approx(1000.0))


def test_reimport_of_a_log_that_was_still_being_written(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Regression: the cut-off last line was stored with power_w=None, and importing the
    finished file later was refused ('already in the store ... power_w=None')."""
    full = [("08:00:00.000", 100.0), ("08:00:01.000", 200.0), ("08:00:02.000", 300.0)]
    csv = smi_file(tmp_path / "grow.csv", full[:2])
    with csv.open("a") as fh:
        fh.write("2024/01/10 08:00:02.000, 0, 30")  # nvidia-smi was writing "300.00 W"
    store_dir = tmp_path / "store"
    args = ["import", "nvidia-smi", str(csv), "--run", "g", "--store", str(store_dir)]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "2 new samples, 1 runs added or changed" in out
    assert "1 cut-off last line left out" in out
    assert (
        f"{csv}, row 3: left out the last line, which has no newline at its end (nvidia-smi "
        "was still writing it): '2024/01/10 08:00:02.000, 0, 30'; import the file again once "
        "it is finished"
    ) in out
    assert Store(store_dir).samples("g")["power_w"].to_list() == [100.0, 200.0]

    smi_file(csv, [*full, ("08:00:03.000", 300.0)])  # finished
    assert main(args) == 0
    assert "2 new samples" in capsys.readouterr().out
    store = Store(store_dir)
    assert store.samples("g")["power_w"].to_list() == [100.0, 200.0, 300.0, 300.0]
    assert store.run("g")["energy_j"] == pytest.approx(150.0 + 250.0 + 300.0)


def test_stored_run_keeps_its_only_node(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Regression: a run stored under node 'cloud' got the same trace again under node
    'cloud-demo-00' (the file name) on a re-import without --node: 2 GPUs, energy doubled."""
    csv = tmp_path / "nvidia-smi-cloud-demo-00.csv"
    shutil.copy(DATA / "nvidia-smi-renamed.csv", csv)
    store_dir = tmp_path / "store"
    first = ["import", "nvidia-smi", str(csv), "--node", "cloud", "--store", str(store_dir)]
    assert main(first) == 0
    assert main(["import", "nvidia-smi", str(csv), "--store", str(store_dir)]) == 0
    out = capsys.readouterr().out
    assert "0/3" in out
    assert (
        f"{csv}: stored under node 'cloud', the only node of run 'cloud-demo-00' in the store; "
        "pass --node to store it under another node"
    ) in out
    run = Store(store_dir).run("cloud-demo-00")
    assert (run["gpu_count"], run["energy_j"]) == (1, pytest.approx(400.0))


def test_several_files_into_one_run_again_changes_nothing(tmp_path: Path) -> None:
    """The run has two nodes then; each file's name still gives its own, so no --node needed."""
    store_dir = tmp_path / "store"
    files = [str(DATA / "nvidia-smi-renamed.csv"), str(DATA / "nvidia-smi-two-gpus.csv")]
    args = ["import", "nvidia-smi", *files, "--run", "multi", "--store", str(store_dir)]
    assert main(args) == 0
    before = snapshot(store_dir)
    assert main(args) == 0
    assert snapshot(store_dir) == before


def test_run_and_node_options_rescue_an_unusable_file_name(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Regression: the file name's run id was checked even with --run and --node given."""
    csv = tmp_path / "gpu trace (node 1).csv"
    shutil.copy(DATA / "nvidia-smi-native.csv", csv)
    store_dir = tmp_path / "store"
    base = ["import", "nvidia-smi", str(csv), "--store", str(store_dir)]
    assert main([*base, "--run", "myrun"]) == 2
    assert (
        f"{csv}: the file name gives no usable node name: expected letters, digits, '.', '_' "
        "and '-' as in a run id; found 'gpu trace (node 1)'; pass --node NODE"
    ) in capsys.readouterr().err
    assert main([*base, "--node", "n1"]) == 2
    assert f"{csv}: the file name gives no usable run id" in capsys.readouterr().err
    assert not store_dir.exists()
    assert main([*base, "--run", "myrun", "--node", "n1"]) == 0
    assert set(Store(store_dir).samples("myrun")["node"]) == {"n1"}


@needs_shared
@pytest.mark.shared_data
def test_readme_csv_import_after_the_dataset_adds_nothing(
    seaa_store: tuple[Path, float], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Regression: after ``make demo`` (the dataset imported, cloud-vgg16-00 under node
    'cloud'), importing its raw CSV as the README says doubled its energy."""
    store_dir = tmp_path / "store"
    shutil.copytree(seaa_store[0], store_dir)
    before = Store(store_dir).run("cloud-vgg16-00")
    csv = SHARED / "nvidia-smi-cloud-vgg16-00.csv"
    assert main(["import", "nvidia-smi", str(csv), "--store", str(store_dir)]) == 0
    out = capsys.readouterr().out
    assert "0 new samples" in out and "1 cut-off last line left out" in out
    after = Store(store_dir).run("cloud-vgg16-00")
    assert (after["gpu_count"], after["energy_j"]) == (1, before["energy_j"])
    assert after["energy_j"] == pytest.approx(1.2297e6, rel=1e-4)


def test_reimport_with_a_value_for_an_na_cell_fills_it(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Regression: a sample stored with power_w=None (an ``[N/A]`` cell) refused the corrected
    file ('already in the store ... power_w=None'), exit 2, so its value could never be
    stored."""
    rows = [("08:00:00.000", 100.0), ("08:00:01.000", 500.0), ("08:00:02.000", 300.0)]
    csv = smi_file(tmp_path / "na.csv", rows)
    csv.write_text(csv.read_text().replace("500.00 W", "[N/A]"))
    store_dir = tmp_path / "store"
    args = ["import", "nvidia-smi", str(csv), "--run", "na", "--node", "n1"]
    assert main([*args, "--store", str(store_dir)]) == 0
    assert Store(store_dir).samples("na")["power_w"].to_list() == [100.0, None, 300.0]
    # Integrated across the gap: 100 W to 300 W over 2 s.
    assert Store(store_dir).run("na")["energy_j"] == pytest.approx(400.0)

    smi_file(csv, rows)  # corrected: the cell holds its value
    caplog.clear()
    with caplog.at_level("WARNING", logger="profiler.store"):
        assert main([*args, "--store", str(store_dir)]) == 0
    assert "1 samples filled" in caplog.text and "run 'na': 1" in caplog.text
    store = Store(store_dir)
    assert store.samples("na")["power_w"].to_list() == [100.0, 500.0, 300.0]
    assert store.run("na")["energy_j"] == pytest.approx(300.0 + 400.0)  # with the 500 W sample
    caplog.clear()
    with caplog.at_level("WARNING", logger="profiler.store"):
        assert main([*args, "--store", str(store_dir)]) == 0  # again: nothing to fill
    assert "filled" not in caplog.text
