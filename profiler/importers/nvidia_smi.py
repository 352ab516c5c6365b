"""Read the CSV that ``nvidia-smi --query-gpu=... --format=csv`` writes into the ``samples`` schema.

Accepted input:

* Header names as nvidia-smi writes them (``timestamp, name, utilization.gpu
  [%], ..., power.draw [W], ...``, with a space after each comma) or renamed
  (``timestamp,gpu_name,gpu_usage,gpu_memory_usage,...,gpu_power_draw,...``);
  matching ignores case, spaces and the ``[unit]`` suffix. Columns that map to
  nothing in the store (``memory.total``, ``power.max_limit``...) are ignored.
* The ``[unit]`` of a header sets the unit of its column's cells (a header
  without one means the stored unit: W, %, MiB, C). Power in ``W``, ``mW`` or
  ``kW`` is stored in W; ``memory.used`` in ``KiB``, ``MiB`` or ``GiB`` is
  stored in MiB; any other unit is refused, naming the column.
* Timestamps ``2022-12-05 09:55:42.535`` or ``2023/03/09 13:27:53.079`` (the
  fraction is optional): naive local time of the measuring machine, read in
  the time zone ``tz`` and stored in UTC.
* Cells with or without units (``47.60 W``, ``0 %``, ``24268 MiB``: the
  ``nounits`` format too); a cell's unit must be its column's. ``[N/A]``,
  ``[Not Supported]``, any other bracketed note, ``N/A`` and empty cells are
  null.
* Several GPUs in one file: the device id is the ``uuid`` column, else
  ``index``, else ``pci.bus_id``. Rows of several GPUs may interleave. A file
  without any of these columns holds one GPU, device ``"0"``; one that shows
  several (``name`` or ``serial`` values that differ, or rows a few ms apart
  recurring between samples much further apart, as nvidia-smi stamps each
  GPU's row) is refused: add ``index`` or ``uuid`` to ``--query-gpu``.
* Blank lines and repeated header lines (``nvidia-smi ... >> file`` restarted)
  are skipped. A final line without its newline was cut off while nvidia-smi
  was writing it (its last cell may be cut short too, ``5`` of ``54``): it is
  left out, logged as a warning and reported in
  :attr:`NvidiaSmiFile.cut_off_row`, so that importing the finished file
  later adds that sample whole instead of conflicting with a partial one.
* Utilisations (``utilization.gpu``, ``utilization.memory``) lie in 0-100 %.

Everything else is refused with :class:`profiler.errors.BadInputError`
naming the file, the 1-based data row (the header is not counted, so data
row N is line N + 1) and the column.
"""

from __future__ import annotations

import codecs
import logging
import re
import zoneinfo
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

import numpy as np
import polars as pl

from profiler.errors import BadInputError, SchemaError, where
from profiler.importers import check_increasing
from profiler.schema import check_run_id, conform

log = logging.getLogger(__name__)

#: Timestamp layout after ``/`` is replaced by ``-``; ``%.f`` makes the fraction optional.
TIMESTAMP_FORMAT = "%Y-%m-%d %H:%M:%S%.f"


@dataclass(frozen=True, slots=True)
class _Field:
    """A store column and the header names nvidia-smi (or a renaming script) gives it.

    Attributes:
        target: Column name in the samples schema (or an internal name).
        names: Accepted header names, normalised, in order of preference.
        unit: The stored unit, assumed when the header names none.
        example: A valid cell in ``unit``, for messages.
        units: Accepted header units and the exact factor ``(mul, div)`` that
            converts a value in that unit to ``unit``.

    """

    target: str
    names: tuple[str, ...]
    unit: str | None = None
    example: str = ""
    units: tuple[tuple[str, int, int], ...] = ()


