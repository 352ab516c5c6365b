"""The aggregator's small HTTP/JSON API (stdlib ``http.server`` in a thread), localhost by default.

Routes::

    GET  /runs                      every run: status, epochs, measured energy
    GET  /runs/<run_id>             one run's status and STEP projection
    GET  /runs/<run_id>/epochs      per-epoch energy (J), duration (s), gaps (s)
    GET  /runs/<run_id>/projection  the current STEP projection with its band
    GET  /placement?arch=resnet50&batch_size=64&...   placement hints for a job
    POST /placement                 {"arch": "resnet50", "batch_size": 64, ...}: the same
    POST /samples                   {"samples": [{...sample...}, ...]}  -> {"accepted": n}
    POST /epochs                    {"epochs": [{run_id, epoch, start, end}, ...]}

``/placement`` answers exactly what ``wattwise placement --json`` prints for
the same job: the PRE recommendation (newest accepted model in
``<store>/models``) among the inventory's node types, else the default node
type, as Ray resources, a label selector and a k8s nodeSelector. Its fields
are those of the CLI's job options: ``arch`` (required), ``batch_size`` (32),
``image_size`` (224), ``train_size`` (50000), ``validation_size`` (0),
``epochs``, ``node_type`` and ``objective`` (energy, cost, carbon).

Timestamps are ISO 8601 strings with an offset (``2024-01-01T00:00:00+00:00`` or
``...Z``; ``t`` and ``z`` in lower case are read as ``T`` and ``Z``); numbers, booleans and
times without an offset are refused (400), not read as seconds or microseconds since 1970
nor as UTC. So is a time that is no date (``2024-02-30``) or lies outside
:data:`profiler.schema.TIME_MIN` .. :data:`profiler.schema.TIME_END` once in UTC (1970 to
2262: ``9999-12-31T23:59:59-05:00`` is year 10000 in UTC, which no reader could hold).

``image_size`` is at most :data:`MAX_IMAGE_SIZE` and ``batch_size`` at most
:data:`MAX_BATCH_SIZE` here (the aggregator measures a torchvision model at the
job's image size); ``wattwise placement`` has no such bounds.

Security: bound to a non-loopback address, the server refuses to start
without a token of at least :data:`MIN_TOKEN_CHARS` characters, and every
POST needs ``Authorization: Bearer <token>`` (compared in constant time with
:func:`hmac.compare_digest`). The token is never logged nor echoed. Run ids in
paths and bodies must match :data:`profiler.schema.RUN_ID_RE` in full, so no
request reaches a path outside the store. Idle connections are dropped after
:data:`REQUEST_TIMEOUT_S`. Answers are JSON; errors are ``{"error": message}``
with status 400 (bad input), 401 (token), 404 (unknown run or route), 408 (the
body stopped arriving), 413 (body too large), 500 (a failure of the server, logged
with its traceback), 501 (a ``Transfer-Encoding`` other than ``chunked``) or 503 (no
inventory, store refused). A body refused with 401 or 413 is read and thrown away (up
to :data:`MAX_DISCARD` bytes) so that clients which send the whole body before reading,
such as ``urllib`` and ``requests``, get the answer.

A POST body has a ``Content-Length`` or is sent with ``Transfer-Encoding: chunked``
(as ``requests`` does for a generator and ``curl`` with that header); a chunked body
is decoded, at most :data:`MAX_BODY` bytes of it (413 beyond), and bad framing (a
chunk size that is not hexadecimal, a missing CRLF, a body cut short) is a 400. Both
headers at once is a 400, any other transfer coding (``gzip``...) a 501: never an
empty body.
"""

from __future__ import annotations

import hmac
import ipaddress
import json
import logging
import math
import re
import socket
import sys
import threading
import urllib.parse
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from io import BufferedIOBase
from pathlib import Path
from typing import TYPE_CHECKING, Any

import polars as pl

from cluster.aggregator import Aggregator, _jsonable, runs_table
from profiler.errors import BadInputError, SchemaError, WattwiseError, where
from profiler.schema import (
    RUN_ID_RE,
    TIME_RANGE,
    UTC_US,
    check_run_id,
    first_time_out_of_range,
)

if TYPE_CHECKING:
    from estimators.features import JobDescription
    from estimators.pre import PREModel
    from estimators.recommend import NodeType

