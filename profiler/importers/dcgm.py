"""Read and write NVIDIA dcgm-exporter's Prometheus text exposition as ``samples`` rows.

dcgm-exporter serves one line per (metric, GPU)::

    # HELP DCGM_FI_DEV_POWER_USAGE Power draw (in W).
    # TYPE DCGM_FI_DEV_POWER_USAGE gauge
    DCGM_FI_DEV_POWER_USAGE{gpu="0",UUID="GPU-...",device="nvidia0",modelName="NVIDIA H100 \
    80GB HBM3",Hostname="node-1"} 71.200000

(one line; broken here to fit).

Metrics read (others, and other metric families, are ignored):

=====================================  ================  =====================
metric                                 unit              samples column
=====================================  ================  =====================
``DCGM_FI_DEV_POWER_USAGE``            W (gauge)         ``power_w``
``DCGM_FI_DEV_TOTAL_ENERGY_CONSUMPTION`` mJ (counter)    ``energy_j`` (in J)
``DCGM_FI_DEV_GPU_UTIL``               % (gauge)         ``gpu_util_pct``
``DCGM_FI_DEV_MEM_COPY_UTIL``          % (gauge)         ``mem_util_pct``
``DCGM_FI_DEV_FB_USED``                MiB (gauge)       ``mem_used_mib``
``DCGM_FI_DEV_GPU_TEMP``               C (gauge)         ``temp_c``
=====================================  ================  =====================

**MIG.** With MIG on, dcgm-exporter prints one line per GPU instance (a
``GPU_I_ID`` label) under the physical GPU's ``UUID`` and ``gpu`` labels. The
instances' lines make one sample of that GPU: its frame-buffer use is the sum
over the instances; power, energy, utilisation and temperature are readings of
the whole GPU, repeated on each instance's line, and must agree. A line without
``GPU_I_ID`` (the whole GPU) wins over its instances' lines.

The device is the ``UUID`` label, else the ``gpu`` label; the node is the
``node`` argument when given (in Kubernetes ``Hostname`` is the exporter pod's
name, not the node's), else the ``Hostname`` or ``hostname`` label; the model
is ``modelName``. A line's timestamp is its own trailing Prometheus timestamp
(ms since the Unix epoch) when present, else the scrape's.

Recorded series of scrapes (:func:`read_dcgm_file`) use this layout: each
scrape is preceded by a comment line ``# scrape <ISO 8601 timestamp>`` (for
example ``# scrape 2024-05-01T12:00:00.250Z``; a timestamp without an offset
is UTC), so every block stays valid exposition text::

    # scrape 2024-05-01T12:00:00Z
    # HELP DCGM_FI_DEV_POWER_USAGE Power draw (in W).
    ...
    # scrape 2024-05-01T12:00:01Z
    ...

A file without markers is one scrape, taken at the ``timestamp`` argument.
"""

from __future__ import annotations

import math
import re
import uuid
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import polars as pl

from profiler.errors import BadInputError, where
from profiler.importers import check_increasing
from profiler.schema import check_run_id, conform


@dataclass(frozen=True, slots=True)
class DcgmMetric:
    """A dcgm-exporter metric wattwise reads and writes.

    Attributes:
        name: Prometheus metric name.
        column: Column of the samples schema it fills.
        kind: Prometheus type, ``gauge`` or ``counter``.
        help: The HELP text dcgm-exporter prints (from its default-counters.csv).
        divisor: The metric's value divided by this is the column's value (mJ / 1000 = J).
        integer: Whether dcgm-exporter prints the value as an integer (else ``%f``).

    """

    name: str
    column: str
    kind: str
    help: str
    divisor: float = 1.0
    integer: bool = True


METRICS: tuple[DcgmMetric, ...] = (
    DcgmMetric("DCGM_FI_DEV_GPU_TEMP", "temp_c", "gauge", "GPU temperature (in C)."),
    DcgmMetric("DCGM_FI_DEV_POWER_USAGE", "power_w", "gauge", "Power draw (in W).", integer=False),
    DcgmMetric(
        "DCGM_FI_DEV_TOTAL_ENERGY_CONSUMPTION",
        "energy_j",
        "counter",
        "Total energy consumption since boot (in mJ).",
        divisor=1000.0,
    ),
    DcgmMetric("DCGM_FI_DEV_GPU_UTIL", "gpu_util_pct", "gauge", "GPU utilization (in %)."),
    DcgmMetric("DCGM_FI_DEV_MEM_COPY_UTIL", "mem_util_pct", "gauge", "Memory utilization (in %)."),
    DcgmMetric("DCGM_FI_DEV_FB_USED", "mem_used_mib", "gauge", "Framebuffer memory used (in MiB)."),
)
_BY_NAME = {m.name: m for m in METRICS}
_COLUMNS = tuple(m.column for m in METRICS)

