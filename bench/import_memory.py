"""Memory and time of reading a long raw nvidia-smi CSV (``read_nvidia_smi_file``).

A raw CSV is built from a real trace of ../shared/data/seaa2023/ in its exact
format, repeated with shifted timestamps up to ``--rows`` data rows, in a
temporary folder (never in the repository):

* ``native``: ``nvidia-smi-cloud-vgg16-00.csv``: nvidia-smi's own header
  (``timestamp, name, utilization.gpu [%], ...``, a space after each comma),
  ``2023/03/09 13:27:53.079`` timestamps, units in the cells.
* ``renamed``: ``nvidia-smi-cloud-mobilenet_v2-00.csv``: renamed header,
  ``2022-12-05 09:55:42.535`` timestamps, units in the cells.

With ``--gpus N`` (N > 1) an ``index`` column follows the timestamp and every
sample becomes N rows, one per GPU, stamped 4 ms apart as nvidia-smi does.

Each file is read in a fresh child process (so polars' own allocations count),
after a warm-up read of its first 1,000 rows (polars' thread pools and caches
are then in place, and counted in "before"). The child prints its peak resident
memory (``VmHWM`` of /proc/self/status, Linux) before and after the read, the
read's wall time and the rows it returned. Printed per file: size (MB), data
rows, peak RSS of the child (MiB), the part of it the read added, that part as
a multiple of the file size, and the time (s).

Usage::

    .venv/bin/python bench/import_memory.py                     # 1.5 M rows, both layouts
    .venv/bin/python bench/import_memory.py --rows 300000 --gpus 8 --json
    .venv/bin/python bench/import_memory.py --repo /tmp/old     # another tree's reader
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import polars as pl

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "data" / "seaa2023"
LAYOUTS = {
    "native": ("nvidia-smi-cloud-vgg16-00.csv", "%Y/%m/%d %H:%M:%S%.3f", ", "),
    "renamed": ("nvidia-smi-cloud-mobilenet_v2-00.csv", "%Y-%m-%d %H:%M:%S%.3f", ","),
}

CHILD = r"""
import json, sys, time
sys.path.insert(0, sys.argv[1])


def hwm_kib():
    # VmHWM belongs to this process's own address space; ru_maxrss would start from the
    # parent's resident size at fork, inherited through exec.
    with open("/proc/self/status") as f:
        return next(int(ln.split()[1]) for ln in f if ln.startswith("VmHWM:"))


from profiler.importers import nvidia_smi
nvidia_smi.read_nvidia_smi_file(sys.argv[3], node="n", run_id="bench", tz="UTC")  # warm-up
before = hwm_kib()
t0 = time.perf_counter()
read = nvidia_smi.read_nvidia_smi_file(sys.argv[2], node="n", run_id="bench", tz="UTC")
seconds = time.perf_counter() - t0
peak = hwm_kib()
print(json.dumps({"module": nvidia_smi.__file__, "before_kib": before, "peak_kib": peak,
                  "seconds": seconds, "rows_out": read.samples.height,
                  "out_mib": read.samples.estimated_size() / 2**20}))