log = logging.getLogger(__name__)

#: Largest request body accepted, in bytes.
MAX_BODY = 16 * 1024 * 1024
#: Shortest token accepted off loopback, in characters (``secrets.token_urlsafe()`` gives 43).
MIN_TOKEN_CHARS = 16
#: A connection that sends nothing for this long is closed, in s.
REQUEST_TIMEOUT_S = 30.0
#: Most bytes of a refused body (401, 413) read and thrown away before answering, so that
#: clients which send the whole body before reading the answer get it; a larger body is cut off.
MAX_DISCARD = 8 * MAX_BODY
#: Longest chunk-size line or trailer line of a chunked body, in bytes.
MAX_CHUNK_LINE = 8192
#: Most trailer lines after a chunked body's last chunk.
MAX_TRAILERS = 64
#: Largest ``image_size`` of ``/placement``: the aggregator runs the model at that size on CPU.
MAX_IMAGE_SIZE = 1024
#: Largest ``batch_size`` of ``/placement``.
MAX_BATCH_SIZE = 65_536

#: Node types to place on: a fixed list, a function returning the current one, or
#: ``None`` (the connected Ray cluster's, see :func:`cluster.placement.inventory_from_ray`).
Inventory = Sequence["NodeType"] | Callable[[], Sequence["NodeType"]] | None

#: Job fields of ``/placement`` (the CLI's job options) -> default (``None``: unset).
PLACEMENT_FIELDS: dict[str, Any] = {
    "arch": None,
    "batch_size": 32,
    "image_size": 224,
    "train_size": 50_000,
    "validation_size": 0,
    "epochs": None,
    "layers": None,
    "gflops": None,
    "precision": "fp32",
    "deadline_h": None,
    "node_type": None,
    "objective": "energy",
}
_INT_FIELDS = {
    "batch_size": 1,
    "image_size": 1,
    "train_size": 1,
    "validation_size": 0,
    "epochs": 1,
    "layers": 1,
}
#: Number fields of ``/placement`` that must be finite and > 0.
_POSITIVE_FIELDS = ("gflops", "deadline_h")
#: Largest ``train_size``/``validation_size`` and ``epochs`` of ``/placement`` (far above any
#: real job; beyond them the numbers overflow before they mean anything).
MAX_SET_SIZE = 10**12
MAX_EPOCHS = 10**6
_INT_MOST = {
    "batch_size": MAX_BATCH_SIZE,
    "image_size": MAX_IMAGE_SIZE,
    "train_size": MAX_SET_SIZE,
    "validation_size": MAX_SET_SIZE,
    "epochs": MAX_EPOCHS,
    "layers": MAX_EPOCHS,
}
_OFFSET_TIME = r"^\d{4}-\d{2}-\d{2}[Tt ]\d{2}:\d{2}(:\d{2}(\.\d{1,9})?)?([Zz]|[+-]\d{2}(:?\d{2})?)$"
_TIME_EXPECTED = "an ISO 8601 time with an offset, as a string such as '2024-01-01T00:00:00+00:00'"
_OBJECTIVES = ("energy", "cost", "carbon")