_LINE = re.compile(
    r"^(?P<name>[A-Za-z_:][A-Za-z0-9_:]*)\s*"
    r"(?:\{(?P<labels>(?:[^\"}]|\"(?:[^\"\\]|\\.)*\")*)\})?"
    r"\s+(?P<value>\S+)(?:\s+(?P<ts>\S+))?\s*$"
)
_LABEL = re.compile(r'\s*([A-Za-z_][A-Za-z0-9_]*)\s*=\s*"((?:[^"\\]|\\.)*)"\s*(?:,|$)')
_ESCAPE = re.compile(r"\\(.)")
_SCRAPE = re.compile(r"^# scrape\s+(?P<ts>\S+)\s*$")
#: Namespace for the UUIDs :func:`format_dcgm_text` makes up for devices named by index.
_UUID_NS = uuid.UUID("6f1d7e0a-7a57-4b1e-9b0e-77a77a15e000")


def _unescape(value: str) -> str:
    return _ESCAPE.sub(lambda m: "\n" if m.group(1) == "n" else m.group(1), value)


def _parse_labels(text: str, label: str) -> dict[str, str]:
    labels: dict[str, str] = {}
    pos = 0
    text = text.strip()
    while pos < len(text):
        m = _LABEL.match(text, pos)
        if not m:
            raise BadInputError(
                f'{label}expected labels like name="value" separated by commas; found '
                f"{text[pos : pos + 40]!r}"
            )
        labels[m.group(1)] = _unescape(m.group(2))
        pos = m.end()
    return labels


def _label_set(labels: dict[str, str]) -> str:
    keep = ("gpu", "UUID", "GPU_I_ID", "Hostname", "hostname")
    return "{" + ",".join(f'{k}="{labels[k]}"' for k in keep if k in labels) + "}"


def _value(text: str, label: str) -> float | None:
    try:
        v = float(text)
    except ValueError:
        raise BadInputError(
            f"{label}expected a number such as 71.2 (or NaN); found {text!r}"
        ) from None
    if math.isnan(v):
        return None  # Prometheus' "no value"
    if math.isinf(v):
        raise BadInputError(f"{label}expected a finite number; found {text!r}")
    return v


def _utc(ts: datetime) -> datetime:
    return ts.replace(tzinfo=UTC) if ts.tzinfo is None else ts.astimezone(UTC)


def _empty() -> pl.DataFrame:
    return conform(
        pl.DataFrame(
            schema={
                "node": pl.String,
                "device": pl.String,
                "timestamp": pl.Datetime("us", "UTC"),
                "source": pl.String,
            }
        ),
        "samples",
    )


def _merge_instances(
    rec: dict[str, object], columns: dict[str, dict[str, tuple[float | None, str]]]
) -> None:
    """Put the MIG instance lines of one GPU and time into its sample ``rec`` (see module doc)."""
    for column, by_instance in columns.items():
        if column in rec:
            continue  # the whole GPU's own line wins
        values = [v for v, _ in by_instance.values() if v is not None]
        if column == "mem_used_mib":
            rec[column] = sum(values) if values else None
            continue
        if len(set(values)) > 1:
            read = [(v, at) for v, at in by_instance.values() if v is not None]
            (a, at_a), (b, at_b) = min(read), max(read)
            raise BadInputError(
                f"{at_b}this reading of the whole GPU differs between its MIG instances "
                f"({a} at {at_a.rstrip(': ')}, {b} here); expected one value"
            )
        rec[column] = values[0] if values else None


