"""DCGM sources: a node's GPU power and energy from Prometheus or straight from a dcgm-exporter.

Metrics: ``DCGM_FI_DEV_POWER_USAGE`` (W, gauge) and
``DCGM_FI_DEV_TOTAL_ENERGY_CONSUMPTION`` (mJ, counter; converted to J here).
A device is named by its ``UUID`` label (else ``gpu``), as
:mod:`profiler.importers.dcgm` does; ``device_aliases`` maps the ``gpu``
index (what Ray hands a job) to that UUID, so a job attached by GPU index
gets its GPU's samples. Errors are mapped at this boundary::

    connection refused, timeout, DNS      -> SourceUnavailableError
    HTTP 401 / 403                        -> PermissionDeniedError
    no DCGM series for the node           -> SourceUnavailableError (lists the hosts seen)
"""

from __future__ import annotations

import logging
import math
import re
import urllib.error
import urllib.request
from datetime import UTC, datetime
from typing import Any

from profiler.errors import BadInputError, PermissionDeniedError, SourceUnavailableError
from profiler.sources.base import PowerSample, frame_samples, utc_now

log = logging.getLogger(__name__)

POWER = "DCGM_FI_DEV_POWER_USAGE"
ENERGY = "DCGM_FI_DEV_TOTAL_ENERGY_CONSUMPTION"
HOST_LABELS = ("Hostname", "hostname")
#: Longest range one Prometheus read asks for, in s (after an outage of the query path).
MAX_WINDOW_S = 3600
_LABEL_RE = re.compile(r'(\w+)="((?:[^"\\]|\\.)*)"')


def _aliases_from_text(text: str) -> dict[str, str]:
    """GPU index -> UUID from the labels of dcgm-exporter text (lines with both labels)."""
    out: dict[str, str] = {}
    for line in text.splitlines():
        if line.startswith("#") or "{" not in line or "}" not in line:
            continue
        labels = dict(_LABEL_RE.findall(line[line.index("{") : line.index("}") + 1]))
        if labels.get("gpu") and labels.get("UUID"):
            out[labels["gpu"]] = labels["UUID"]
    return out


class DcgmExporterSource:
    """Scrapes a dcgm-exporter ``/metrics`` endpoint directly.

    Args:
        url: The endpoint, e.g. ``http://node-1:9400/metrics``.
        node: Node name for the samples; default the ``Hostname`` label.
        timeout_s: HTTP timeout in s.

    Raises:
        SourceUnavailableError: The endpoint cannot be reached (checked at once).

    """

    name = "dcgm"

    def __init__(self, url: str, *, node: str | None = None, timeout_s: float = 2.0) -> None:
        self.url = url
        self.node = node
        self.timeout_s = timeout_s
        #: GPU index (the ``gpu`` label, what Ray hands a job) -> the UUID samples are named by.
        self.device_aliases: dict[str, str] = {}
        self.device_aliases.update(_aliases_from_text(self._fetch()))

    def _fetch(self) -> str:
        try:
            with urllib.request.urlopen(self.url, timeout=self.timeout_s) as resp:
                return resp.read().decode("utf-8")  # type: ignore[no-any-return]
        except urllib.error.HTTPError as err:
            if err.code in (401, 403):
                raise PermissionDeniedError(
                    f"dcgm-exporter at {self.url} refused access (HTTP {err.code})"
                ) from err
            raise SourceUnavailableError(
                f"dcgm-exporter at {self.url} answered HTTP {err.code}; expected 200 with metrics"
            ) from err
        except (urllib.error.URLError, OSError) as err:
            raise SourceUnavailableError(
                f"cannot reach dcgm-exporter at {self.url} ({err}); is it running, and is the "
                "port right (dcgm-exporter's default is 9400)?"
            ) from err

    def read(self) -> list[PowerSample]:
        """One sample per GPU from one scrape, stamped with the scrape time."""
        from profiler.importers.dcgm import parse_dcgm_text

        ts = utc_now()
        text = self._fetch()
        df = parse_dcgm_text(text, timestamp=ts, node=self.node, file=self.url)
        self.device_aliases.update(_aliases_from_text(text))
        return frame_samples(df, source="dcgm")

    def close(self) -> None:
        """Nothing held between scrapes."""