_FIELDS: tuple[_Field, ...] = (
    _Field("timestamp", ("timestamp",), example="2022-12-05 09:55:42.535"),
    _Field("model", ("name", "gpu_name")),
    _Field("uuid", ("uuid", "gpu_uuid")),
    _Field("index", ("index", "gpu_index")),
    _Field("pci", ("pci.bus_id", "gpu_bus_id", "gpu_pci_bus_id")),
    _Field("serial", ("serial", "gpu_serial")),
    _Field(
        "power_w",
        ("power.draw", "gpu_power_draw", "power.draw.instant", "power.draw.average"),
        "W",
        "47.60 W",
        (("W", 1, 1), ("mW", 1, 1000), ("kW", 1000, 1)),
    ),
    _Field(
        "gpu_util_pct",
        ("utilization.gpu", "gpu_usage", "gpu_utilization"),
        "%",
        "93 %",
        (("%", 1, 1),),
    ),
    _Field(
        "mem_util_pct",
        ("utilization.memory", "gpu_memory_usage", "memory_utilization"),
        "%",
        "40 %",
        (("%", 1, 1),),
    ),
    _Field(
        "mem_used_mib",
        ("memory.used", "gpu_memory_used"),
        "MiB",
        "11135 MiB",
        (("MiB", 1, 1), ("KiB", 1, 1024), ("GiB", 1024, 1)),
    ),
    _Field("temp_c", ("temperature.gpu", "gpu_temperature"), "C", "65", (("C", 1, 1),)),
)
_NUMERIC = ("power_w", "gpu_util_pct", "mem_util_pct", "mem_used_mib", "temp_c")
_PERCENT = ("gpu_util_pct", "mem_util_pct")
_NUMBER = r"[-+]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][-+]?\d+)?"


def _normalise(header: str) -> str:
    """``' power.draw [W]'`` -> ``'power.draw'``."""
    return re.sub(r"\s*\[[^\]]*\]\s*$", "", header.strip()).strip().lower()


def _header_unit(header: str) -> str | None:
    """``' power.draw [mW]'`` -> ``'mW'``; ``None`` without a (non-empty) ``[unit]``."""
    m = re.search(r"\[([^\]]*)\]\s*$", header.strip())
    return (m.group(1).strip() or None) if m else None


def _null_marker(col: pl.Expr) -> pl.Expr:
    """True where a (stripped) cell says 'no value': empty, ``N/A`` or a bracketed note."""
    return (
        col.is_null()
        | (col == "")
        | col.str.contains(r"^\[.*\]$")
        | col.str.to_uppercase().is_in(["N/A", "NA"])
    )


def _resolve_header(header: list[str], file: str) -> tuple[dict[str, int], dict[str, str]]:
    """Map each known target to its column index (first preferred name found) and unit.

    Returns:
        The column index of each target found, and the unit of each numeric
        target's cells: the header's ``[unit]``, else the stored unit.

    Raises:
        BadInputError: A timestamp or power column is missing, or a numeric
            column's header names a unit it cannot be converted from.

    """
    norm = [_normalise(h) for h in header]
    found: dict[str, int] = {}
    units: dict[str, str] = {}
    for f in _FIELDS:
        for name in f.names:
            if name in norm:
                found[f.target] = norm.index(name)
                break
        if f.target not in found or not f.units:
            continue
        unit = _header_unit(header[found[f.target]]) or f.unit or ""
        accepted = [u for u, _, _ in f.units]
        if unit not in accepted:
            raise BadInputError(
                f"{where(file, label='header')}column {header[found[f.target]].strip()!r}: "
                f"expected the unit {' or '.join(repr(u) for u in accepted)} (or none, meaning "
                f"{f.unit!r}); found {unit!r}"
            )
        units[f.target] = unit
    for need in ("timestamp", "power_w"):
        if need not in found:
            names = next(f.names for f in _FIELDS if f.target == need)
            raise BadInputError(
                f"{where(file, label='header')}expected a {names[0]!r} column (accepted names: "
                f"{', '.join(names)}); found columns {[h.strip() for h in header]}. Record with "
                "nvidia-smi --query-gpu=timestamp,index,uuid,name,power.draw,utilization.gpu,"
                "utilization.memory,memory.used,temperature.gpu --format=csv -l 1"
            )
    return found, units


_ADD_INDEX = (
    "expected one GPU per file, or a column naming the device: add index (or uuid) to the "
    "--query-gpu list"
)


def _refuse_several_gpus(df: pl.DataFrame, file: str, label: dict[str, str]) -> None:
    """Refuse a file without a device column whose ``name`` or ``serial`` takes several values.

    Args:
        df: The rows, with the data ``row`` and the ``model`` (and ``serial``) cells.
        file: The file, for messages.
        label: The header of each target column, for messages.

    Raises:
        BadInputError: The column holds more than one value: several GPUs, rows
            that cannot be told apart.

    """
    for col in ("model", "serial"):
        if col not in label:
            continue
        values = df.filter(~_null_marker(pl.col(col)))
        if values[col].n_unique() < 2:
            continue
        first = values[col][0]
        other = values.filter(pl.col(col) != first).row(0, named=True)
        raise BadInputError(
            f"{where(file, other['row'], 'column ' + label[col])}found {other[col]!r} after "
            f"{first!r}: {values[col].n_unique()} GPUs in a file without an index, uuid or "
            f"pci.bus_id column; {_ADD_INDEX}"
        )