"""


def make_csv(layout: str, rows: int, gpus: int, folder: Path) -> Path:
    """Write a raw nvidia-smi CSV of ``rows`` data rows in ``layout``; return its path.

    The real trace's complete lines (its last line, cut off mid-write, is left
    out) are repeated, each copy shifted by the trace's span plus one second.
    """
    name, fmt, sep = LAYOUTS[layout]
    text = (SHARED / name).read_text()
    header, *lines = text.split("\n")
    lines = [ln for ln in lines[:-1] if ln.strip()]  # complete lines only
    first = pl.DataFrame({"line": lines}).with_columns(
        pl.col("line").str.split_exact(",", 1).struct.field("field_0").alias("ts"),
        pl.col("line").str.splitn(",", 2).struct.field("field_1").alias("rest"),
    )
    ts = (
        first["ts"]
        .str.strip_chars()
        .str.replace_all("/", "-")
        .str.to_datetime("%Y-%m-%d %H:%M:%S%.f", time_unit="ms")
    )
    span_ms = int((ts.max() - ts.min()).total_seconds() * 1000) + 1000  # type: ignore[operator]
    per_copy = len(lines) * gpus
    copies = -(-rows // per_copy)
    base = pl.DataFrame({"t": ts, "rest": first["rest"]})
    frame = (
        pl.DataFrame({"copy": range(copies)})
        .join(pl.DataFrame({"gpu": range(gpus)}), how="cross")
        .join(base.with_row_index("i"), how="cross")
        .sort("copy", "i", "gpu")
        .head(rows)
        .with_columns(
            (
                pl.col("t") + pl.duration(milliseconds=pl.col("copy") * span_ms + pl.col("gpu") * 4)
            ).dt.strftime(fmt)
        )
    )
    if gpus > 1:
        fields = header.split(",")
        index = "gpu_index" if sep == "," else " index"
        header = ",".join([fields[0], index, *fields[1:]])
        body = pl.concat_str("t", pl.lit(sep), pl.col("gpu").cast(pl.String), pl.lit(","), "rest")
    else:
        body = pl.concat_str("t", pl.lit(","), "rest")
    path = folder / f"nvidia-smi-{layout}-{rows}x{gpus}.csv"
    with path.open("w") as out:
        out.write(header + "\n")
        out.write("\n".join(frame.select(body)[:, 0].to_list()) + "\n")
    return path


def measure(path: Path, repo: Path) -> dict[str, object]:
    """Read ``path`` in a child process with ``repo``'s reader; its figures."""
    warm = path.with_name("warm-up.csv")
    with path.open() as f, warm.open("w") as out:
        out.writelines(line for _, line in zip(range(1001), f, strict=False))
    done = subprocess.run(
        [sys.executable, "-c", CHILD, str(repo), str(path), str(warm)],
        capture_output=True,
        text=True,
        check=False,
        cwd=repo,
    )
    if done.returncode:
        raise SystemExit(f"the read of {path} failed:\n{done.stderr[-2000:]}")
    fig: dict[str, object] = json.loads(done.stdout.strip().splitlines()[-1])
    size = path.stat().st_size
    added = (int(fig["peak_kib"]) - int(fig["before_kib"])) / 1024  # type: ignore[call-overload]
    fig.update(
        file=path.name,
        file_mb=size / 1e6,
        rows=sum(1 for _ in path.open()) - 1,
        peak_mib=int(fig["peak_kib"]) / 1024,  # type: ignore[call-overload]
        added_mib=added,
        added_x_file=added * 2**20 / size,
    )
    return fig


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rows", type=int, default=1_500_000, help="data rows per file")
    p.add_argument("--layout", choices=[*LAYOUTS, "both"], default="both")
    p.add_argument("--gpus", type=int, default=1, help="GPUs per sample (adds an index column)")
    p.add_argument("--repo", type=Path, default=REPO, help="tree whose reader is measured")
    p.add_argument("--json", action="store_true", help="print one JSON object per file")
    args = p.parse_args()
    if not SHARED.is_dir():
        raise SystemExit(f"shared dataset not found at {SHARED}; it holds the real traces")
    if args.rows < 1 or args.gpus < 1:
        raise SystemExit(f"expected --rows and --gpus >= 1; found {args.rows}, {args.gpus}")
    layouts = list(LAYOUTS) if args.layout == "both" else [args.layout]
    with tempfile.TemporaryDirectory(prefix="wattwise-import-bench-") as tmp:
        for layout in layouts:
            fig = measure(make_csv(layout, args.rows, args.gpus, Path(tmp)), args.repo)
            if args.json:
                print(json.dumps(fig))
                continue
            print(
                f"{fig['file']}: {fig['file_mb']:.1f} MB, {fig['rows']:,} rows -> "
                f"{fig['rows_out']:,} samples ({fig['out_mib']:.0f} MiB frame); peak RSS "
                f"{fig['peak_mib']:.0f} MiB, {fig['added_mib']:.0f} MiB added by the read "
                f"({fig['added_x_file']:.1f}x the file); {fig['seconds']:.2f} s  "
                f"[{fig['module']}]"
            )


if __name__ == "__main__":
    main()
