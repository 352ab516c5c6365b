"""A dcgm-exporter look-alike: serves a replayed trace at ``/metrics`` in dcgm-exporter's format.

Each scrape reads the replay source and reports every fake GPU's latest
sample: ``DCGM_FI_DEV_POWER_USAGE`` (W) and, from the replay's counter,
``DCGM_FI_DEV_TOTAL_ENERGY_CONSUMPTION`` (mJ), with the labels ``gpu``,
``UUID``, ``device``, ``modelName`` and ``Hostname``
(:func:`profiler.importers.dcgm.format_dcgm_text`). A real Prometheus can
scrape it, which is how the DCGM source is tested and demonstrated without
a GPU.
"""

from __future__ import annotations

import logging
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from profiler.sources.base import PowerSample, samples_frame
from profiler.sources.replay import ReplaySource

log = logging.getLogger(__name__)

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


class DcgmExporter:
    """Serves a replay source as dcgm-exporter does.

    Args:
        source: The replay (make it ``loop=True, counter=True`` for a
            never-ending fake GPU with an energy counter, as :meth:`for_file` does).
        node: Value of the ``Hostname`` label.
        host: Address to listen on.
        port: Port; 0 picks a free one (see :attr:`port`).
        hostname_label: ``Hostname`` (dcgm-exporter) or ``hostname``.

    Attributes:
        port: The port actually listened on.
        scrapes: How many ``/metrics`` requests were answered.

    """

    def __init__(
        self,
        source: ReplaySource,
        *,
        node: str = "replay-node",
        host: str = "127.0.0.1",
        port: int = 0,
        hostname_label: str = "Hostname",
    ) -> None:
        self.source = source
        self.node = node
        self.hostname_label = hostname_label
        self.scrapes = 0
        self._latest: dict[str, PowerSample] = {}
        self._lock = threading.Lock()
        exporter = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 - the http.server API
                if self.path.split("?")[0] != "/metrics":
                    body = b"wattwise dcgm-exporter look-alike: see /metrics\n"
                    self.send_response(404 if self.path != "/" else 200)
                    self.send_header("Content-Type", "text/plain")
                    self.send_header("Content-Length", str(len(body)))
                    self.end_headers()
                    self.wfile.write(body)
                    return
                body = exporter.metrics_text().encode()
                self.send_response(200)
                self.send_header("Content-Type", CONTENT_TYPE)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
                log.debug("exporter: " + format, *args)

        self._server = ThreadingHTTPServer((host, port), Handler)
        self._server.daemon_threads = True
        self.port: int = self._server.server_address[1]
        self.host = host
        self._thread: threading.Thread | None = None

    @classmethod
    def for_file(
        cls,
        path: str,
        *,
        speed: float = 1.0,
        model: str | None = None,
        gpus: int = 1,
        run_ids: list[str] | None = None,
        **kwargs: Any,
    ) -> DcgmExporter:
        """An exporter replaying a trace file (nvidia-smi CSV, store or traces parquet) forever.

        Args:
            path: The trace file.
            speed: Playback speed (1.0 real time).
            model: Fake GPU model name; default the trace's.
            gpus: When the file holds several runs and ``run_ids`` is not given,
                play this many (the first ones) as GPUs 0, 1, ...
            run_ids: Runs to play, one per fake GPU.
            **kwargs: Passed to the constructor (``node``, ``host``, ``port``).

        """
        src = ReplaySource.from_file(
            path,
            run_ids=run_ids,
            max_runs=None if run_ids else gpus,
            speed=speed,
            model=model,
            device_prefix="",
            loop=True,
            counter=True,
        )
        return cls(src, **kwargs)

    @property
    def url(self) -> str:
        """The metrics URL."""
        return f"http://{self.host}:{self.port}/metrics"

    def metrics_text(self) -> str:
        """The current exposition text (advances the replay)."""
        from profiler.importers.dcgm import format_dcgm_text

        with self._lock:
            for s in self.source.read():
                self._latest[s.device] = s
            self.scrapes += 1
            latest = list(self._latest.values())
        if not latest:
            return ""
        rows = samples_frame(latest, node=self.node).drop("run_id", "source")
        return format_dcgm_text(rows, hostname_label=self.hostname_label)

    def start(self) -> DcgmExporter:
        """Serve in a background thread; returns self."""
        if self._thread is None:
            self._thread = threading.Thread(
                target=self._server.serve_forever, name="wattwise-exporter", daemon=True
            )
            self._thread.start()
        return self

    def serve_forever(self) -> None:
        """Serve in this thread until interrupted."""
        self._server.serve_forever()

    def stop(self) -> None:
        """Stop serving and release the port."""
        if self._thread is not None:
            self._server.shutdown()
            self._thread.join()
            self._thread = None
        self._server.server_close()

    def __enter__(self) -> DcgmExporter:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
