"""POST bodies sent with ``Transfer-Encoding: chunked`` against a real API server (no Ray).

A chunked body used to be read as empty: the client got a misleading 400 and its samples were
not stored. Requests are written by hand over a socket, so the framing is exactly the one named.
"""

from __future__ import annotations

import http.client
import json
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests

from cluster.aggregator import Aggregator
from cluster.api import MAX_BODY, ApiServer, serve
from profiler.store import Store

#: Valid power samples and an epoch as a sidecar would post them.
SAMPLES = [
    {
        "run_id": "r1",
        "node": "n1",
        "device": "0",
        "timestamp": f"2024-01-01T00:00:0{i}+00:00",
        "power_w": 100.0 + i,
        "source": "nvml",
    }
    for i in range(3)
]
EPOCH = {"run_id": "r1", "epoch": 0, "start": "2024-01-01T00:00:00Z", "end": "2024-01-01T00:01:00Z"}


@pytest.fixture
def api(tmp_path: Path) -> Iterator[ApiServer]:
    server = serve(Aggregator(Store(tmp_path / "store")))
    try:
        yield server
    finally:
        server.close()


def _chunked(*parts: bytes, ext: bytes = b"", trailers: bytes = b"") -> bytes:
    """``parts`` as chunks (each size line with ``ext``), the last chunk and ``trailers``."""
    body = b"".join(f"{len(p):x}".encode() + ext + b"\r\n" + p + b"\r\n" for p in parts)
    return body + b"0\r\n" + trailers + b"\r\n"


def _raw_post(
    api: ApiServer,
    path: str,
    headers: dict[str, str],
    body: bytes,
    *,
    shut: bool = False,
) -> tuple[int, Any]:
    """Send a POST exactly as given (``shut``: then close the sending side) and read the answer."""
    host, port = str(api.server.server_address[0]), int(api.server.server_address[1])
    with socket.create_connection((host, port), timeout=60) as sock:
        head = [f"POST {path} HTTP/1.1", f"Host: {host}:{port}"]
        head += [f"{k}: {v}" for k, v in headers.items()]
        sock.sendall(("\r\n".join(head) + "\r\n\r\n").encode() + body)
        if shut:
            sock.shutdown(socket.SHUT_WR)
        r = http.client.HTTPResponse(sock)
        r.begin()
        return r.status, json.loads(r.read())


def _stored_samples(api: ApiServer) -> int:
    api.server.agg.flush()
    store = api.server.agg.store
    assert store is not None
    return store.samples("r1").height


CHUNKED = {"Transfer-Encoding": "chunked", "Content-Type": "application/json"}


def test_a_chunked_body_is_decoded_and_its_samples_stored(api: ApiServer) -> None:
    data = json.dumps({"samples": SAMPLES}).encode()
    parts = (data[:7], data[7:100], data[100:])  # split inside keys and values
    got = _raw_post(api, "/samples", CHUNKED, _chunked(*parts))
    assert got == (200, {"accepted": 3})  # was 400 "expected {'samples': [objects]}"
    assert _stored_samples(api) == 3
    # Chunk extensions and trailers are allowed and ignored; hex sizes in either case.
    data = json.dumps({"epochs": [EPOCH]}).encode()
    body = _chunked(data[:20], data[20:], ext=b";name=value", trailers=b"X-Checksum: abc\r\n")
    body = body.replace(f"{len(data) - 20:x}".encode(), f"{len(data) - 20:X}".encode(), 1)
    assert _raw_post(api, "/epochs", CHUNKED, body) == (200, {"accepted": 1})
    store = api.server.agg.store
    assert store is not None
    assert store.epochs("r1").height == 1


def test_clients_that_stream_a_body_get_it_stored(api: ApiServer) -> None:
    data = json.dumps({"samples": SAMPLES}).encode()
    # requests sends a generator body with Transfer-Encoding: chunked and no Content-Length.
    r = requests.post(api.url + "/samples", data=iter([data[:50], data[50:]]), timeout=60)
    assert r.request.headers.get("Transfer-Encoding") == "chunked"
    assert (r.status_code, r.json()) == (200, {"accepted": 3})
    host, port = api.server.server_address[:2]
    conn = http.client.HTTPConnection(str(host), int(port), timeout=60)
    try:  # http.client chunks an iterable body too
        conn.request("POST", "/samples", body=iter([data]), encode_chunked=True)
        r2 = conn.getresponse()
        assert (r2.status, json.loads(r2.read())) == (200, {"accepted": 3})
    finally:
        conn.close()
    assert _stored_samples(api) == 3  # the same 3 samples, stored once