def _refuse_interleaved_rows(df: pl.DataFrame, file: str) -> None:
    """Refuse a file without a device column whose rows look like several GPUs interleaved.

    nvidia-smi writes one row per GPU at each sample, stamped a few ms apart. Read as one
    device, such a file passes the time-order check but makes one trace alternating
    between the GPUs (half the energy for two). It shows as two well-separated classes
    of intervals between consecutive rows: short ones (between the GPUs of one sample,
    at least a third of all) and long ones (between samples, at least 2 and 5 %), at
    least ten times longer, with a short interval after most of the long ones. One GPU
    sampled at a steady rate, with or without pauses or a change of rate, does not.

    Args:
        df: The rows in file order, with ``timestamp`` strictly increasing.
        file: The file, for messages.

    Raises:
        BadInputError: The rows look like several GPUs.

    """
    if df.height < 6:
        return
    d = np.diff(df["timestamp"].dt.epoch("us").to_numpy()).astype(float)
    s = np.sort(d)
    ratios = s[1:] / s[:-1]
    cut = int(np.argmax(ratios))
    if ratios[cut] < 10:
        return
    limit = s[cut]  # the longest short interval
    short = d <= limit
    n_short, n_long = int(short.sum()), int((~short).sum())
    after_long = int((~short[:-1] & short[1:]).sum())  # a short interval right after a long one
    if n_short * 3 < len(d) or n_long < max(2, 0.05 * len(d)) or after_long * 2 < n_long:
        return
    i = int(np.flatnonzero(short)[0]) + 1  # the row after the first short interval
    raise BadInputError(
        f"{where(file, int(df['row'][i]), repr('timestamp'))}the rows look like several GPUs "
        f"interleaved: {n_short} times a row comes only {np.median(d[short]) / 1e3:g} ms "
        f"(median) after the previous one, while samples are "
        f"{np.median(d[~short]) / 1e3:g} ms apart, and the file has no index, uuid or "
        f"pci.bus_id column to tell the GPUs apart; {_ADD_INDEX}"
    )


@dataclass(frozen=True, slots=True)
class NvidiaSmiFile:
    """One nvidia-smi CSV file read into samples.

    Attributes:
        samples: The samples, in the ``samples`` schema, in file order.
        rows: The 1-based data row (header not counted) of each sample, in
            the same order, for messages.
        cut_off_row: The data row of the last line, left out because it has no
            newline at its end (nvidia-smi was still writing it), or ``None``.
        cut_off_text: That line as found (at most 80 characters), or ``None``.

    """

    samples: pl.DataFrame
    rows: pl.Series = field(repr=False)
    cut_off_row: int | None = None
    cut_off_text: str | None = None


def read_nvidia_smi_csv(
    path: str | Path, *, node: str, run_id: str | None, tz: str = "UTC"
) -> pl.DataFrame:
    """Read one nvidia-smi CSV file into samples (:func:`read_nvidia_smi_file`'s samples).

    A last line cut off mid-write is left out with a logged warning; use
    :func:`read_nvidia_smi_file` to learn about it.
    """
    read = read_nvidia_smi_file(path, node=node, run_id=run_id, tz=tz)
    if read.cut_off_row is not None:
        log.warning(
            "%s, row %d: the last line has no newline at its end (nvidia-smi was still writing "
            "it); left it out: %r",
            path,
            read.cut_off_row,
            read.cut_off_text,
        )
    return read.samples


#: Bytes of the file decoded and parsed at a time (more when one line is longer). Parsing a
#: piece takes several times its size; the samples of all pieces take less than the file.
_PIECE_BYTES = 4 << 20