def parse_dcgm_text(
    text: str,
    *,
    timestamp: datetime | None = None,
    node: str | None = None,
    file: str | None = None,
    first_line: int = 1,
) -> pl.DataFrame:
    """Parse one dcgm-exporter scrape into samples.

    Args:
        text: The exposition text.
        timestamp: When the scrape was taken (naive means UTC); needed unless
            every metric line carries its own timestamp.
        node: Node name to store the samples under; overrides the
            ``Hostname``/``hostname`` label.
        file: Where the text came from, for messages.
        first_line: Line number of the text's first line in ``file``, for messages.

    Returns:
        One row per (node, device, timestamp) in the ``samples`` schema,
        source ``dcgm``, ``run_id`` null, sorted by node, device and time.

    Raises:
        BadInputError: A malformed line or label set, a value that is not a
            number, a negative power or energy, a line with neither a
            timestamp nor a ``timestamp`` argument, a line without ``UUID`` or
            ``gpu`` label, no node name, or two different values of one
            metric for the same device and time (for MIG instances: for the same
            instance, or two instances' readings of the whole GPU that differ).

    """
    default_ts = _utc(timestamp) if timestamp is not None else None
    rows: dict[tuple[str, str, datetime], dict[str, object]] = {}
    # MIG instance lines: (node, device, time) -> column -> instance id -> (value, where).
    inst: dict[tuple[str, str, datetime], dict[str, dict[str, tuple[float | None, str]]]] = {}
    for i, raw in enumerate(text.splitlines()):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        lineno = first_line + i
        m = _LINE.match(line)
        if not m:
            raise BadInputError(
                f'{where(file, label=f"line {lineno}")}expected \'METRIC{{label="value",...}} '
                f"VALUE [TIMESTAMP_MS]'; found {line[:80]!r}"
            )
        metric = _BY_NAME.get(m.group("name"))
        if metric is None:
            continue
        labels = _parse_labels(m.group("labels") or "", where(file, label=f"line {lineno}"))
        at = where(file, label=f"line {lineno} {metric.name}{_label_set(labels)}")
        value = _value(m.group("value"), at)
        if value is not None and value < 0:
            raise BadInputError(f"{at}expected a value >= 0; found {m.group('value')}")
        if m.group("ts") is not None:
            try:
                ms = int(m.group("ts"))
            except ValueError:
                raise BadInputError(
                    f"{at}expected a timestamp in ms since 1970 after the value; found "
                    f"{m.group('ts')!r}"
                ) from None
            try:
                ts = datetime.fromtimestamp(ms / 1000, tz=UTC)
            except (ValueError, OverflowError, OSError):
                # Before year 1 or after 9999: Python's datetime cannot hold it.
                raise BadInputError(
                    f"{at}expected a timestamp in ms since 1970 between years 1 and 9999; "
                    f"found {m.group('ts')}"
                ) from None
        elif default_ts is not None:
            ts = default_ts
        else:
            raise BadInputError(
                f"{at}the line has no timestamp and none was given; pass the scrape time "
                "(--timestamp 2024-05-01T12:00:00Z) or record scrapes with '# scrape <ISO time>' "
                "lines"
            )
        device = labels.get("UUID") or labels.get("gpu")
        if not device:
            raise BadInputError(f"{at}expected a UUID or gpu label naming the device; found none")
        host = node or labels.get("Hostname") or labels.get("hostname")
        if not host:
            raise BadInputError(
                f"{at}expected a Hostname or hostname label naming the node; found none. "
                "Pass the node name (--node)"
            )
        rec = rows.setdefault((host, device, ts), {"model": None})
        rec["model"] = rec["model"] or labels.get("modelName") or None
        if value is not None:
            value /= metric.divisor
        gi = labels.get("GPU_I_ID")
        if gi:
            seen = inst.setdefault((host, device, ts), {}).setdefault(metric.column, {})
            if gi in seen and seen[gi][0] != value:
                raise BadInputError(
                    f"{at}the metric appears twice for MIG instance {gi} of this device and "
                    f"time, with {seen[gi][0]} and {value}; expected one value"
                )
            seen[gi] = (value, at)
            continue
        old = rec.get(metric.column)
        if metric.column in rec and old != value:
            raise BadInputError(
                f"{at}the metric appears twice for this device and time, with {old} and {value}; "
                "expected one value"
            )
        rec[metric.column] = value
    for key, columns in inst.items():
        _merge_instances(rows[key], columns)
    if not rows:
        return _empty()
    df = pl.DataFrame(
        [
            {
                "node": k[0],
                "device": k[1],
                "timestamp": k[2],
                **{c: r.get(c) for c in _COLUMNS},
                "model": r["model"],
            }
            for k, r in rows.items()
        ],
        schema={
            "node": pl.String,
            "device": pl.String,
            "timestamp": pl.Datetime("us", "UTC"),
            **{c: pl.Float64 for c in _COLUMNS},
            "model": pl.String,
        },
    )
    df = df.with_columns(pl.lit(None, pl.String).alias("run_id"), pl.lit("dcgm").alias("source"))
    return conform(df, "samples", file=file).sort("node", "device", "timestamp")


