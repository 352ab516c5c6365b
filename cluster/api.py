"""The aggregator's small HTTP/JSON API (stdlib ``http.server`` in a thread), localhost by default.

Routes::

    GET  /runs                      every run: status, epochs, measured energy
    GET  /runs/<run_id>             one run's status and STEP projection
    GET  /runs/<run_id>/epochs      per-epoch energy (J), duration (s), gaps (s)
    GET  /runs/<run_id>/projection  the current STEP projection with its band
    POST /samples                   {"samples": [{...sample...}, ...]}  -> {"accepted": n}
    POST /epochs                    {"epochs": [{run_id, epoch, start, end}, ...]}

Timestamps are ISO 8601 strings with an offset (``2024-01-01T00:00:00+00:00``).
Bound to a non-loopback address, the server refuses to start without a
token, and writes need ``Authorization: Bearer <token>`` (compared in
constant time). Answers are JSON; errors are ``{"error": message}`` with
status 400 (bad input), 401 (token), 404 (unknown run or route) or 413.
"""

from __future__ import annotations

import hmac
import ipaddress
import json
import logging
import threading
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import polars as pl

from cluster.aggregator import Aggregator, _jsonable, runs_table
from profiler.errors import BadInputError, WattwiseError
from profiler.schema import UTC_US, check_run_id

log = logging.getLogger(__name__)

#: Largest request body accepted, in bytes.
MAX_BODY = 16 * 1024 * 1024


def is_loopback(host: str) -> bool:
    """Whether ``host`` only accepts connections from this machine."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _frame(rows: Any, what: str, time_cols: tuple[str, ...]) -> pl.DataFrame:
    if not isinstance(rows, list) or not all(isinstance(r, dict) for r in rows):
        raise BadInputError(f"expected {{{what!r}: [objects]}} in the request body")
    if not rows:
        return pl.DataFrame()
    try:
        df = pl.DataFrame(rows, infer_schema_length=None)
        return df.with_columns(
            pl.col(c).str.to_datetime(time_unit="us", time_zone="UTC")
            for c in time_cols
            if c in df.columns and df.schema[c] == pl.String
        ).with_columns(pl.col(c).cast(UTC_US) for c in time_cols if c in df.columns)
    except (pl.exceptions.PolarsError, TypeError, ValueError, OverflowError) as err:
        # polars raises TypeError/ValueError/OverflowError for a column of mixed JSON types
        # or out-of-range numbers; they are bad input like any other.
        raise BadInputError(
            f"{what}: could not read the rows ({err}); expected one JSON type per field and "
            "ISO 8601 times with an offset"
        ) from err


class _Handler(BaseHTTPRequestHandler):
    server: _Server

    def log_message(self, fmt: str, *args: Any) -> None:
        log.debug("api: " + fmt, *args)

    def _send(self, code: int, body: Any) -> None:
        data = json.dumps(_jsonable(body)).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _error(self, code: int, message: str) -> None:
        self._send(code, {"error": message})

    def do_GET(self) -> None:  # noqa: N802 - http.server's naming
        agg = self.server.agg
        parts = [p for p in self.path.split("?")[0].split("/") if p]
        try:
            if parts == ["runs"]:
                return self._send(200, runs_table(agg))
            if len(parts) >= 2 and parts[0] == "runs":
                run_id = check_run_id(parts[1])
                if len(parts) == 2:
                    return self._send(200, agg.status(run_id))
                if parts[2:] == ["epochs"]:
                    return self._send(200, agg.epochs(run_id).to_dicts())
                if parts[2:] == ["projection"]:
                    return self._send(200, agg.projection(run_id))
            return self._error(404, f"no route GET {self.path}; see GET /runs")
        except BadInputError as err:
            code = 404 if str(err).startswith("no run") else 400
            return self._error(code, str(err))
        except WattwiseError as err:
            return self._error(500, str(err))

    def do_POST(self) -> None:  # noqa: N802 - http.server's naming
        agg = self.server.agg
        token = self.server.token
        if token is not None:
            given = self.headers.get("Authorization", "")
            if not hmac.compare_digest(given.encode(), f"Bearer {token}".encode()):
                return self._error(401, "writes need 'Authorization: Bearer <token>'")
        try:
            length = int(self.headers.get("Content-Length") or 0)
        except ValueError:
            return self._error(400, "Content-Length must be an integer")
        if length > MAX_BODY:
            return self._error(413, f"request body of {length} bytes exceeds {MAX_BODY}")
        try:
            raw = self.rfile.read(length) or b"{}"
            try:
                body = json.loads(raw)
            except (UnicodeDecodeError, RecursionError) as err:
                # json raises these (not JSONDecodeError) for non-UTF-8 bytes and deep nesting.
                why = "is not UTF-8" if isinstance(err, UnicodeDecodeError) else "nests too deep"
                return self._error(400, f"expected a JSON body in UTF-8; the body {why} ({err})")
            if self.path == "/samples":
                df = _frame(
                    body.get("samples") if isinstance(body, dict) else None,
                    "samples",
                    ("timestamp",),
                )
                return self._send(200, {"accepted": agg.ingest_samples(df) if df.height else 0})
            if self.path == "/epochs":
                df = _frame(
                    body.get("epochs") if isinstance(body, dict) else None,
                    "epochs",
                    ("start", "end"),
                )
                return self._send(200, {"accepted": agg.ingest_epochs(df) if df.height else 0})
            return self._error(404, f"no route POST {self.path}; use /samples or /epochs")
        except json.JSONDecodeError as err:
            return self._error(400, f"expected a JSON body; {err}")
        except BadInputError as err:
            return self._error(400, str(err))
        except WattwiseError as err:
            return self._error(503, str(err))


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, addr: tuple[str, int], agg: Aggregator, token: str | None) -> None:
        super().__init__(addr, _Handler)
        self.agg = agg
        self.token = token


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
    agg: Aggregator, *, host: str = "127.0.0.1", port: int = 0, token: str | None = None
) -> ApiServer:
    """Serve ``agg`` over HTTP in a background thread.

    Args:
        agg: The aggregator to answer for.
        host: Address to bind; loopback by default.
        port: TCP port; 0 picks a free one.
        token: Bearer token for writes; required when ``host`` is not loopback.

    Raises:
        BadInputError: A non-loopback address without a token.

    """
    if not is_loopback(host) and not token:
        raise BadInputError(
            f"the API would accept writes from the network on {host}; give a token "
            "(--token or $WATTWISE_API_TOKEN) or bind to 127.0.0.1"
        )
    server = _Server((host, port), agg, token)
    thread = threading.Thread(target=server.serve_forever, name="wattwise-api", daemon=True)
    thread.start()
    bound_host, bound_port = str(server.server_address[0]), int(server.server_address[1])
    return ApiServer(f"http://{bound_host}:{bound_port}", server, thread)