def is_loopback(host: str) -> bool:
    """Whether ``host`` only accepts connections from this machine."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_run_ids(df: pl.DataFrame, what: str) -> None:
    """Refuse a frame whose ``run_id`` column holds an id that is not a safe run id in full.

    ``re.match`` with ``$`` accepts a trailing newline; this checks with
    ``fullmatch`` so that a run id ending in a line break is refused like ``../x``.

    Raises:
        SchemaError: The first bad id, quoted.

    """
    if "run_id" not in df.columns or df.schema["run_id"] != pl.String:
        return
    for rid in df["run_id"].drop_nulls().unique().to_list():
        if not RUN_ID_RE.fullmatch(rid):
            raise SchemaError(
                f"{what}: run_id must match {RUN_ID_RE.pattern} in full (letters, digits, '.', "
                f"'_', '-', at most 128, no path separators or line breaks); found {rid!r}"
            )


def _json_type(x: Any) -> str:
    names = {bool: "boolean", int: "number", float: "number", list: "array", dict: "object"}
    return names.get(type(x), type(x).__name__)


def _check_times(rows: list[dict[str, Any]], what: str, time_cols: tuple[str, ...]) -> None:
    """Refuse a time that is not a string (null is left to the schema check).

    polars would cast a number to microseconds since 1970 and a boolean to 0 or 1 us.

    Raises:
        BadInputError: The first such value, with its 1-based row, field and JSON type.

    """
    for i, row in enumerate(rows, 1):
        for c in time_cols:
            x = row.get(c)
            if x is not None and not isinstance(x, str):
                raise BadInputError(
                    f"{where(what, i, repr(c))}expected {_TIME_EXPECTED}; found "
                    f"{_json_type(x)} {json.dumps(x)[:80]}"
                )


def _check_offsets(df: pl.DataFrame, what: str, time_cols: tuple[str, ...]) -> None:
    """Refuse a time string without an offset (polars would read it as UTC).

    Raises:
        BadInputError: The first such value, with its 1-based row and field.

    """
    for c in time_cols:
        if c not in df.columns or df.schema[c] != pl.String:
            continue
        col = pl.col(c)
        bad = df.select(
            ((col.is_not_null() & ~col.str.contains(_OFFSET_TIME)).arg_true().first()).alias("i")
        )["i"][0]
        if bad is not None:
            raise BadInputError(
                f"{where(what, int(bad) + 1, repr(c))}expected {_TIME_EXPECTED}; found "
                f"{df[c][int(bad)][:80]!r}"
            )


def _check_parsed(df: pl.DataFrame, texts: dict[str, pl.Series], what: str) -> None:
    """Refuse a time string polars could not read, or a time outside the store's range.

    Args:
        df: The rows, their time columns parsed (``UTC_US``; null where unreadable).
        texts: Time column -> the strings as sent, for the message.
        what: The body's field, for the message.

    Raises:
        BadInputError: The first such value, with its 1-based row, field and the
            string as sent (and, when out of range, its time in UTC).

    """
    for c, sent in texts.items():
        bad = df.select((pl.col(c).is_null() & sent.is_not_null()).arg_true().first().alias("i"))[
            "i"
        ][0]
        if bad is not None:
            raise BadInputError(
                f"{where(what, int(bad) + 1, repr(c))}expected {_TIME_EXPECTED}, a date and "
                f"time that exist; found {sent[int(bad)][:80]!r}"
            )
    out = first_time_out_of_range(df, list(texts))
    if out is not None:
        row, c, utc = out
        raise BadInputError(
            f"{where(what, row + 1, repr(c))}expected {TIME_RANGE}; found "
            f"{texts[c][row][:80]!r} ({utc} in UTC)"
        )


def _frame(rows: Any, what: str, time_cols: tuple[str, ...]) -> pl.DataFrame:
    if not isinstance(rows, list) or not all(isinstance(r, dict) for r in rows):
        raise BadInputError(f"expected {{{what!r}: [objects]}} in the request body")
    if not rows:
        return pl.DataFrame()
    _check_times(rows, what, time_cols)
    try:
        df = pl.DataFrame(rows, infer_schema_length=None)
        _check_offsets(df, what, time_cols)
        texts = {c: df[c] for c in time_cols if c in df.columns and df.schema[c] == pl.String}
        # Upper case: polars refuses the 't' and 'z' that ISO 8601 allows (the strings
        # passed _OFFSET_TIME, so nothing else in them has a case).
        df = df.with_columns(
            pl.col(c)
            .str.to_uppercase()
            .str.to_datetime(time_unit="us", time_zone="UTC", strict=False)
            for c in texts
        ).with_columns(pl.col(c).cast(UTC_US) for c in time_cols if c in df.columns)
        _check_parsed(df, texts, what)
    except BadInputError:  # _check_offsets, _check_parsed: already say where and why
        raise
    except (pl.exceptions.PolarsError, TypeError, ValueError, OverflowError) as err:
        # polars raises TypeError/ValueError/OverflowError for a column of mixed JSON types
        # or out-of-range numbers; they are bad input like any other.
        raise BadInputError(
            f"{what}: could not read the rows ({err}); expected one JSON type per field and "
            "ISO 8601 times with an offset"
        ) from err
    check_run_ids(df, what)
    return df


def placement_job(
    params: dict[str, Any],
) -> tuple[JobDescription, str | None, str, float | None]:
    """The job, named node type, objective and deadline of a ``/placement`` request.

    Args:
        params: Field -> value (strings from a query, JSON values from a body);
            ``-`` and ``_`` are interchangeable in names.

    Returns:
        (job, node type or ``None``, objective, deadline in s or ``None``), as
        ``wattwise placement`` builds them.

    Raises:
        BadInputError: Unknown or missing field, a value of the wrong type or range.

    """
    from estimators.features import JobDescription

    given = {str(k).replace("-", "_"): v for k, v in params.items()}
    unknown = sorted(set(given) - set(PLACEMENT_FIELDS))
    if unknown:
        raise BadInputError(
            f"placement: unknown field(s) {unknown}; expected some of {list(PLACEMENT_FIELDS)}"
        )
    v = {**PLACEMENT_FIELDS, **{k: x for k, x in given.items() if x is not None}}
    if not isinstance(v["arch"], str) or not v["arch"].strip():
        raise BadInputError(
            "placement: expected 'arch', the architecture (a torchvision name such as resnet50); "
            f"found {v['arch']!r}"
        )
    for name, least in _INT_FIELDS.items():
        x = v[name]
        if x is None:
            continue
        if isinstance(x, str):
            try:
                x = int(x.strip())
            except ValueError:
                raise BadInputError(
                    f"placement: {name!r} must be an integer >= {least}; found {v[name]!r}"
                ) from None
        if isinstance(x, bool) or not isinstance(x, int) or x < least:
            raise BadInputError(
                f"placement: {name!r} must be an integer >= {least}; found {v[name]!r}"
            )
        most = _INT_MOST.get(name)
        if most is not None and x > most:
            why = (
                " (the aggregator measures the model at the job's size)"
                if name in ("batch_size", "image_size")
                else ""
            )
            raise BadInputError(
                f"placement: {name!r} must be an integer from {least} to {most} through the "
                f"API{why}; found {v[name]!r}"
            )
        v[name] = x
    for name in _POSITIVE_FIELDS:
        x = v[name]
        if x is None:
            continue
        try:
            num = float(x.strip()) if isinstance(x, str) else x
        except ValueError:
            num = None
        if (
            isinstance(num, bool)
            or not isinstance(num, int | float)
            or not (math.isfinite(num) and num > 0)
        ):
            raise BadInputError(f"placement: {name!r} must be a finite number > 0; found {x!r}")
        v[name] = float(num)
    if v["deadline_h"] is not None and v["epochs"] is None:
        raise BadInputError(
            "placement: 'deadline_h' needs 'epochs': without the planned epochs the predicted "
            "times are one epoch's"
        )
    if not isinstance(v["precision"], str):
        raise BadInputError(f"placement: 'precision' must be a string; found {v['precision']!r}")
    if v["objective"] not in _OBJECTIVES:
        raise BadInputError(
            f"placement: 'objective' must be one of {list(_OBJECTIVES)}; found {v['objective']!r}"
        )
    if v["node_type"] is not None and not isinstance(v["node_type"], str):
        raise BadInputError(f"placement: 'node_type' must be a string; found {v['node_type']!r}")
    job = JobDescription(
        architecture=v["arch"],
        batch_size=v["batch_size"],
        training_size=v["train_size"],
        validation_size=v["validation_size"],
        image_height=v["image_size"],
        image_width=v["image_size"],
        planned_epochs=v["epochs"],
        precision=v["precision"],
        gflops_forward=v["gflops"],
        layers=v["layers"],
    )
    deadline = None if v["deadline_h"] is None else v["deadline_h"] * 3600
    return job, v["node_type"], v["objective"], deadline


def _query_params(query: str) -> dict[str, str]:
    try:
        pairs = urllib.parse.parse_qsl(
            query, keep_blank_values=True, strict_parsing=bool(query), max_num_fields=32
        )
    except ValueError as err:
        raise BadInputError(f"placement: could not read the query string ({err})") from err
    out: dict[str, str] = {}
    for k, x in pairs:
        if k in out:
            raise BadInputError(f"placement: field {k!r} given twice; give it once")
        out[k] = x
    return out


#: A chunk size: 1 to 16 hexadecimal digits (``int(x, 16)`` would also take ``0x``, ``+``, ``_``).
_CHUNK_SIZE = re.compile(rb"[0-9A-Fa-f]{1,16}")


class _BodyError(Exception):
    """A request body refused for its framing: the HTTP status to answer and the message."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code


