"""The CLI's behaviour when its reader goes away (``wattwise runs --json | head``)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import polars as pl

from profiler.store import Store


def test_a_closed_pipe_ends_the_command_without_a_traceback(tmp_path: Path) -> None:
    """Found in review: ``wattwise runs --json | head`` ended with a BrokenPipeError
    traceback."""
    store = Store(tmp_path / "store")
    store.write_runs(
        pl.DataFrame({"run_id": [f"run-{i:04d}" for i in range(2000)], "status": "finished"})
    )
    code = "import sys; from cluster.cli import main; sys.exit(main(sys.argv[1:]))"
    proc = subprocess.Popen(
        [sys.executable, "-c", code, "runs", "--json", "--store", str(store.root)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        cwd=Path(__file__).resolve().parents[1],
    )
    assert proc.stdout is not None and proc.stderr is not None
    assert proc.stdout.read(100)  # read a little, then go away like `head`
    proc.stdout.close()
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=60) == 1
    assert "Traceback" not in err and "BrokenPipeError" not in err, err
