"""The bench scripts' options: bad sizes refused with exit status 2, and the aggregator's epochs.

Every script runs as a subprocess, as a user types it. A refused option must
stop the script before any work (the timeout would catch a long run); the
small valid sizes given beside it keep a script that wrongly starts its work
short.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench"


def bench(script: str, *args: str, timeout: float = 60.0) -> subprocess.CompletedProcess[str]:
    """Run ``bench/<script>`` with ``args``; its exit status, stdout and stderr."""
    return subprocess.run(
        [sys.executable, str(BENCH / script), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


AGG_SMALL = ("--runs", "2", "--seconds", "4", "--node-batch-seconds", "0")
ENERGY_SMALL = ("--samples", "400", "--epochs", "4", "--repeat", "1")
SIDECAR_SMALL = ("--devices", "1", "--seconds", "0.2", "--rounds", "1", "--steps", "1")

BAD = [
    ("aggregator.py", ("--runs", "0"), "argument --runs: expected a whole number >= 1, got '0'"),
    ("aggregator.py", ("--runs-per-batch", "0"), "argument --runs-per-batch: expected a whole"),
    ("aggregator.py", ("--seconds", "0"), "argument --seconds: expected a whole number >= 1"),
    ("aggregator.py", ("--batch-seconds", "0"), "argument --batch-seconds: expected a whole"),
    ("aggregator.py", ("--epoch-s", "0"), "argument --epoch-s: expected a whole number >= 1"),
    (
        "aggregator.py",
        ("--node-batch-seconds", "-1"),
        "argument --node-batch-seconds: expected a whole number >= 0, got '-1'",
    ),
    (
        "aggregator.py",
        ("--epoch-s", "5"),
        r"--epoch-s \(5 s\) must be shorter than --seconds \(4 s\): no epoch would end",
    ),
    ("energy.py", ("--devices", "0"), "argument --devices: expected a whole number >= 1, got '0'"),
    ("energy.py", ("--repeat", "0"), "argument --repeat: expected a whole number >= 1, got '0'"),
    ("energy.py", ("--samples", "0"), "argument --samples: expected a whole number >= 1, got '0'"),
    ("energy.py", ("--epochs", "0"), "argument --epochs: expected a whole number >= 1, got '0'"),
    ("energy.py", ("--threads", "0"), "argument --threads: expected a whole number >= 1"),
    (
        "energy.py",
        ("--samples", "7", "--devices", "4"),
        r"--samples \(7\) must be at least 2 per device \(--devices 4: at least 8\)",
    ),
    ("sidecar.py", ("--rounds", "0"), "argument --rounds: expected a whole number >= 1, got '0'"),
    ("sidecar.py", ("--steps", "0"), "argument --steps: expected a whole number >= 1, got '0'"),
    ("sidecar.py", ("--devices", "0"), "argument --devices: expected a whole number >= 1"),
    ("sidecar.py", ("--seconds", "0"), "argument --seconds: expected a finite number > 0"),
    ("load.py", ("--sidecars", "0"), "argument --sidecars: expected a whole number >= 1"),
    ("load.py", ("--jobs", "0"), "argument --jobs: expected a whole number >= 1, got '0'"),
    ("load.py", ("--devices", "0"), "argument --devices: expected a whole number >= 1"),
    ("load.py", ("--minutes", "0"), "argument --minutes: expected a finite number > 0"),
    ("load.py", ("--epoch-s", "nan"), "argument --epoch-s: expected a finite number > 0"),
    ("load.py", ("--every", "-1"), "argument --every: expected a finite number > 0"),
    ("load.py", ("--workers", "-1"), "argument --workers: expected a whole number >= 0"),
    (
        "load.py",
        ("--jobs", "15"),
        "--jobs must be a multiple of --sidecars and --devices a multiple of --jobs; "
        "got 15 jobs, 1000 devices, 10 sidecars",
    ),
    (
        "load.py",
        ("--devices", "75"),
        "--jobs must be a multiple of --sidecars and --devices a multiple of --jobs; "
        "got 50 jobs, 75 devices, 10 sidecars",
    ),
]
SMALL = {"aggregator.py": AGG_SMALL, "energy.py": ENERGY_SMALL, "sidecar.py": SIDECAR_SMALL}


@pytest.mark.parametrize(
    ("script", "args", "message"), BAD, ids=[f"{s}{' '.join(a)}" for s, a, _ in BAD]
)
def test_bad_size_exits_2_before_any_work(script: str, args: tuple[str, ...], message: str) -> None:
    """A zero, negative or inconsistent size is an argparse error (status 2), not a traceback."""
    r = bench(script, *SMALL.get(script, ()), *args)
    assert r.returncode == 2, (r.returncode, r.stderr[-2000:])
    assert "Traceback" not in r.stderr
    assert re.search(f"{Path(script).name}: error: {message}", r.stderr), r.stderr
    assert r.stdout == ""  # refused before printing any figure


def figures(out: str) -> list[tuple[int, int, int, int]]:
    """Per case: (batches' rows, runs per batch, epochs finished, epoch-closing batches)."""
    cases = re.findall(
        r"batches of ([\d,]+) rows \(([\d,]+) run\(s\).*?epochs finished: ([\d,]+)"
        r"(?:.*?over ([\d,]+) epoch-closing batches)?.*?real-time factor",
        out,
        flags=re.S,
    )
    return [tuple(int(x.replace(",", "") or 0) for x in c) for c in cases]  # type: ignore[misc]


def test_aggregator_batches_not_dividing_the_epoch_finish_every_epoch() -> None:
    """7 s per-node batches and 4 s batches against 30 s epochs: both epochs of every run finish.

    3 runs over 70 s: epochs end at 30 s and 60 s, inside the 4 s batches [28, 32) and
    [60, 64) and the 7 s batches [28, 35) and [56, 63) (no batch starts at a multiple of
    30 s but 0 and 60, so the marks were delivered for 60 s only, or never). The header
    gives the batches' real size: 3 runs (not --runs-per-batch 5), 3 x 8 GPUs x 40 rows.
    """
    r = bench(
        "aggregator.py",
        *("--runs", "3", "--runs-per-batch", "5", "--seconds", "70"),
        *("--batch-seconds", "4", "--node-batch-seconds", "7", "--epoch-s", "30"),
    )
    assert r.returncode == 0, r.stderr[-2000:]
    assert figures(r.stdout) == [
        # 4 s batches of all 3 runs: 2 epochs x 3 runs, closed by 2 batches.
        (3 * 8 * 4 * 10, 3, 2 * 3, 2),
        # 7 s batches of one run: 2 epochs x 3 runs, each closed by its run's batch.
        (8 * 7 * 10, 1, 2 * 3, 2 * 3),
    ], r.stdout
    assert r.stdout.count("epochs finished: 6 of 6 marked") == 2, r.stdout


def test_aggregator_batch_longer_than_the_epoch_closes_several_epochs() -> None:
    """7 s batches against 3 s epochs over 14 s: four epochs per run, two per batch.

    Runs of uneven groups (--runs 3 --runs-per-batch 2: batches of 2 runs and 1 run) are
    named as such in the header.
    """
    r = bench(
        "aggregator.py",
        *("--runs", "3", "--runs-per-batch", "2", "--seconds", "14"),
        *("--batch-seconds", "7", "--node-batch-seconds", "0", "--epoch-s", "3"),
    )
    assert r.returncode == 0, r.stderr[-2000:]
    assert "batches of 560-1,120 rows (1-2 run(s), 7 s each)" in r.stdout, r.stdout
    # Ends at 3, 6 (batch [0, 7)) and 9, 12 (batch [7, 14)): 4 epochs x 3 runs, closed by
    # each of the 2 groups' batches in both time steps.
    assert "epochs finished: 12 of 12 marked" in r.stdout, r.stdout
    assert "over 4 epoch-closing batches" in r.stdout, r.stdout