def _parse_iso(text: str, label: str) -> datetime:
    try:
        return _utc(datetime.fromisoformat(text.replace("Z", "+00:00")))
    except (ValueError, OverflowError):  # OverflowError: year 1 or 9999 shifted out of range
        raise BadInputError(
            f"{label}expected an ISO 8601 time such as 2024-05-01T12:00:00Z; found {text!r}"
        ) from None


def read_dcgm_file(
    path: str | Path,
    *,
    timestamp: datetime | None = None,
    node: str | None = None,
    run_id: str | None = None,
) -> pl.DataFrame:
    """Read a file of one or more dcgm-exporter scrapes (see the module docstring).

    Args:
        path: The file.
        timestamp: Time of the text before the first ``# scrape`` marker (the
            whole file when there is none); naive means UTC.
        node: Node name; overrides the ``Hostname`` label.
        run_id: Run the samples belong to, or ``None``.

    Returns:
        Samples in the ``samples`` schema, sorted by node, device and time.

    Raises:
        BadInputError: As :func:`parse_dcgm_text`; also a missing or empty
            file, a bad ``# scrape`` time, and scrapes whose times do not
            strictly increase per device.

    """
    file = str(path)
    if run_id is not None:
        check_run_id(run_id, context=where(file))
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError as err:
        raise BadInputError(f"{file}: expected a dcgm-exporter scrape file; no such file") from err
    except (OSError, UnicodeDecodeError) as err:
        raise BadInputError(f"{file}: cannot read the file as UTF-8 text ({err})") from err
    if not text.strip():
        raise BadInputError(
            f"{file}: empty file; expected dcgm-exporter output such as "
            '\'DCGM_FI_DEV_POWER_USAGE{gpu="0",UUID="GPU-..."} 71.2\''
        )
    lines = text.splitlines()
    blocks: list[tuple[int, datetime | None, list[str]]] = [(1, timestamp, [])]
    for i, line in enumerate(lines, start=1):
        m = _SCRAPE.match(line.strip())
        if m:
            blocks.append((i + 1, _parse_iso(m.group("ts"), where(file, label=f"line {i}")), []))
        else:
            blocks[-1][2].append(line)
    frames = [
        parse_dcgm_text("\n".join(body), timestamp=ts, node=node, file=file, first_line=start)
        for start, ts, body in blocks
    ]
    df = pl.concat(frames)
    if df.height == 0:
        raise BadInputError(
            f"{file}: no DCGM_FI_DEV_* metric that wattwise reads; expected at least one of "
            f"{[m.name for m in METRICS]}"
        )
    # A device's samples must move forward in time from scrape to scrape.
    numbered = pl.concat(
        [
            f.with_columns(pl.lit(max(start - 1, 1), pl.Int64).alias("line"))
            for f, (start, _, _) in zip(frames, blocks, strict=True)
        ]
    )
    check_increasing(numbered, file=file, key=("node", "device"), row="line", row_is_line=True)
    return df.with_columns(pl.lit(run_id, pl.String).alias("run_id")).sort(
        "node", "device", "timestamp"
    )