class DcgmPrometheusSource:
    """Reads a node's DCGM series from a Prometheus server.

    Each read fetches the raw samples Prometheus scraped since the previous
    read (a range selector over the elapsed time), so every scrape is returned
    once with its own scrape timestamp, whatever the read interval.

    Args:
        url: Prometheus base URL, e.g. ``http://prometheus:9090``.
        hostname: Node whose GPUs to read (value of the ``Hostname`` or
            ``hostname`` label).
        timeout_s: HTTP timeout in s.
        lookback_s: How far back the first read looks, in s.

    Raises:
        SourceUnavailableError: Prometheus cannot be reached, or it has no DCGM
            series for ``hostname`` (the message lists the hosts it has).
        PermissionDeniedError: Prometheus refused the credentials.

    """

    name = "dcgm"

    def __init__(
        self, url: str, *, hostname: str, timeout_s: float = 5.0, lookback_s: float = 10.0
    ) -> None:
        from prometheus_api_client import PrometheusConnect
        from urllib3.util.retry import Retry

        if not hostname or '"' in hostname or "\\" in hostname:
            raise BadInputError(
                f"expected a plain host name for the DCGM source; found {hostname!r}"
            )
        self.url = url
        self.hostname = hostname
        self.timeout_s = timeout_s
        self.lookback_s = lookback_s
        # One quick retry: the sidecar asks again next tick, so long back-offs only stall it.
        self._prom = PrometheusConnect(
            url=url, disable_ssl=True, timeout=timeout_s, retry=Retry(total=1, backoff_factor=0)
        )
        self._label: str | None = None
        self._last: dict[str, float] = {}  # device -> last timestamp returned, s since 1970
        self._last_read: float | None = None
        #: GPU index (the ``gpu`` label, what Ray hands a job) -> the UUID samples are named by.
        self.device_aliases: dict[str, str] = {}
        for label in HOST_LABELS:
            found = self._query(f'{POWER}{{{label}="{hostname}"}}')
            if found:
                self._label = label
                self._note_aliases(found)
                break
        if self._label is None:
            hosts = sorted(
                {
                    r["metric"].get(lab, "")
                    for r in self._query(f"count by (Hostname, hostname) ({POWER})")
                    for lab in HOST_LABELS
                }
                - {""}
            )
            raise SourceUnavailableError(
                f"Prometheus at {url} has no {POWER} series with Hostname or hostname "
                f"{hostname!r}; hosts it has: {hosts or 'none'}. Check the node name and that "
                "Prometheus scrapes that node's dcgm-exporter"
            )

    def _query(self, promql: str) -> list[dict[str, Any]]:
        import requests
        from prometheus_api_client.exceptions import PrometheusApiClientException

        try:
            return self._prom.custom_query(promql)  # type: ignore[no-any-return]
        except PrometheusApiClientException as err:
            text = str(err)
            if "401" in text or "403" in text:
                raise PermissionDeniedError(
                    f"Prometheus at {self.url} refused access: {text}"
                ) from err
            raise SourceUnavailableError(
                f"Prometheus at {self.url} failed the query {promql!r}: {text}"
            ) from err
        except requests.RequestException as err:
            raise SourceUnavailableError(
                f"cannot reach Prometheus at {self.url} ({type(err).__name__}: {err}); is it "
                "running and is the URL right (default port 9090)?"
            ) from err

    def _note_aliases(self, series: list[dict[str, Any]]) -> None:
        for one in series:
            m = one.get("metric", {})
            if m.get("gpu") and m.get("UUID"):
                self.device_aliases[str(m["gpu"])] = str(m["UUID"])

    def read(self) -> list[PowerSample]:
        """The node's GPU samples Prometheus scraped since the previous successful read.

        A failed query does not move the window on: the next read asks for
        everything since the last one that worked (at most
        :data:`MAX_WINDOW_S`; an older part of a longer outage is logged as
        not fetched).
        """
        now = utc_now().timestamp()
        since = self._last_read if self._last_read is not None else now - self.lookback_s
        window = max(2, math.ceil(now - since) + 2)
        if window > MAX_WINDOW_S:
            log.warning(
                "DCGM via Prometheus %s: %d s since the last successful read; fetching the "
                "last %d s only, the %d s before are not fetched",
                self.url,
                window,
                MAX_WINDOW_S,
                window - MAX_WINDOW_S,
            )
            window = MAX_WINDOW_S
        sel = f'{{__name__=~"{POWER}|{ENERGY}",{self._label}="{self.hostname}"}}[{window}s]'
        found = self._query(sel)  # raises on failure: the window stays where it was
        self._last_read = now
        self._note_aliases(found)
        merged: dict[tuple[str, float], dict[str, Any]] = {}
        for series in found:
            m = series["metric"]
            device = m.get("UUID") or m.get("gpu")
            if device is None:
                continue
            last = self._last.get(device, -math.inf)
            for ts, value in series.get("values", []):
                ts = float(ts)
                if ts <= last:
                    continue
                rec = merged.setdefault((device, ts), {"model": m.get("modelName")})
                v = float(value)
                if m["__name__"] == POWER:
                    rec["power_w"] = v
                else:
                    rec["energy_j"] = v / 1000.0
        out = []
        for (device, ts), rec in sorted(merged.items(), key=lambda kv: (kv[0][1], kv[0][0])):
            self._last[device] = max(self._last.get(device, -math.inf), ts)
            out.append(
                PowerSample(
                    device=device,
                    model=rec["model"],
                    timestamp=datetime.fromtimestamp(ts, UTC),
                    power_w=rec.get("power_w"),
                    energy_j=rec.get("energy_j"),
                    source="dcgm",
                )
            )
        return out

    def close(self) -> None:
        """Nothing held between queries."""