def _chunk_line(rfile: BufferedIOBase, ended: str) -> bytes:
    """One line of a chunked body's framing, without its CRLF (or bare LF).

    Args:
        rfile: The connection.
        ended: What was expected next, for the message when the body ends first.

    Raises:
        _BodyError: 400: the body ended before the line's end, or the line is too long.

    """
    line = rfile.readline(MAX_CHUNK_LINE + 1)
    if not line.endswith(b"\n"):
        if len(line) > MAX_CHUNK_LINE:
            raise _BodyError(
                400,
                f"chunked request body: expected chunk-size and trailer lines of at most "
                f"{MAX_CHUNK_LINE} bytes; found a longer one",
            )
        raise _BodyError(400, f"chunked request body: the body ended before {ended}")
    return line[:-1].removesuffix(b"\r")


def _chunk_size(line: bytes) -> int:
    """The size of a chunk from its size line (``;`` extensions are ignored).

    Raises:
        _BodyError: 400: not 1 to 16 hexadecimal digits.

    """
    text = line.split(b";", 1)[0].rstrip(b" \t")
    if not _CHUNK_SIZE.fullmatch(text):
        raise _BodyError(
            400,
            "chunked request body: expected a chunk size in hexadecimal (1 to 16 digits, then "
            f"optional ';' extensions); found {text[:40].decode('latin-1')!r}",
        )
    return int(text, 16)