def _pieces(f: BinaryIO, file: str, size: int | None) -> Iterator[tuple[int, bytes, bool]]:
    r"""Cut the first ``size`` bytes of ``f`` (all of it when ``None``) into pieces at line ends.

    Every piece but the last ends with ``\n`` or with a ``\r`` not followed by ``\n``, so
    no piece splits a line, a ``\r\n`` or a UTF-8 character (newline bytes occur in none).

    Yields:
        The file offset (bytes) of the piece, the piece, and whether it is the last one (the
        rest of the file: it may end without a newline, or be empty).

    """
    offset, buf, left = 0, b"", size
    while True:
        try:
            data = f.read(_PIECE_BYTES if left is None else min(_PIECE_BYTES, left))
        except OSError as err:
            raise BadInputError(f"{file}: cannot read the file ({err})") from err
        if left is not None:
            left -= len(data)
        if not data or left == 0:
            yield offset, buf + data, True
            return
        buf += data
        cut = buf.rfind(b"\n") + 1 or buf.rfind(b"\r", 0, len(buf) - 1) + 1
        if cut:
            yield offset, buf[:cut], False
            offset, buf = offset + cut, buf[cut:]


def _decode(piece: bytes, offset: int, file: str) -> str:
    r"""Decode a piece of the file (a leading BOM dropped), with ``\r\n`` and ``\r`` as ``\n``.

    Raises:
        BadInputError: The piece is not UTF-8; the message gives the file offset of the byte.

    """
    bom = len(codecs.BOM_UTF8) if offset == 0 and piece.startswith(codecs.BOM_UTF8) else 0
    try:
        text = piece[bom:].decode("utf-8")
    except UnicodeDecodeError as err:
        raise BadInputError(
            f"{file}: expected a UTF-8 text file written by nvidia-smi; found byte "
            f"{piece[bom + err.start]:#04x} at offset {offset + bom + err.start}"
        ) from err
    return text.replace("\r\n", "\n").replace("\r", "\n")


@dataclass(frozen=True, slots=True)
class _Header:
    """What the header line of a file says about its columns.

    Attributes:
        names: Its comma-separated fields, as found.
        cols: The column index of each target found (see :func:`_resolve_header`).
        units: The unit of each numeric target's cells.
        label: The header of each target column, quoted, for messages.
        device: The target naming the device (``uuid``, ``index`` or ``pci``), or ``None``.

    """

    names: list[str]
    cols: dict[str, int]
    units: dict[str, str]
    label: dict[str, str]
    device: str | None


class _RowRefused(Exception):
    """A row refused by row check number ``check`` (the checks of a row run in that order).

    A file read in pieces reports what one read of the whole file would: the first row
    refused by the first check that refuses any row.
    """

    def __init__(self, check: int, error: BadInputError) -> None:
        super().__init__(str(error))
        self.check = check
        self.error = error


