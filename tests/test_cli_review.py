"""CLI answers found in review: stores that cannot be read or are files, bad numbers, flags.

Each test names the command line the reviewer ran and what it did before the fix.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path

import polars as pl
import pytest

from cluster.cli import build_parser, main
from profiler.errors import BadInputError
from profiler.journal import Journal
from profiler.store import Store

REPO = Path(__file__).resolve().parents[1]
T0 = datetime(2024, 1, 1, tzinfo=UTC)
#: The permission checks that make a ``chmod 000`` directory unreadable to root too.
NO_OVERRIDE = [
    "setpriv",
    "--inh-caps=-dac_override,-dac_read_search",
    "--bounding-set=-dac_override,-dac_read_search",
    "--",
]


def _store_with_a_run(root: Path) -> Store:
    store = Store(root)
    n = 20
    store.write_samples(
        pl.DataFrame(
            {
                "run_id": "r1",
                "node": "n1",
                "device": "0",
                "timestamp": [T0 + timedelta(seconds=i) for i in range(n)],
                "power_w": [100.0 + i % 7 for i in range(n)],
                "source": "replay",
            }
        )
    )
    store.write_runs(pl.DataFrame({"run_id": ["r1"], "status": ["finished"]}))
    return store


def _cli_unprivileged(*argv: str) -> subprocess.CompletedProcess[str]:
    """``wattwise ARGV`` in a new process that file permissions apply to (root loses overrides)."""
    cmd = [sys.executable, "-m", "cluster.cli", *argv]
    if os.geteuid() == 0:
        if shutil.which("setpriv") is None:
            pytest.skip("running as root without setpriv: chmod 000 cannot be tested")
        probe = subprocess.run([*NO_OVERRIDE, "true"], capture_output=True, check=False)
        if probe.returncode != 0:
            pytest.skip(f"setpriv cannot drop capabilities here: {probe.stderr.decode()}")
        cmd = [*NO_OVERRIDE, *cmd]
    return subprocess.run(
        cmd, capture_output=True, text=True, cwd=REPO, timeout=120, check=False, env=os.environ
    )


@pytest.mark.parametrize(
    "argv",
    [
        ["runs"],
        ["energy", "--run", "r1"],
        ["metrics", "--once"],
    ],
    ids=["runs", "energy", "metrics"],
)
def test_an_unreadable_store_is_one_line_not_a_traceback(tmp_path: Path, argv: list[str]) -> None:
    """Review: ``wattwise runs --store lockedstore`` (a ``chmod 000`` store) ended with a
    PermissionError traceback on 'lockedstore/runs.parquet'; so did ``energy --run`` and
    ``metrics --once``."""
    store = _store_with_a_run(tmp_path / "locked")
    store.root.chmod(0)
    try:
        done = _cli_unprivileged(*argv, "--store", str(store.root))
    finally:
        store.root.chmod(0o755)
    assert "Traceback" not in done.stderr, done.stderr
    assert done.returncode == 2, done.stderr
    assert str(store.root) in done.stderr and "ermission denied" in done.stderr


def test_an_unreadable_run_directory_is_a_store_error_naming_it(tmp_path: Path) -> None:
    """Review: ``wattwise import nvidia-smi small.csv --run r9 --store lockedstore`` ended
    with a PermissionError traceback on 'lockedstore/samples/r9'. The store itself is
    readable here; one of its run directories is not."""
    store = _store_with_a_run(tmp_path / "s")
    run_dir = store.root / "samples" / "r1"
    code = (
        "import sys\nfrom profiler.errors import StoreError\nfrom profiler.store import Store\n"
        "try:\n    Store(sys.argv[1]).samples('r1')\n"
        "except StoreError as err:\n    print(err)\n    sys.exit(3)\n"
    )
    run_dir.chmod(0)
    try:
        if os.geteuid() == 0:
            if shutil.which("setpriv") is None:
                pytest.skip("running as root without setpriv: chmod 000 cannot be tested")
            cmd = [*NO_OVERRIDE, sys.executable, "-c", code, str(store.root)]
        else:
            cmd = [sys.executable, "-c", code, str(store.root)]
        done = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=120)
    finally:
        run_dir.chmod(0o755)
    if "cannot drop" in done.stderr or "Operation not permitted" in done.stderr:
        pytest.skip(f"setpriv cannot drop capabilities here: {done.stderr}")
    assert done.returncode == 3, done.stderr
    assert str(run_dir) in done.stdout and "ermission denied" in done.stdout


def test_a_store_that_is_a_file_is_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Review: ``wattwise runs --store S.parquet`` said "0 runs in S.parquet", exit 0."""
    path = tmp_path / "S.parquet"
    pl.DataFrame({"x": [1]}).write_parquet(path)
    assert main(["runs", "--store", str(path)]) == 2
    err = capsys.readouterr().err
    assert str(path) in err and "expected a store directory" in err and "a file" in err
    with pytest.raises(BadInputError, match="expected a store directory"):
        Store(path)
    assert Store(tmp_path / "new").root == tmp_path / "new"  # one that does not exist yet: fine