def _skip_trailers(rfile: BufferedIOBase) -> None:
    """Read the trailer lines after the last chunk, up to the empty line, and drop them.

    Raises:
        _BodyError: 400: more than :data:`MAX_TRAILERS` lines, or the body ended first.

    """
    for _ in range(MAX_TRAILERS + 1):
        if not _chunk_line(rfile, "the empty line after its trailers"):
            return
    raise _BodyError(
        400, f"chunked request body: expected at most {MAX_TRAILERS} trailer lines; found more"
    )


def _read_chunked(rfile: BufferedIOBase, limit: int) -> bytes:
    """Decode a ``Transfer-Encoding: chunked`` body (RFC 9112, section 7.1).

    Sizes are hexadecimal; chunk extensions and trailers are read and dropped; the body
    ends at the 0-size chunk. The limit is checked against each chunk's declared size
    before its data is read.

    Args:
        rfile: The connection, just after the request's headers.
        limit: Most bytes of body accepted.

    Returns:
        The body.

    Raises:
        _BodyError: 413 beyond ``limit`` (after the rest is read and dropped, see
            :func:`_drain_chunked`); 400 for bad framing or a body cut short.

    """
    body = bytearray()
    while (size := _chunk_size(_chunk_line(rfile, "its last (0-size) chunk"))) > 0:
        if len(body) + size > limit:
            found = len(body) + size
            _drain_chunked(rfile, size)
            raise _BodyError(
                413, f"chunked request body exceeds {limit} bytes; found at least {found}"
            )
        data = rfile.read(size)  # waits at most REQUEST_TIMEOUT_S for each piece
        if len(data) < size:
            raise _BodyError(
                400,
                f"chunked request body: the body ended inside a chunk: expected {size} bytes, "
                f"found {len(data)}",
            )
        body += data
        end = _chunk_line(rfile, f"the CRLF after a chunk of {size} bytes")
        if end:
            raise _BodyError(
                400,
                f"chunked request body: expected CRLF after a chunk of {size} bytes; found "
                f"{end[:40].decode('latin-1')!r}",
            )
    _skip_trailers(rfile)
    return bytes(body)


def _drain_chunked(rfile: BufferedIOBase, size: int | None = None) -> None:
    """Read and drop the rest of a chunked body about to be refused, up to :data:`MAX_DISCARD`.

    Stops quietly at the body's end, at bad framing, at the end of the connection or
    at a timeout: the refusal is answered either way.

    Args:
        rfile: The connection.
        size: Bytes of the current chunk still unread, or ``None`` before a size line.

    """
    left = MAX_DISCARD
    try:
        while True:
            if size is None:
                size = _chunk_size(_chunk_line(rfile, "its last (0-size) chunk"))
                if size == 0:
                    return _skip_trailers(rfile)
            while size > 0:
                got = rfile.read(min(size, left, 1 << 16)) if left > 0 else b""
                if not got:
                    return
                size -= len(got)
                left -= len(got)
            if _chunk_line(rfile, "the CRLF after a chunk"):
                return
            size = None
    except (OSError, _BodyError):
        return