def _parse_rows(
    df: pl.DataFrame, h: _Header, file: str, zone: zoneinfo.ZoneInfo, tz: str
) -> pl.DataFrame:
    """Parse data lines into typed columns, checking each row on its own.

    Args:
        df: The data lines (``line``) and their 1-based data rows (``row``), blank lines and
            repeated headers left out.
        h: The file's header.
        file: The file, for messages.
        zone: The time zone of the naive timestamps.
        tz: Its name, for messages.

    Returns:
        ``row``, ``device``, ``model`` (null where the cell says no value), ``timestamp``
        (UTC), the numeric targets found (stored units) and, in a file without a device
        column, the ``serial`` cells.

    Raises:
        _RowRefused: A row is refused; the first one of the first check that refuses any.

    """
    cols, header, label = h.cols, h.names, h.label
    n_fields = len(header)
    df = df.with_columns(pl.col("line").str.split(",").alias("f"))
    df = df.with_columns(pl.col("f").list.len().alias("n"))
    bad = df.filter(pl.col("n") != n_fields)
    if bad.height:
        r = bad.row(0, named=True)
        raise _RowRefused(
            1,
            BadInputError(
                f"{where(file, r['row'])}expected {n_fields} comma-separated fields as in the "
                f"header; found {r['n']}: {r['line'][:80]!r}"
            ),
        )

    cells = {
        target: pl.col("f").list.get(i, null_on_oob=True).str.strip_chars().alias(target)
        for target, i in cols.items()
    }
    df = df.select("row", *cells.values())

    # Timestamps: both layouts, then local time in tz -> UTC.
    ts_raw = pl.col("timestamp")
    parsed = ts_raw.str.replace_all("/", "-").str.to_datetime(
        TIMESTAMP_FORMAT, strict=False, time_unit="us"
    )
    df = df.with_columns(parsed.alias("_ts"))
    bad = df.filter(pl.col("_ts").is_null()).head(1)
    if bad.height:
        r = bad.row(0, named=True)
        found = "an empty cell" if not r["timestamp"] else repr(r["timestamp"])
        raise _RowRefused(
            2,
            BadInputError(
                f"{where(file, r['row'], 'column ' + label['timestamp'])}expected a timestamp "
                f"like '2022-12-05 09:55:42.535' or '2023/03/09 13:27:53.079'; found {found}"
            ),
        )
    local = pl.col("_ts").dt.replace_time_zone(zone.key, ambiguous="null", non_existent="null")
    df = df.with_columns(local.alias("_local"))
    bad = df.filter(pl.col("_local").is_null()).head(1)
    if bad.height:
        r = bad.row(0, named=True)
        raise _RowRefused(
            3,
            BadInputError(
                f"{where(file, r['row'], 'column ' + label['timestamp'])}local time {r['_ts']} "
                f"does not exist or is ambiguous in time zone {tz!r} (a daylight-saving "
                "change); expected an unambiguous time. Pass the zone's fixed offset instead, "
                "e.g. --tz Etc/GMT-1"
            ),
        )
    df = df.with_columns(
        pl.col("_local").dt.convert_time_zone("UTC").dt.cast_time_unit("us").alias("timestamp")
    ).drop("_ts", "_local")

    # Numeric cells: a number, with the column's unit or none, or a null marker; then
    # converted from the column's unit to the stored one.
    for check, f in enumerate((f for f in _FIELDS if f.target in _NUMERIC), start=4):
        if f.target not in cols:
            continue
        col = pl.col(f.target)
        unit = h.units[f.target]
        parts = col.str.extract_groups(rf"^(?<n>{_NUMBER})\s*(?<u>.*)$")
        num, cell_unit = parts.struct.field("n"), parts.struct.field("u")
        df = df.with_columns(
            pl.when(_null_marker(col)).then(None).otherwise(num).alias("_num"),
            pl.when(_null_marker(col)).then(None).otherwise(cell_unit).alias("_unit"),
        )
        bad = df.filter(
            pl.col("_unit").is_not_null() & (pl.col("_unit") != "") & (pl.col("_unit") != unit)
            | (~_null_marker(col) & pl.col("_num").is_null())
        ).head(1)
        if bad.height:
            r = bad.row(0, named=True)
            what = f"a power in {unit}" if f.target == "power_w" else "a number"
            example = f.example if unit == f.unit else f"{f.example.split()[0]} {unit}"
            why = ""
            if r["_num"] is not None:  # a number in another unit than the column's
                why = f": its unit {r['_unit']!r} is not the column's unit {unit!r}"
                head = header[cols[f.target]].strip()
                if _header_unit(head) is None and r["_unit"] in [u for u, _, _ in f.units]:
                    why += (
                        f" (the header names no unit, so {unit!r} is assumed; write "
                        f"'{head} [{r['_unit']}]' in the header)"
                    )
            raise _RowRefused(
                check,
                BadInputError(
                    f"{where(file, r['row'], 'column ' + label[f.target])}expected {what} such "
                    f"as {example!r} (or [N/A]); found {r[f.target]!r}{why}"
                ),
            )
        mul, div = next((m, d) for u, m, d in f.units if u == unit)
        value = pl.col("_num").cast(pl.Float64)
        if (mul, div) != (1, 1):
            value = value * mul / div
        df = df.with_columns(value.alias(f.target)).drop("_num", "_unit")
    bad = df.filter(pl.col("power_w") < 0).head(1)
    if bad.height:
        r = bad.row(0, named=True)
        raise _RowRefused(
            4 + len(_NUMERIC),
            BadInputError(
                f"{where(file, r['row'], 'column ' + label['power_w'])}expected a power >= 0 W; "
                f"found {r['power_w']} W"
            ),
        )
    for check, pct in enumerate(_PERCENT, start=5 + len(_NUMERIC)):
        if pct not in cols:
            continue
        bad = df.filter((pl.col(pct) < 0) | (pl.col(pct) > 100)).head(1)
        if bad.height:
            r = bad.row(0, named=True)
            raise _RowRefused(
                check,
                BadInputError(
                    f"{where(file, r['row'], 'column ' + label[pct])}expected a utilisation "
                    f"from 0 to 100 %; found {r[pct]:g} %"
                ),
            )

    # Device id: uuid, else index, else PCI bus id, else one device "0".
    dev_col = h.device
    if dev_col is None:
        df = df.with_columns(pl.lit("0").alias("device"))
    else:
        df = df.with_columns(
            pl.when(_null_marker(pl.col(dev_col)))
            .then(None)
            .otherwise(pl.col(dev_col))
            .alias("device")
        )
        bad = df.filter(pl.col("device").is_null()).head(1)
        if bad.height:
            r = bad.row(0, named=True)
            raise _RowRefused(
                5 + len(_NUMERIC) + len(_PERCENT),
                BadInputError(
                    f"{where(file, r['row'], 'column ' + label[dev_col])}expected a device id; "
                    f"found {r[dev_col]!r}"
                ),
            )
    model = (
        pl.when(_null_marker(pl.col("model"))).then(None).otherwise(pl.col("model"))
        if "model" in cols
        else pl.lit(None, pl.String)
    )
    keep = ["serial"] if dev_col is None and "serial" in cols else []
    return df.select(
        "row",
        "device",
        model.alias("model"),
        "timestamp",
        *[c for c in _NUMERIC if c in cols],
        *keep,
    )