#: A sample that ends by itself where a bad option is accepted (the test then fails, not hangs).
SAMPLE = ["sample", "--source", "modelled", "--duration", "0.3"]


@pytest.mark.parametrize(
    ("argv", "option"),
    [
        ([*SAMPLE, "--batch-interval", "-1"], "--batch-interval"),
        ([*SAMPLE, "--batch-interval", "nan"], "--batch-interval"),
        ([*SAMPLE, "--batch-interval", "0"], "--batch-interval"),
        (["metrics", "--once", "--refresh", "nan"], "--refresh"),
        (["metrics", "--once", "--refresh", "inf"], "--refresh"),
    ],
    ids=[
        "batch-interval=-1",
        "batch-interval=nan",
        "batch-interval=0",
        "refresh=nan",
        "refresh=inf",
    ],
)
def test_non_finite_or_non_positive_seconds_are_refused(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    argv: list[str],
    option: str,
) -> None:
    """Review: ``sample --batch-interval -1`` and ``nan`` and ``metrics --refresh nan`` were
    accepted."""
    monkeypatch.setenv("WATTWISE_JOURNAL", str(tmp_path / "journal"))
    assert main([*argv, "--store", str(tmp_path / "store")]) == 2
    assert f"{option} must be" in capsys.readouterr().err
    assert not (tmp_path / "store").exists()


@pytest.mark.parametrize("duration", ["nan", "inf", "-1"])
def test_sample_refuses_a_duration_that_never_ends(tmp_path: Path, duration: str) -> None:
    """Review: ``wattwise sample --duration nan`` never stopped. In a new process, so that
    the test fails (not hangs) where it is accepted."""
    env = {**os.environ, "WATTWISE_JOURNAL": str(tmp_path / "journal")}
    argv = ["sample", "--source", "modelled", "--duration", duration, "--store", str(tmp_path)]
    try:
        done = subprocess.run(
            [sys.executable, "-m", "cluster.cli", *argv],
            capture_output=True,
            text=True,
            cwd=REPO,
            timeout=30,
            env=env,
        )
    except subprocess.TimeoutExpired:
        pytest.fail(f"sample --duration {duration} was accepted and did not stop")
    assert done.returncode == 2, done.stderr
    assert "--duration must be a finite number of seconds > 0" in done.stderr


def _csv(path: Path, stamps: list[str]) -> Path:
    lines = ["timestamp, index, name, power.draw [W]"]
    lines += [f"{s}, 0, NVIDIA A100-SXM4-40GB, {100 + i}.00 W" for i, s in enumerate(stamps)]
    path.write_text("\n".join(lines) + "\n")
    return path