def _fmt_label(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _device_labels(rows: pl.DataFrame) -> dict[tuple[str, str], tuple[str, str]]:
    """(node, device) -> (gpu index label, UUID label)."""
    out: dict[tuple[str, str], tuple[str, str]] = {}
    has_gpu, has_uuid = "gpu" in rows.columns, "uuid" in rows.columns
    cols = ["node", "device"] + (["gpu"] if has_gpu else []) + (["uuid"] if has_uuid else [])
    per_node: dict[str, int] = {}
    for rec in (
        rows.select(cols)
        .unique(subset=["node", "device"], maintain_order=True)
        .iter_rows(named=True)
    ):
        node, device = str(rec["node"]), str(rec["device"])
        rank = per_node.get(node, 0)
        per_node[node] = rank + 1
        if has_gpu and rec["gpu"] is not None:
            gpu = str(rec["gpu"])
        elif device.isdigit():
            gpu = device
        else:
            gpu = str(rank)
        if has_uuid and rec["uuid"] is not None:
            uid = str(rec["uuid"])
        elif device.startswith("GPU-"):
            uid = device
        else:
            uid = f"GPU-{uuid.uuid5(_UUID_NS, f'{node}/{device}')}"
        out[(node, device)] = (gpu, uid)
    return out


def _fmt_value(value: float, metric: DcgmMetric) -> str:
    v = value * metric.divisor
    return str(round(v)) if metric.integer else f"{v:f}"


def format_dcgm_text(
    rows: pl.DataFrame,
    *,
    hostname_label: str = "Hostname",
    driver_version: str | None = None,
    with_timestamps: bool = False,
) -> str:
    """Write samples as dcgm-exporter would serve them (the inverse of :func:`parse_dcgm_text`).

    Each metric gets dcgm-exporter's ``# HELP`` and ``# TYPE`` lines, then one
    line per device with the labels ``gpu``, ``UUID``, ``device``
    (``nvidia<gpu>``), ``modelName`` and ``Hostname`` (and
    ``DCGM_FI_DRIVER_VERSION`` when given). Power is printed as ``%f`` W, the
    energy counter as integer mJ, the others as integers, like dcgm-exporter;
    null values are left out.

    Args:
        rows: Samples (``node``, ``device`` and any of ``model``, ``power_w``,
            ``energy_j``, ``gpu_util_pct``, ``mem_util_pct``,
            ``mem_used_mib``, ``temp_c``; ``timestamp`` with
            ``with_timestamps``). Optional ``gpu`` and ``uuid`` columns set
            those labels; otherwise a numeric device is the ``gpu`` label, a
            ``GPU-...`` device the ``UUID``, and the other is made up (the
            rank on the node, or a UUID derived from node and device).
        hostname_label: ``Hostname`` (dcgm-exporter) or ``hostname``.
        driver_version: Value of the ``DCGM_FI_DRIVER_VERSION`` label, if any.
        with_timestamps: Append each row's timestamp (ms since 1970) to its
            lines; without it, ``rows`` must hold one row per (node, device).

    Returns:
        The exposition text, ending with a newline.

    Raises:
        BadInputError: A required column is missing, or several rows share a
            (node, device) while ``with_timestamps`` is false.

    """
    for need in ("node", "device") + (("timestamp",) if with_timestamps else ()):
        if need not in rows.columns:
            raise BadInputError(f"expected a {need!r} column; found columns {rows.columns}")
    if (
        not with_timestamps
        and rows.select(pl.struct("node", "device").is_duplicated().any()).item()
    ):
        raise BadInputError(
            "expected one row per (node, device) for one scrape; found several. Pass "
            "with_timestamps=True, or write one scrape per time with format_dcgm_file"
        )
    ids = _device_labels(rows)
    out: list[str] = []
    for metric in METRICS:
        if metric.column not in rows.columns:
            continue
        present = rows.filter(pl.col(metric.column).is_not_null())
        if present.height == 0:
            continue
        out.append(f"# HELP {metric.name} {metric.help}")
        out.append(f"# TYPE {metric.name} {metric.kind}")
        for rec in present.iter_rows(named=True):
            gpu, uid = ids[(str(rec["node"]), str(rec["device"]))]
            labels = [
                ("gpu", gpu),
                ("UUID", uid),
                ("device", f"nvidia{gpu}"),
                ("modelName", rec.get("model") or ""),
                (hostname_label, str(rec["node"])),
            ]
            if driver_version is not None:
                labels.append(("DCGM_FI_DRIVER_VERSION", driver_version))
            text = ",".join(f'{k}="{_fmt_label(v)}"' for k, v in labels)
            line = f"{metric.name}{{{text}}} {_fmt_value(rec[metric.column], metric)}"
            if with_timestamps:
                ts: datetime = _utc(rec["timestamp"])
                line += f" {round(ts.timestamp() * 1000)}"
            out.append(line)
    return "\n".join(out) + "\n"


def format_dcgm_file(rows: pl.DataFrame, **kwargs: object) -> str:
    """Write samples as a recorded series of scrapes, one ``# scrape <ISO time>`` block per time.

    Args:
        rows: Samples with ``timestamp``; see :func:`format_dcgm_text`.
        **kwargs: Passed to :func:`format_dcgm_text` (``hostname_label``,
            ``driver_version``).

    Returns:
        Text that :func:`read_dcgm_file` reads back.

    """
    blocks: Iterable[tuple[tuple[object, ...], pl.DataFrame]] = rows.sort("timestamp").group_by(
        "timestamp", maintain_order=True
    )
    parts = []
    for (ts,), block in blocks:
        assert isinstance(ts, datetime)
        stamp = _utc(ts).isoformat(timespec="microseconds").replace("+00:00", "Z")
        parts.append(f"# scrape {stamp}\n" + format_dcgm_text(block, **kwargs))  # type: ignore[arg-type]
    return "".join(parts)