def test_a_chunked_body_over_the_limit_is_a_413(api: ApiServer) -> None:
    piece = b" " * (1 << 20)
    n = MAX_BODY // len(piece) + 2
    got = _raw_post(api, "/samples", CHUNKED, _chunked(*[piece] * n))
    assert got == (
        413,
        {
            "error": f"chunked request body exceeds {MAX_BODY} bytes; found at least "
            f"{MAX_BODY + len(piece)}"
        },
    )
    # requests streaming the same: it sends everything before reading, so the body is drained.
    r = requests.post(api.url + "/samples", data=iter([piece] * n), timeout=60)
    assert r.status_code == 413 and "exceeds" in r.json()["error"]
    # Exactly at the limit is read (and is then not JSON).
    whitespace = _chunked(*[piece] * (MAX_BODY // len(piece)))
    assert _raw_post(api, "/samples", CHUNKED, whitespace)[0] == 400


@pytest.mark.parametrize(
    ("body", "found"),
    [
        (b"zz\r\n", "found 'zz'"),
        (b"0x5\r\nhello\r\n0\r\n\r\n", "found '0x5'"),  # int(x, 16) would take it
        (b"+5\r\nhello\r\n0\r\n\r\n", "found '+5'"),
        (b"-5\r\n", "found '-5'"),
        (b"1_0\r\n", "found '1_0'"),
        (b" 5\r\nhello\r\n0\r\n\r\n", "found ' 5'"),
        (b"\r\n", "found ''"),
        (b"11111111111111111\r\n", "found '11111111111111111'"),  # 17 hex digits
    ],
)
def test_a_malformed_chunk_size_is_a_400(api: ApiServer, body: bytes, found: str) -> None:
    code, got = _raw_post(api, "/samples", CHUNKED, body)
    assert code == 400
    assert got["error"].startswith("chunked request body: expected a chunk size in hexadecimal")
    assert got["error"].endswith(found)
    assert _stored_samples(api) == 0


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (b"5\r\nhelloXX\r\n0\r\n\r\n", "expected CRLF after a chunk of 5 bytes; found 'XX'"),
        (b"5\r\nhel", "the body ended inside a chunk: expected 5 bytes, found 3"),
        (b"5\r\nhello\r\n", "the body ended before its last (0-size) chunk"),
        (b"0\r\nX-Trailer: 1\r\n", "the body ended before the empty line after its trailers"),
    ],
)
def test_a_chunked_body_cut_short_or_misframed_is_a_400(
    api: ApiServer, body: bytes, message: str
) -> None:
    code, got = _raw_post(api, "/samples", CHUNKED, body, shut=True)
    assert (code, got) == (400, {"error": f"chunked request body: {message}"})


@pytest.mark.parametrize("coding", ["gzip", "gzip, chunked", "chunked, gzip", "identity", "br"])
def test_an_unsupported_transfer_encoding_is_a_501_never_an_empty_body(
    api: ApiServer, coding: str
) -> None:
    body = _chunked(json.dumps({"samples": SAMPLES}).encode())
    headers = {"Transfer-Encoding": coding}
    code, got = _raw_post(api, "/samples", headers, body)
    assert (code, got) == (
        501,
        {
            "error": f"Transfer-Encoding {coding!r} is not supported; expected 'chunked' alone "
            "or a Content-Length"
        },
    )
    assert _stored_samples(api) == 0


def test_content_length_and_transfer_encoding_together_are_a_400(api: ApiServer) -> None:
    body = _chunked(json.dumps({"samples": SAMPLES}).encode())
    headers = {"Content-Length": str(len(body)), "Transfer-Encoding": "chunked"}
    code, got = _raw_post(api, "/samples", headers, body)
    assert (code, got) == (
        400,
        {
            "error": "expected either Content-Length or Transfer-Encoding: chunked; found both "
            "(the body's length is ambiguous)"
        },
    )
    assert _stored_samples(api) == 0


def test_a_content_length_body_is_still_read(api: ApiServer) -> None:
    data = json.dumps({"samples": SAMPLES}).encode()
    headers = {"Content-Length": str(len(data)), "Content-Type": "application/json"}
    assert _raw_post(api, "/samples", headers, data) == (200, {"accepted": 3})
    assert _stored_samples(api) == 3


def test_a_chunked_body_without_the_token_gets_the_401(tmp_path: Path) -> None:
    token = "t" * 32
    server = serve(Aggregator(Store(tmp_path / "store")), host="0.0.0.0", token=token)
    url = f"http://127.0.0.1:{server.server.server_address[1]}/samples"
    data = json.dumps({"samples": SAMPLES * 20_000}).encode()  # 7 MB, streamed
    pieces = [data[i : i + (1 << 16)] for i in range(0, len(data), 1 << 16)]
    try:
        r = requests.post(url, data=iter(pieces), timeout=60)
        assert (r.status_code, r.json()) == (
            401,
            {"error": "writes need 'Authorization: Bearer <token>'"},
        )
        auth = {"Authorization": f"Bearer {token}"}
        r = requests.post(url, data=iter(pieces), headers=auth, timeout=60)
        assert (r.status_code, r.json()) == (200, {"accepted": 60_000})
    finally:
        server.close()