def test_exporter_refuses_an_unknown_time_zone(tmp_path: Path) -> None:
    """Review: ``wattwise exporter --replay huge2.csv --port 0 --tz Mars/X`` started serving:
    --tz was never passed on. In a new process: before the fix it served until killed."""
    csv = _csv(tmp_path / "t.csv", ["2024/01/01 00:00:00.000", "2024/01/01 00:00:01.000"])
    try:
        done = subprocess.run(
            [sys.executable, "-m", "cluster.cli", "exporter", "--replay", str(csv)]
            + ["--port", "0", "--tz", "Mars/X"],
            capture_output=True,
            text=True,
            cwd=REPO,
            timeout=30,
        )
    except subprocess.TimeoutExpired:
        pytest.fail("exporter --tz Mars/X started serving instead of refusing the time zone")
    assert done.returncode == 2, done.stderr
    assert "unknown time zone 'Mars/X'" in done.stderr


def test_exporter_reads_naive_timestamps_in_its_time_zone(tmp_path: Path) -> None:
    """--tz is used: a trace written in Madrid across the spring DST change lasts 2 s, not 1 h."""
    from cluster.commands.profiler_cmds import build_exporter

    csv = _csv(
        tmp_path / "dst.csv",
        ["2024/03/31 01:59:59.000", "2024/03/31 03:00:00.000", "2024/03/31 03:00:01.000"],
    )
    parser = build_parser()
    for tz, seconds in (("Europe/Madrid", 2.0), ("UTC", 3602.0)):
        args = parser.parse_args(["exporter", "--replay", str(csv), "--port", "0", "--tz", tz])
        exp = build_exporter(args)
        try:
            assert exp.source.duration_s == pytest.approx(seconds)
        finally:
            exp.stop()


def test_metrics_ray_takes_an_optional_address() -> None:
    """Review: the README says ``wattwise metrics --ray``, but --ray needed an ADDRESS
    ("expected one argument")."""
    parser = build_parser()
    assert parser.parse_args(["metrics", "--ray"]).ray == "auto"
    assert parser.parse_args(["metrics", "--ray", "--once"]).ray == "auto"
    assert parser.parse_args(["metrics", "--ray", "10.0.0.1:6379"]).ray == "10.0.0.1:6379"
    assert parser.parse_args(["metrics"]).ray is None


def test_sample_does_not_replay_another_stores_spilled_batches(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Review: ``sample --run jA --node n1 --store ro_store`` spilled 7 samples to the default
    journal (the store could not be written); ``sample --run jB --node n1 --store sB`` then
    wrote them into sB (``Store('sB').samples('jA').height == 7``)."""
    monkeypatch.setenv("WATTWISE_JOURNAL", str(tmp_path / "journal"))
    store_a, store_b = tmp_path / "A", tmp_path / "B"
    (store_a / ".lock").mkdir(parents=True)  # the lock file cannot be opened: no write works
    fast = ["--source", "modelled", "--interval", "0.1", "--batch-interval", "0.2"]
    fast += ["--duration", "0.6", "--node", "n1", "--json"]
    assert main(["sample", *fast, "--run", "jA", "--store", str(store_a)]) == 0
    spilled = Journal(tmp_path / "journal" / "n1").rows
    assert spilled > 0
    assert main(["sample", *fast, "--run", "jB", "--store", str(store_b)]) == 0
    assert Store(store_b).samples("jA").height == 0
    assert Store(store_b).samples("jB").height > 0
    assert Journal(tmp_path / "journal" / "n1").rows == spilled  # left for store A
    # Once store A can be written, a sidecar writing to it delivers them there.
    (store_a / ".lock").rmdir()
    capsys.readouterr()
    assert main(["sample", *fast, "--run", "jA", "--store", str(store_a)]) == 0
    assert Store(store_a).samples("jA").height >= spilled
    assert Journal(tmp_path / "journal" / "n1").rows == 0