class _Handler(BaseHTTPRequestHandler):
    server: _Server
    timeout = REQUEST_TIMEOUT_S
    #: Whether this request's answer has begun (then a failure can only close the connection).
    _answered = False

    def log_message(self, fmt: str, *args: Any) -> None:
        # The request line only: headers (and so the token) are never logged.
        log.debug("api: " + fmt, *args)

    def _send(self, code: int, body: Any) -> None:
        data = json.dumps(_jsonable(body)).encode()
        self._answered = True
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _error(self, code: int, message: str) -> None:
        self._send(code, {"error": message})

    def _failed(self, err: Exception) -> None:
        """Answer an unexpected exception with 500 (logged with its traceback), not a hang-up."""
        self.close_connection = True
        route = f"{self.command} {self.path.partition('?')[0][:200]}"
        if isinstance(err, ConnectionError):  # the client went away: nobody to answer
            log.debug("api: %s: the client closed the connection (%s)", route, err)
            return
        if not isinstance(err, TimeoutError):
            log.error("api: %s failed", route, exc_info=err)
        if self._answered:  # the answer was under way: it cannot be replaced
            return
        if isinstance(err, TimeoutError):  # the body stopped arriving
            return self._error(
                408, f"{route}: the request stopped arriving for {REQUEST_TIMEOUT_S:g} s"
            )
        first = (str(err).splitlines() or [""])[0][:300]
        self._error(
            500,
            f"internal error in {route}: {type(err).__name__}: {first}; the aggregator's log "
            "has the traceback",
        )

    def _discard_body(self, length: int | None) -> None:
        """Read and drop up to :data:`MAX_DISCARD` bytes of a body about to be refused.

        A client that sends its whole body before reading (urllib, http.client,
        requests) gets a broken pipe instead of the answer when the server
        closes with the body unread. A client that sent ``Expect: 100-continue``
        waits for the answer instead, so nothing is read.

        Args:
            length: The body's Content-Length, or ``None`` for a chunked body.

        """
        self.close_connection = True
        if self.headers.get("Expect", "").strip().lower() == "100-continue":
            return
        if length is None:
            return _drain_chunked(self.rfile)
        left = min(length, MAX_DISCARD)
        try:
            while left > 0:
                chunk = self.rfile.read(min(left, 1 << 16))  # waits at most REQUEST_TIMEOUT_S
                if not chunk:
                    return
                left -= len(chunk)
        except OSError:  # timeout or reset: answer anyway, the client may still read it
            return

    def do_GET(self) -> None:  # noqa: N802 - http.server's naming
        self._answered = False
        agg = self.server.agg
        path, _, query = self.path.partition("?")
        parts = [p for p in path.split("/") if p]
        try:
            if parts == ["runs"]:
                return self._send(200, runs_table(agg))
            if parts == ["placement"]:
                return self._placement(_query_params(query))
            if len(parts) >= 2 and parts[0] == "runs":
                run_id = check_run_id(parts[1])
                if len(parts) == 2:
                    return self._send(200, agg.status(run_id))
                if parts[2:] == ["epochs"]:
                    return self._send(200, agg.epochs(run_id).to_dicts())
                if parts[2:] == ["projection"]:
                    return self._send(200, agg.projection(run_id))
            return self._error(
                404, f"no route GET {path[:200]!r}; see GET /runs or GET /placement?arch=..."
            )
        except BadInputError as err:
            code = 404 if str(err).startswith("no run") else 400
            return self._error(code, str(err))
        except WattwiseError as err:
            return self._error(500, str(err))
        except Exception as err:  # a bug or a resource failure: answer 500, not a dropped line
            return self._failed(err)

    def _placement(self, params: dict[str, Any]) -> None:
        job, node_type, objective, deadline_s = placement_job(params)
        try:
            inventory = self.server.placement_inventory()
        except BadInputError as err:
            return self._error(503, f"placement: no node types to place on: {err}")
        model = None if node_type is not None else self.server.placement_model()
        from cluster.placement import recommend_hints

        with self.server.placement_lock:  # one XGBoost prediction at a time
            hints = recommend_hints(
                job,
                inventory,
                model,
                objective=objective,
                node_type=node_type,
                deadline_s=deadline_s,
            )
        return self._send(200, hints)

    def do_POST(self) -> None:  # noqa: N802 - http.server's naming
        self._answered = False
        try:
            self._post()
        except Exception as err:  # a bug or a resource failure: answer 500, not a dropped line
            self._failed(err)

    def _body_length(self) -> int | None:
        """The body's length from ``Content-Length``, or ``None`` for a chunked body.

        Raises:
            _BodyError: 501 for a transfer coding other than ``chunked`` alone; 400 for
                both headers at once or a Content-Length that is not an integer >= 0.

        """
        codings = [
            c.strip() for h in self.headers.get_all("Transfer-Encoding", []) for c in h.split(",")
        ]
        if codings:
            if [c.lower() for c in codings] != ["chunked"]:
                raise _BodyError(
                    501,
                    f"Transfer-Encoding {', '.join(codings)[:100]!r} is not supported; expected "
                    "'chunked' alone or a Content-Length",
                )
            if self.headers.get("Content-Length") is not None:
                raise _BodyError(
                    400,
                    "expected either Content-Length or Transfer-Encoding: chunked; found both "
                    "(the body's length is ambiguous)",
                )
            return None
        given = self.headers.get("Content-Length") or "0"
        try:
            length = int(given)
        except ValueError:
            raise _BodyError(
                400, f"Content-Length must be an integer; found {given[:40]!r}"
            ) from None
        if length < 0:  # rfile.read(-1) would wait for the client to close the connection
            raise _BodyError(400, f"Content-Length must be >= 0; found {length}")
        return length

    def _post(self) -> None:
        agg = self.server.agg
        token = self.server.token
        refused: _BodyError | None = None
        try:
            length = self._body_length()
        except _BodyError as err:
            length, refused = 0, err
        if token is not None:
            given = self.headers.get("Authorization", "")
            # Both sides as UTF-8 bytes: compare_digest refuses non-ASCII str.
            if not hmac.compare_digest(given.encode(), f"Bearer {token}".encode()):
                self._discard_body(length)
                return self._error(401, "writes need 'Authorization: Bearer <token>'")
        if refused is not None:  # the body's end is unknown: the connection cannot be reused
            self.close_connection = True
            return self._error(refused.code, str(refused))
        if length is not None and length > MAX_BODY:
            self._discard_body(length)
            return self._error(413, f"request body of {length} bytes exceeds {MAX_BODY}")
        path = self.path.partition("?")[0]
        try:
            if length is None:
                raw = _read_chunked(self.rfile, MAX_BODY)
            else:
                raw = self.rfile.read(length)
            raw = raw or b"{}"
            try:
                body = json.loads(raw)
            except (UnicodeDecodeError, RecursionError) as err:
                # json raises these (not JSONDecodeError) for non-UTF-8 bytes and deep nesting.
                why = "is not UTF-8" if isinstance(err, UnicodeDecodeError) else "nests too deep"
                return self._error(400, f"expected a JSON body in UTF-8; the body {why} ({err})")
            if path == "/samples":
                df = _frame(
                    body.get("samples") if isinstance(body, dict) else None,
                    "samples",
                    ("timestamp",),
                )
                return self._send(200, {"accepted": agg.ingest_samples(df) if df.height else 0})
            if path == "/epochs":
                df = _frame(
                    body.get("epochs") if isinstance(body, dict) else None,
                    "epochs",
                    ("start", "end"),
                )
                return self._send(200, {"accepted": agg.ingest_epochs(df) if df.height else 0})
            if path == "/placement":
                if not isinstance(body, dict):
                    raise BadInputError("placement: expected a JSON object describing the job")
                return self._placement(body)
            return self._error(
                404, f"no route POST {path[:200]!r}; use /samples, /epochs or /placement"
            )
        except _BodyError as err:  # the chunked body's end is unknown: close the connection
            self.close_connection = True
            return self._error(err.code, str(err))
        except json.JSONDecodeError as err:
            return self._error(400, f"expected a JSON body; {err}")
        except BadInputError as err:
            return self._error(400, str(err))
        except WattwiseError as err:
            return self._error(503, str(err))


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(
        self,
        addr: tuple[str, int],
        agg: Aggregator,
        token: str | None,
        inventory: Inventory = None,
        models: Path | None = None,
    ) -> None:
        if ":" in addr[0]:
            self.address_family = socket.AF_INET6
        super().__init__(addr, _Handler)
        self.agg = agg
        self.token = token
        self.inventory = inventory
        self.models = models
        self.placement_lock = threading.Lock()
        self._model_key: tuple[str, int] | None = None
        self._model: PREModel | None = None

    def __repr__(self) -> str:  # never show the token
        return f"<wattwise API on {self.server_address[:2]}>"

    def placement_inventory(self) -> list[NodeType]:
        """The node types to place on (see :data:`Inventory`).

        Raises:
            BadInputError: None given and no Ray connection, or none names a GPU model.

        """
        inv = self.inventory
        if callable(inv):
            return list(inv())
        if inv is not None:
            return list(inv)
        ray = sys.modules.get("ray")  # only ask Ray when this process is connected to it
        if ray is None or not ray.is_initialized():
            raise BadInputError(
                "this API was started without an inventory and outside a Ray cluster; start it "
                "with 'wattwise aggregator start --port N' on the cluster"
            )
        from cluster.placement import inventory_from_ray

        return inventory_from_ray(ray.nodes())

    def placement_model(self) -> PREModel | None:
        """The newest accepted PRE model of the store (reloaded when a new one appears)."""
        from cluster.retrain import latest_model, versions

        folder = self.models
        if folder is None:
            if self.agg.store is None:
                return None
            folder = self.agg.store.root / "models"
        have = versions(folder)
        if not have:
            return None
        newest = folder / f"pre-v{have[-1]}.json"
        try:
            key = (str(newest), newest.stat().st_mtime_ns)
        except OSError:
            return None
        if key != self._model_key:
            try:
                self._model = latest_model(folder)
            except BadInputError as err:
                # As the CLI: without a usable model, the default node type (and say why).
                log.warning("placement: no usable PRE model (%s); using the default node type", err)
                self._model = None
            self._model_key = key
        return self._model