#: Samples checked by one call of :func:`profiler.schema.conform` (see :func:`_conform_in_slices`).
_CONFORM_ROWS = 1 << 16


def _conform_in_slices(out: pl.DataFrame, file: str) -> pl.DataFrame:
    """``conform(out, "samples")``, a slice of :data:`_CONFORM_ROWS` rows at a time.

    Its check for duplicated keys hashes every key, taking about 350 bytes a sample at
    once (500 MiB for 1.5 million) when given the whole file. The slices need no check
    against each other: :func:`profiler.importers.check_increasing` has made every
    (device, timestamp) of the file unique, and run and node are the same for all.

    Raises:
        SchemaError: As ``conform(out, "samples")``: a slice refused is checked again whole,
            so that the message counts rows over the whole file.

    """
    try:
        return pl.concat(
            [
                conform(out.slice(i, _CONFORM_ROWS), "samples", file=file)
                for i in range(0, max(out.height, 1), _CONFORM_ROWS)
            ]
        )
    except SchemaError:
        conform(out, "samples", file=file)
        raise


def read_nvidia_smi_file(
    path: str | Path, *, node: str, run_id: str | None, tz: str = "UTC"
) -> NvidiaSmiFile:
    """Read one nvidia-smi CSV file into samples.

    The file is read twice, a piece at a time (see :data:`_PIECE_BYTES`): once to check
    that it is UTF-8 text and find its header, once to parse it; so the memory taken
    is about that of the samples, whatever the file's length. Bytes appended while it is
    read (nvidia-smi still writing) are left for a later import.

    Args:
        path: The CSV file.
        node: Host name to store the samples under.
        run_id: Run the samples belong to, or ``None`` for unassigned samples.
        tz: IANA time zone the file's naive timestamps were written in
            (``"UTC"``, ``"Europe/Madrid"``...).

    Returns:
        The samples in the ``samples`` schema (source ``nvidia-smi``,
        timestamps UTC), in file order; ``energy_j`` is null (nvidia-smi has
        no counter). A last line without its newline is left out (and named).

    Raises:
        BadInputError: The file is missing, empty or not UTF-8; the header
            lacks a timestamp or power column, or gives a numeric column a unit
            that cannot be converted; a row has the wrong number of fields; a
            cell's unit is not its column's; the file has no device column but
            holds several GPUs; a timestamp is missing, unparsable, or does not exist in
            ``tz`` (or is ambiguous there); a power value is non-numeric or
            negative; a utilisation lies outside 0-100 %; a numeric cell holds
            something else; timestamps of one device are unsorted or
            duplicated.

    """
    file = str(path)
    if run_id is not None:
        check_run_id(run_id, context=where(file))
    try:
        zone = zoneinfo.ZoneInfo(tz)
    except (zoneinfo.ZoneInfoNotFoundError, ValueError) as err:
        raise BadInputError(
            f"unknown time zone {tz!r}; expected an IANA name such as 'UTC' or 'Europe/Madrid'"
        ) from err
    try:
        f = Path(path).open("rb")
    except FileNotFoundError as err:
        raise BadInputError(f"{file}: expected an nvidia-smi CSV file; no such file") from err
    except OSError as err:
        raise BadInputError(f"{file}: cannot read the file ({err})") from err
    with f:
        return _read(f, file, node=node, run_id=run_id, zone=zone, tz=tz)