@dataclass
class ApiServer:
    """A running API server.

    Attributes:
        url: Base URL, e.g. ``http://127.0.0.1:8765``.
        server: The underlying HTTP server.
        thread: The thread serving it.

    """

    url: str
    server: _Server
    thread: threading.Thread

    def close(self) -> None:
        """Stop serving and release the port."""
        self.server.shutdown()
        self.server.server_close()


def serve(
    agg: Aggregator,
    *,
    host: str = "127.0.0.1",
    port: int = 0,
    token: str | None = None,
    inventory: Inventory = None,
    models: str | Path | None = None,
) -> ApiServer:
    """Serve ``agg`` over HTTP in a background thread.

    Args:
        agg: The aggregator to answer for.
        host: Address to bind; loopback by default.
        port: TCP port; 0 picks a free one.
        token: Bearer token for writes (every POST); required off loopback, at
            least :data:`MIN_TOKEN_CHARS` characters there.
        inventory: Node types for ``/placement`` (see :data:`Inventory`).
        models: PRE model folder for ``/placement``; default ``<store>/models``.

    Raises:
        BadInputError: A non-loopback address without a token, or with a short one.

    """
    if not is_loopback(host):
        if not token:
            raise BadInputError(
                f"the API would accept writes from the network on {host}; give a token "
                "(--token or $WATTWISE_API_TOKEN) or bind to 127.0.0.1"
            )
        if len(token) < MIN_TOKEN_CHARS:
            raise BadInputError(
                f"the API token for {host} has {len(token)} characters; expected at least "
                f"{MIN_TOKEN_CHARS} (e.g. python -c 'import secrets; "
                "print(secrets.token_urlsafe())')"
            )
    server = _Server(
        (host, port), agg, token, inventory, Path(models) if models is not None else None
    )
    thread = threading.Thread(target=server.serve_forever, name="wattwise-api", daemon=True)
    thread.start()
    bound_host, bound_port = str(server.server_address[0]), int(server.server_address[1])
    shown = f"[{bound_host}]" if ":" in bound_host else bound_host
    return ApiServer(f"http://{shown}:{bound_port}", server, thread)