def _read(
    f: BinaryIO, file: str, *, node: str, run_id: str | None, zone: zoneinfo.ZoneInfo, tz: str
) -> NvidiaSmiFile:
    """:func:`read_nvidia_smi_file` on an open file."""
    # First pass: the whole file is UTF-8 (that error comes first), not blank, and its header.
    size, header_line, blank = 0, "", True
    for offset, piece, _ in _pieces(f, file, None):
        text = _decode(piece, offset, file)
        if offset == 0:
            header_line = text.partition("\n")[0]
        blank = blank and not text.strip()
        size = offset + len(piece)
    if blank:
        raise BadInputError(
            f"{file}: empty file; expected a header line such as 'timestamp, name, power.draw "
            "[W]' followed by one row per sample"
        )
    header = header_line.split(",")
    if re.match(r"^\s*\d{4}[-/]\d{2}[-/]\d{2}", header_line):
        raise BadInputError(
            f"{where(file, label='header')}expected a header line such as 'timestamp, name, "
            f"power.draw [W]'; found data {header_line[:60]!r}. Record without 'noheader'"
        )
    cols, units = _resolve_header(header, file)
    h = _Header(
        names=header,
        cols=cols,
        units=units,
        label={t: repr(header[i].strip()) for t, i in cols.items()},
        device=next((c for c in ("uuid", "index", "pci") if c in cols), None),
    )
    n_fields = len(header)

    # Second pass: the same bytes (not what was appended since), parsed a piece at a time.
    f.seek(0)
    frames: list[pl.DataFrame] = []
    refused: _RowRefused | None = None
    kept = 0
    first = 0  # line number (0: the header) of the piece's first line, i.e. its data row
    cut_off_row: int | None = None
    cut_off_text: str | None = None
    for offset, piece, last in _pieces(f, file, size):
        lines = pl.Series("line", [_decode(piece, offset, file)], pl.String).str.split("\n")
        lines = lines.explode()
        if not last:  # the piece ends with a newline: no line after it
            lines = lines.head(lines.len() - 1)
        n = lines.len()
        # nvidia-smi ends every line with a newline: a last line without one was cut off
        # while being written, and any of its cells may be cut short ("5" of "54"). Stored,
        # it would conflict with the whole sample when the finished file is imported, so it
        # is left out.
        end = lines[-1] if last else ""
        if first + n > 1 and end.strip() and end != header_line:
            if len(end.split(",")) <= n_fields:
                cut_off_row, cut_off_text = first + n - 1, end[:80]
                lines = lines.head(n - 1)
        df = (
            lines.to_frame()
            .with_row_index("row", offset=first)
            .with_columns(pl.col("row").cast(pl.Int64))
            .filter(
                (pl.col("row") > 0)
                & (pl.col("line").str.strip_chars() != "")
                & (pl.col("line") != header_line)
            )
        )
        first += n
        kept += df.height
        if df.height == 0:
            continue
        try:
            rows = _parse_rows(df, h, file, zone, tz)
        except _RowRefused as err:
            if refused is None or err.check < refused.check:
                refused = err
            frames.clear()  # the file is refused: its samples are not needed
            continue
        if refused is None:
            frames.append(rows)
    if kept == 0 and cut_off_row is None:
        raise BadInputError(
            f"{file}: empty file: the header has no data rows below it; expected one row per sample"
        )
    if refused is not None:
        raise refused.error
    if not frames:  # only a cut-off line: no samples
        frames.append(_parse_rows(df, h, file, zone, tz))
    df = pl.concat(frames)

    dev_col = h.device
    hint = (
        "; if the file holds several GPUs, add index or uuid to --query-gpu"
        if dev_col is None
        else ""
    )
    if dev_col is None:
        _refuse_several_gpus(df, file, h.label)
    check_increasing(df, file=file, key=("device",), hint=hint)
    if dev_col is None:
        _refuse_interleaved_rows(df, file)
    out = df.select(
        pl.lit(run_id, pl.String).alias("run_id"),
        pl.lit(node, pl.String).alias("node"),
        "device",
        "model",
        "timestamp",
        *[pl.col(c) if c in cols else pl.lit(None, pl.Float64).alias(c) for c in _NUMERIC],
        pl.lit("nvidia-smi").alias("source"),
    )
    return NvidiaSmiFile(
        samples=_conform_in_slices(out, file),
        rows=df["row"],
        cut_off_row=cut_off_row,
        cut_off_text=cut_off_text,
    )
