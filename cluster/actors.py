"""Thin Ray actors over the plain classes: the aggregator, one sidecar per node, and their manager.

* :func:`aggregator` gets or creates the named, detached ``AggregatorActor``
  (``wattwise-aggregator`` in namespace ``wattwise``, restarted by Ray for
  ever). On every start it rebuilds its state from the store and its
  write-ahead journal (``<store>/aggregator-wal``), so a restart loses nothing
  that was acknowledged. What the operator asked it to run (the sidecars'
  sources and options, the HTTP API's address and token) is saved in
  ``<store>/aggregator/settings.json`` (the token apart, in ``api-token``, mode
  0600) and started again when Ray restarts the actor; an explicit
  ``stop_sidecars``/``stop_api`` forgets it, and a newly created actor (not a
  restart) starts with none. A run's end triggers a debounced PRE retrain in a
  background Ray task.
* ``SidecarActor`` runs a :class:`profiler.sidecar.Sidecar` on one node
  (pinned with ``NodeAffinitySchedulingStrategy``); its receiver sends each
  batch to the aggregator and raises when the aggregator is unreachable, so
  the sidecar spills to its journal and resends later.
* :class:`SidecarManager` starts one sidecar per alive node and restarts
  missing or dead ones (call :meth:`SidecarManager.reconcile`, or let the
  aggregator actor do it periodically). GPU sources are opened only on nodes
  whose Ray resources include GPUs (:func:`sources_for_node`); a node where no
  requested source applies gets no sidecar. A sidecar that cannot open its
  sources is reported once and tried again later, not restarted every reconcile.

Ray is imported inside functions so that importing this module stays cheap.
"""

from __future__ import annotations

import base64
import contextlib
import importlib
import io
import json
import logging
import math
import os
import socket
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import polars as pl

log = logging.getLogger(__name__)

AGGREGATOR_NAME = "wattwise-aggregator"
NAMESPACE = "wattwise"
SIDECAR_PREFIX = "wattwise-sidecar-"

#: A power source to open on the sidecar's node: (registry name, keyword arguments).
SourceSpec = tuple[str, dict[str, Any]]

#: Sources that read GPUs: opened only on nodes whose Ray resources include ``GPU``.
GPU_SOURCES = frozenset({"nvml", "dcgm", "dcgm-exporter"})


# ------------------------------------------------------------------------------ aggregator


class _AggregatorActorImpl:
    """The aggregator inside a Ray actor: every method delegates to :class:`Aggregator`.

    Args:
        store_root: Absolute store directory (shared by the aggregator's nodes).
        options: Keyword arguments for :class:`cluster.aggregator.Aggregator`.
        retrain_delay_s: Quiet time after the last finished run before PRE retrains.
        shard: This shard's number (0: the plain aggregator).
        shards: Shards in all.
        launch_id: Identifies the actor across Ray's restarts (Ray runs ``__init__``
            again with the same arguments). Saved settings carrying the same id are
            restored (sidecars and API started again); any others belong to an
            earlier actor and are removed. ``None``: never restore.

    """

    def __init__(
        self,
        store_root: str,
        options: dict[str, Any] | None = None,
        retrain_delay_s: float = 30.0,
        shard: int = 0,
        shards: int = 1,
        launch_id: str | None = None,
    ) -> None:
        from cluster.aggregator import Aggregator, Debounced
        from estimators.step import _t_quantile
        from profiler.store import Store

        # STEP's first band imports scipy.stats (about 1.2 s here): pay it now, not while
        # the first projection holds the lock ingest waits for.
        _t_quantile(0.975, 2)
        self.store = Store(store_root)
        self.shard, self.shards = shard, shards
        self.retrain = Debounced(lambda: _launch_retrain(store_root), retrain_delay_s)
        opts = dict(options or {})
        opts.setdefault("wal", self.store.root / wal_name(shard))
        owns = None if shards == 1 else (lambda run_id: shard_of(run_id, shards) == shard)
        self.agg = Aggregator.rebuild(self.store, on_finish=self._on_finish, owns=owns, **opts)
        self.started = time.time()
        self._stop = threading.Event()
        self.manager: SidecarManager | None = None
        self._api: Any = None
        self.launch_id = launch_id
        self._settings_file = settings_path(self.store.root, shard)
        self._settings_lock = threading.RLock()  # settings, manager and API change together
        self._sidecar_lock = threading.Lock()  # one reconcile or stop at a time
        self._sidecar_settings: dict[str, Any] | None = None  # encoded sources and options
        self._api_settings: dict[str, Any] | None = None  # host, port, bound_port, token
        self._api_token: str | None = None
        self._api_retry_at = math.inf  # monotonic time of the next try to serve a restored API
        self.restore_errors: dict[str, str] = {}
        self._restore()
        self._flusher = threading.Thread(target=self._flush_loop, daemon=True)
        self._flusher.start()

    def _on_finish(self, run_id: str, status: str, summary: dict[str, Any]) -> None:
        if status != "finished":
            return
        if self.shard == 0:
            self.retrain()
            return
        try:  # one debounced retrain per cluster: shard 0's
            import ray

            ray.get_actor(AGGREGATOR_NAME, namespace=NAMESPACE).note_finished.remote()
        except Exception as err:
            log.warning("shard %d: could not tell shard 0 about %s: %s", self.shard, run_id, err)

    def note_finished(self) -> None:
        """Another shard finished a run: (re)start the debounced PRE retrain."""
        self.retrain()

    def _flush_loop(self) -> None:
        period = max(self.agg.flush_interval_us / 1e6 / 2, 0.1)
        while not self._stop.wait(period):
            try:
                self.agg.maybe_flush()
            except Exception:
                log.exception("aggregator: periodic flush failed")
            manager = self.manager
            if manager is not None and manager.due():
                try:
                    with self._sidecar_lock:
                        if manager is self.manager:  # not stopped meanwhile
                            manager.reconcile()
                except Exception:
                    log.exception("aggregator: sidecar reconcile failed")
            if self._api is None and time.monotonic() >= self._api_retry_at:
                with self._settings_lock:
                    if self._api is None and self._api_settings is not None:
                        self._serve_saved_api()

    # Settings that survive a restart.
    def _restore(self) -> None:
        """Start again the sidecars and the API saved by this actor's earlier incarnation."""
        try:
            saved = read_settings(self._settings_file)
        except Exception as err:
            self.restore_errors["settings"] = str(err)
            log.error("aggregator: %s; starting no sidecars and no API", err)
            return
        if saved is None:
            return
        if self.launch_id is None or saved.get("launch_id") != self.launch_id:
            log.info(
                "aggregator: %s holds the settings of an earlier aggregator (not a restart of "
                "this one); removing them: sidecars and API start when asked",
                self._settings_file,
            )
            try:
                self._save()  # nothing held yet: removes the file and the token
            except Exception as err:
                log.warning("aggregator: %s", err)
            return
        sidecars = saved.get("sidecars")
        if sidecars is not None:
            self._sidecar_settings = sidecars
            try:
                sources = decode_setting(sidecars["sources"])
                options = decode_setting(sidecars["options"])
                self.manager = SidecarManager(sources, **options)  # the flush loop starts them
                log.info("aggregator restarted: keeping sidecars with %s", _describe(sidecars))
            except Exception as err:
                self.restore_errors["sidecars"] = (
                    f"could not restore the sidecars saved in {self._settings_file}: {err}; "
                    "start them again (wattwise aggregator start --sidecars ...)"
                )
                log.error("aggregator: %s", self.restore_errors["sidecars"])
        api = saved.get("api")
        if api is not None:
            self._api_settings = api
            if api.get("token"):
                try:
                    self._api_token = _token_file(self._settings_file).read_text(encoding="utf-8")
                except OSError as err:
                    self.restore_errors["api"] = (
                        f"the API was started with a token, but "
                        f"{_token_file(self._settings_file)} cannot be read ({err}); not "
                        "serving it without one: start it again (wattwise aggregator start --port)"
                    )
                    log.error("aggregator: %s", self.restore_errors["api"])
                    return
            self._serve_saved_api()

    def _api_view(self) -> Any:
        return self.agg if self.shards == 1 else ShardView(self.agg, self.shard, self.shards)

    def _serve_saved_api(self) -> None:
        """Serve the saved API: on the port it had (clients keep their URL), else as asked."""
        from cluster.api import serve

        s = self._api_settings
        assert s is not None
        ports = [int(s["bound_port"])]
        if int(s["port"]) == 0 and ports[0] != 0:
            ports.append(0)  # any port was asked for: a new one if the old one is taken
        error: Exception | None = None
        for port in ports:
            try:
                self._api = serve(
                    self._api_view(), host=s["host"], port=port, token=self._api_token
                )
                break
            except Exception as err:
                error = err
        if self._api is None:
            self._api_retry_at = time.monotonic() + API_RETRY_S
            self.restore_errors["api"] = (
                f"could not serve the API again on {s['host']} port {ports[0]}: {error}; "
                f"trying again every {API_RETRY_S:.0f} s"
            )
            log.warning("aggregator: %s", self.restore_errors["api"])
            return
        self._api_retry_at = math.inf
        self.restore_errors.pop("api", None)
        log.info("aggregator restarted: serving the API again at %s", self._api.url)
        bound = int(self._api.server.server_address[1])
        if bound != s["bound_port"]:
            s["bound_port"] = bound
            try:
                self._save()
            except Exception as err:
                log.warning("aggregator: %s", err)

    def _save(self) -> None:
        """Write what this actor runs to the settings file (or remove it when nothing runs).

        Raises:
            StoreError: The file could not be written.

        """
        from profiler.errors import StoreError, WattwiseError
        from profiler.store import atomic_write_bytes

        path = self._settings_file
        token = _token_file(path)
        keep_token = self._api_settings is not None and self._api_token is not None
        try:
            if path.parent.is_symlink():
                raise OSError(f"{path.parent} is a symbolic link; expected a folder")
            if keep_token:  # first the token, so that settings naming one always find it
                atomic_write_bytes(str(self._api_token).encode(), token, mode=0o600)
            if self._sidecar_settings is None and self._api_settings is None:
                path.unlink(missing_ok=True)
            else:
                data = {
                    "version": SETTINGS_VERSION,
                    "launch_id": self.launch_id,
                    "shard": self.shard,
                    "sidecars": self._sidecar_settings,
                    "api": self._api_settings,
                }
                atomic_write_bytes((json.dumps(data, indent=1) + "\n").encode(), path)
            if not keep_token:
                token.unlink(missing_ok=True)
        except (OSError, WattwiseError) as err:
            raise StoreError(
                f"could not save the aggregator's settings to {path}: {err}; a restart of the "
                "actor would not start its sidecars and API again"
            ) from err

    # Delegation: kept explicit so Ray exposes exactly these methods.
    def ping(self) -> dict[str, Any]:
        """Liveness: pid and start time of this incarnation."""
        return {"pid": os.getpid(), "started": self.started}

    def ingest_samples(self, batch: pl.DataFrame, sent_at: datetime | None = None) -> int:
        """See :meth:`Aggregator.ingest_samples`."""
        return self.agg.ingest_samples(batch, sent_at=sent_at)

    def ingest_epochs(
        self, marks: pl.DataFrame, node: str | None = None, sent_at: datetime | None = None
    ) -> int:
        """See :meth:`Aggregator.ingest_epochs`."""
        return self.agg.ingest_epochs(marks, node=node, sent_at=sent_at)

    def start_run(self, run: dict[str, Any]) -> str:
        """See :meth:`Aggregator.start_run`."""
        return self.agg.start_run(run)

    def finish_run(self, run_id: str, status: str = "finished") -> dict[str, Any]:
        """See :meth:`Aggregator.finish_run`."""
        return self.agg.finish_run(run_id, status)

    def status(self, run_id: str | None = None) -> Any:
        """See :meth:`Aggregator.status`."""
        return self.agg.status(run_id)

    def projection(self, run_id: str) -> dict[str, Any]:
        """See :meth:`Aggregator.projection`."""
        return self.agg.projection(run_id)

    def epochs(self, run_id: str) -> pl.DataFrame:
        """See :meth:`Aggregator.epochs`."""
        return self.agg.epochs(run_id)

    def stats(self) -> dict[str, Any]:
        """See :meth:`Aggregator.stats`; adds the store root and the API address."""
        out = self.agg.stats()
        out["shard"], out["shards"] = self.shard, self.shards
        out["store"] = str(self.store.root)
        out["api"] = None if self._api is None else self._api.url
        out["sidecars"] = None if self.manager is None else self.manager.node_names()
        api = self._api_settings
        out["settings"] = {  # what a restart of this actor starts again
            "sidecars": None
            if self._sidecar_settings is None
            else _describe(self._sidecar_settings),
            "api": None if api is None else {k: api[k] for k in ("host", "port", "token")},
            "errors": dict(self.restore_errors),
        }
        return out

    def flush(self) -> int:
        """See :meth:`Aggregator.flush`."""
        return self.agg.flush()

    def start_sidecars(
        self,
        sources: list[SourceSpec] | Callable[[dict[str, Any]], Sequence[SourceSpec]],
        options: dict[str, Any] | None = None,
    ) -> list[str]:
        """Start one sidecar per alive node now and keep them running; returns their node ids.

        Calling it again keeps the running manager (and its sidecars) and only
        fills in nodes that have none. The sources and options are saved in the
        store, so a restarted actor starts the same sidecars again.

        Args:
            sources: (registry name, kwargs) pairs, or a module-level function of the
                Ray node record returning them (found again by name after a restart).
            options: :class:`SidecarManager` options (``interval_s``, ...).

        Raises:
            BadInputError: Sources or options a restart could not rebuild: a lambda or
                nested function, or a value other than JSON values, tuples, datetimes,
                paths, polars frames and module-level functions (nothing is started).
            StoreError: The settings could not be saved (nothing was started).

        """
        with self._settings_lock:
            if self.manager is None:
                opts = dict(options or {})
                enc = {
                    "sources": encode_setting(sources, "sidecars.sources"),
                    "options": encode_setting(opts, "sidecars.options"),
                }
                manager = SidecarManager(sources, **opts)  # bad option names raise here
                self._sidecar_settings = enc
                try:
                    self._save()
                except Exception:
                    self._sidecar_settings = None
                    raise
                self.manager = manager
                self.restore_errors.pop("sidecars", None)
            manager = self.manager
        with self._sidecar_lock:
            return manager.reconcile()

    def stop_sidecars(self) -> dict[str, dict[str, int]]:
        """Stop every sidecar and forget them (a restart starts none); node name -> counters.

        Raises:
            StoreError: The settings could not be saved (the sidecars keep running).

        """
        with self._settings_lock:
            saved = self._sidecar_settings
            self._sidecar_settings = None
            try:
                self._save()
            except Exception:
                self._sidecar_settings = saved
                raise
            manager, self.manager = self.manager, None
            self.restore_errors.pop("sidecars", None)
        if manager is None:
            return {}
        with self._sidecar_lock:
            return manager.stop_all()

    def start_api(self, host: str = "127.0.0.1", port: int = 0, token: str | None = None) -> str:
        """Serve the HTTP/JSON API from this actor; returns its URL.

        The address and the token are saved in the store (the token in a file only
        its owner reads), so a restarted actor serves the API again, on the same port.

        Raises:
            BadInputError: See :func:`cluster.api.serve`.
            StoreError: The settings could not be saved (the API was not started).

        """
        from cluster.api import serve

        with self._settings_lock:
            if self._api is None:
                api = serve(self._api_view(), host=host, port=port, token=token)
                saved = self._api_settings, self._api_token
                self._api_settings = {
                    "host": host,
                    "port": port,
                    "bound_port": int(api.server.server_address[1]),
                    "token": token is not None,
                }
                self._api_token = token
                try:
                    self._save()
                except Exception:
                    api.close()
                    self._api_settings, self._api_token = saved
                    raise
                self._api = api
                self._api_retry_at = math.inf
                self.restore_errors.pop("api", None)
            return str(self._api.url)

    def stop_api(self) -> bool:
        """Stop serving the API and forget it (a restart serves none); whether one was set.

        Raises:
            StoreError: The settings could not be saved (the API keeps running).

        """
        with self._settings_lock:
            had = self._api is not None or self._api_settings is not None
            saved = self._api_settings, self._api_token
            self._api_settings, self._api_token = None, None
            try:
                self._save()
            except Exception:
                self._api_settings, self._api_token = saved
                raise
            api, self._api = self._api, None
            self._api_retry_at = math.inf
            self.restore_errors.pop("api", None)
        if api is not None:
            api.close()
        return had


def _launch_retrain(store_root: str) -> None:
    """Retrain PRE in a background Ray task (so the aggregator keeps ingesting)."""
    import ray

    @ray.remote(num_cpus=0, max_retries=0)
    def _retrain_task(root: str) -> bool:
        from cluster.aggregator import _retrain
        from profiler.store import Store

        return _retrain(Store(root))

    _retrain_task.remote(store_root)


SETTINGS_VERSION = 1

#: Seconds between two tries to serve a restored API whose port was taken.
API_RETRY_S = 5.0


def settings_path(store_root: str | os.PathLike[str], shard: int) -> Path:
    """The file where aggregator shard ``shard`` keeps what a restart starts again."""
    name = "settings.json" if shard == 0 else f"settings-{shard}.json"
    return Path(store_root) / "aggregator" / name


def _token_file(settings: Path) -> Path:
    """The API token beside ``settings`` (``api-token``, ``api-token-<shard>``)."""
    return settings.with_name("api-token" + settings.stem.removeprefix("settings"))


def read_settings(path: Path) -> dict[str, Any] | None:
    """The saved settings at ``path``, or ``None`` when there are none.

    Raises:
        StoreError: The file cannot be read or is not settings of this version.

    """
    from profiler.errors import StoreError

    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as err:
        raise StoreError(f"cannot read the aggregator's settings {path}: {err}") from err
    if not isinstance(data, dict) or data.get("version") != SETTINGS_VERSION:
        found = data.get("version") if isinstance(data, dict) else type(data).__name__
        raise StoreError(
            f"{path}: expected aggregator settings of version {SETTINGS_VERSION}; found "
            f"{found!r}. Remove the file and start the sidecars and API again"
        )
    return data


def _describe(sidecars: Mapping[str, Any]) -> dict[str, Any]:
    """Saved sidecar settings as shown in ``stats``: source names (or function) and options."""
    sources = sidecars["sources"]
    if isinstance(sources, dict) and "$function" in sources:
        shown: Any = sources["$function"]
    else:
        specs = [s["$tuple"] if isinstance(s, dict) and "$tuple" in s else s for s in sources]
        shown = [spec[0] for spec in specs]
    return {"sources": shown, "options": sidecars["options"]}


def _resolve(module: str, qualname: str) -> Any:
    """The object ``qualname`` names in ``module`` (ImportError or AttributeError if none)."""
    found: Any = importlib.import_module(module)
    for part in qualname.split("."):
        found = getattr(found, part)
    return found


def _function_ref(fn: Callable[..., Any], where: str) -> str:
    """``module:qualname`` of a function that can be imported again by that name."""
    from profiler.errors import BadInputError

    module, qualname = getattr(fn, "__module__", None), getattr(fn, "__qualname__", None)
    found: Any = None
    if module and qualname and "<" not in qualname:
        with contextlib.suppress(ImportError, AttributeError):
            found = _resolve(module, qualname)
    if found is not fn:
        raise BadInputError(
            f"{where}: a restarted aggregator finds a sources function again by its name, so "
            f"expected a module-level function; found {module}.{qualname}. Define it at the top "
            "of an importable module, or give a list of (source, kwargs)"
        )
    return f"{module}:{qualname}"


def encode_setting(value: Any, where: str) -> Any:
    """``value`` as JSON that :func:`decode_setting` turns back into an equal value.

    Plain JSON values stay as they are; tuples, datetimes, paths, polars frames
    (Arrow IPC, base64) and module-level functions (by name) become one-key
    objects tagged ``$tuple``, ``$datetime``, ``$path``, ``$frame``, ``$function``
    (a dict with a key starting with ``$`` becomes ``$dict``).

    Args:
        value: What to encode.
        where: Its name, for error messages (``sidecars.sources``).

    Raises:
        BadInputError: A value of another type, a dict key that is not a string,
            or a function that cannot be imported again by name.

    """
    from profiler.errors import BadInputError

    if value is None or isinstance(value, bool | int | float | str):
        return value
    if isinstance(value, list):
        return [encode_setting(v, f"{where}[{i}]") for i, v in enumerate(value)]
    if isinstance(value, tuple):
        return {"$tuple": [encode_setting(v, f"{where}[{i}]") for i, v in enumerate(value)]}
    if isinstance(value, dict):
        for k in value:
            if not isinstance(k, str):
                raise BadInputError(
                    f"{where}: expected string keys; found {k!r} ({type(k).__name__})"
                )
        items = {k: encode_setting(v, f"{where}[{k!r}]") for k, v in value.items()}
        if any(k.startswith("$") for k in items):
            return {"$dict": [[k, v] for k, v in items.items()]}
        return items
    if isinstance(value, datetime):
        return {"$datetime": value.isoformat()}
    if isinstance(value, Path):
        return {"$path": str(value)}
    if isinstance(value, pl.DataFrame):
        buf = io.BytesIO()
        value.write_ipc(buf)
        return {"$frame": base64.b64encode(buf.getvalue()).decode("ascii")}
    if callable(value):
        return {"$function": _function_ref(value, where)}
    raise BadInputError(
        f"{where}: a restarted aggregator must rebuild this value, so expected JSON values, "
        f"tuples, datetimes, paths, polars frames or module-level functions; found "
        f"{type(value).__name__}"
    )


def decode_setting(value: Any) -> Any:
    """The value :func:`encode_setting` encoded.

    Raises:
        StoreError: An unknown tag, or a function no longer found by its name.

    """
    from profiler.errors import StoreError

    if isinstance(value, list):
        return [decode_setting(v) for v in value]
    if not isinstance(value, dict):
        return value
    if len(value) == 1 and next(iter(value)).startswith("$"):
        tag, body = next(iter(value.items()))
        if tag == "$tuple":
            return tuple(decode_setting(v) for v in body)
        if tag == "$dict":
            return {k: decode_setting(v) for k, v in body}
        if tag == "$datetime":
            return datetime.fromisoformat(body)
        if tag == "$path":
            return Path(body)
        if tag == "$frame":
            return pl.read_ipc(io.BytesIO(base64.b64decode(body)))
        if tag == "$function":
            module, _, qualname = str(body).partition(":")
            try:
                return _resolve(module, qualname)
            except (ImportError, AttributeError) as err:
                raise StoreError(f"the sources function {body} is no longer found: {err}") from err
        raise StoreError(
            f"expected one of $tuple, $dict, $datetime, $path, $frame, $function; found {tag!r}"
        )
    return {k: decode_setting(v) for k, v in value.items()}


def shard_name(shard: int) -> str:
    """The actor name of aggregator shard ``shard`` (shard 0 keeps the plain name)."""
    return AGGREGATOR_NAME if shard == 0 else f"{AGGREGATOR_NAME}-{shard}"


def wal_name(shard: int) -> str:
    """The write-ahead journal folder of a shard, under the store."""
    return "aggregator-wal" if shard == 0 else f"aggregator-wal-{shard}"


def shard_of(run_id: str, shards: int) -> int:
    """The shard that owns ``run_id``: a stable hash (CRC-32) of the id modulo ``shards``."""
    import zlib

    return zlib.crc32(run_id.encode("utf-8")) % shards if shards > 1 else 0


def split_by_shard(df: pl.DataFrame, shards: int) -> dict[int, pl.DataFrame]:
    """Rows cut by the shard that owns their run (rows without a run go to shard 0)."""
    owner = {r: (0 if r is None else shard_of(r, shards)) for r in df["run_id"].unique().to_list()}
    parts = df.with_columns(
        pl.col("run_id").replace_strict(owner, default=0, return_dtype=pl.Int64).alias("_s")
    ).partition_by("_s", as_dict=True, include_key=False)
    return {int(k[0]): part for k, part in parts.items()}


def aggregators(
    store_root: str | os.PathLike[str] | None = None,
    *,
    shards: int = 1,
    options: dict[str, Any] | None = None,
    retrain_delay_s: float = 30.0,
) -> list[Any]:
    """Get or create the cluster's ``shards`` aggregator shards; returns their handles.

    Runs are split among shards by :func:`shard_of`; sidecars, the runner and
    the mark relay route each run's data to its shard (:class:`Router`). Each
    shard has its own write-ahead journal and rebuilds only its runs after a
    restart; all write to the same store. Shard 0 also manages the sidecars
    and runs the debounced PRE retrain for all.

    Raises:
        BadInputError: ``shards`` < 1, or different from the running cluster's.

    """
    import ray

    from profiler.errors import BadInputError

    if shards < 1:
        raise BadInputError(f"--shards must be at least 1; found {shards}")
    first = aggregator(store_root, options=options, retrain_delay_s=retrain_delay_s, shards=shards)
    running = int(ray.get(first.stats.remote(), timeout=120).get("shards", 1))
    if running != shards:
        raise BadInputError(
            f"the cluster's aggregator runs {running} shard(s); found --shards {shards}. Stop "
            "it first ('ray kill' the wattwise-aggregator actors) to change the shard count"
        )
    return [first] + [
        aggregator(
            store_root,
            options=options,
            retrain_delay_s=retrain_delay_s,
            shard=k,
            shards=shards,
        )
        for k in range(1, shards)
    ]


class ShardView:
    """What the HTTP API asks of the aggregator, answered by the shard that owns each run.

    The API runs in one shard's actor (shard 0). Runs held by that shard are
    answered from its own aggregator; the others are asked of their shard's
    actor, and posted samples and marks are cut per shard. A run id is looked
    up with :func:`shard_of`, so no shard has to know the others' runs.

    Args:
        local: This shard's aggregator.
        shard: This shard's number.
        shards: How many shards the cluster runs.

    """

    def __init__(self, local: Any, shard: int, shards: int) -> None:
        self.local, self.shard, self.shards = local, shard, shards
        self.store = local.store
        self._handles: dict[int, Any] = {}

    def _remote(self, k: int) -> Any:
        import ray

        if k not in self._handles:
            self._handles[k] = ray.get_actor(shard_name(k), namespace=NAMESPACE)
        return self._handles[k]

    def _call(self, k: int, method: str, *args: Any) -> Any:
        """``method(*args)`` on shard ``k``: here, or on its actor (its own errors re-raised)."""
        if k == self.shard:
            return getattr(self.local, method)(*args)
        import ray

        try:
            return ray.get(getattr(self._remote(k), method).remote(*args), timeout=60)
        except ray.exceptions.RayTaskError as err:
            # The shard's own exception (BadInputError for an unknown run...), not Ray's wrapper.
            cause = getattr(err, "cause", None)
            if isinstance(cause, Exception):
                raise cause from None
            raise
        except (ray.exceptions.RayError, ValueError) as err:
            self._handles.pop(k, None)  # looked up again next time (a restarted shard)
            from profiler.errors import StoreError

            raise StoreError(f"aggregator shard {k} did not answer: {err}") from err

    def status(self, run_id: str | None = None) -> Any:
        """One run's summary from its shard, or every shard's held runs together."""
        if run_id is not None:
            return self._call(shard_of(run_id, self.shards), "status", run_id)
        out: list[dict[str, Any]] = []
        for k in range(self.shards):
            out.extend(self._call(k, "status"))
        return out

    def epochs(self, run_id: str) -> pl.DataFrame:
        """The run's epochs, from its shard."""
        return self._call(shard_of(run_id, self.shards), "epochs", run_id)  # type: ignore[no-any-return]

    def projection(self, run_id: str) -> dict[str, Any]:
        """The run's projection, from its shard."""
        return self._call(shard_of(run_id, self.shards), "projection", run_id)  # type: ignore[no-any-return]

    def _ingest(self, method: str, df: pl.DataFrame) -> int:
        """``method`` on each shard with its part of ``df``; how many rows were new in all."""
        parts = split_by_shard(df, self.shards)
        return sum(int(self._call(k, method, part)) for k, part in parts.items())

    def ingest_samples(self, df: pl.DataFrame) -> int:
        """Samples cut per shard; returns how many were new over all shards."""
        return self._ingest("ingest_samples", df)

    def ingest_epochs(self, df: pl.DataFrame) -> int:
        """Epoch marks cut per shard; returns how many were new over all shards."""
        return self._ingest("ingest_epochs", df)


class Router:
    """Finds the aggregator shard of a run (one shard: always the plain aggregator).

    The shard count is read once from shard 0 and again after a failure.
    """

    def __init__(self) -> None:
        self._handles: list[Any] | None = None

    def handles(self) -> list[Any]:
        """All shards' handles, shard 0 first."""
        import ray

        if self._handles is None:
            first = ray.get_actor(AGGREGATOR_NAME, namespace=NAMESPACE)
            stats: Any = ray.get(first.stats.remote(), timeout=30)
            n = int(stats.get("shards", 1))
            self._handles = [first] + [
                ray.get_actor(shard_name(k), namespace=NAMESPACE) for k in range(1, n)
            ]
        return self._handles

    def for_run(self, run_id: str | None) -> Any:
        """The handle of ``run_id``'s shard (unassigned data goes to shard 0)."""
        hs = self.handles()
        return hs[0] if run_id is None else hs[shard_of(run_id, len(hs))]

    def split(self, batch: pl.DataFrame) -> list[tuple[Any, pl.DataFrame]]:
        """The batch cut into one part per shard that owns some of its rows."""
        hs = self.handles()
        if len(hs) == 1:
            return [(hs[0], batch)]
        return [(hs[k], part) for k, part in split_by_shard(batch, len(hs)).items()]

    def reset(self) -> None:
        """Look the shards up again next time."""
        self._handles = None


def aggregator(
    store_root: str | os.PathLike[str] | None = None,
    *,
    options: dict[str, Any] | None = None,
    retrain_delay_s: float = 30.0,
    create: bool = True,
    shard: int = 0,
    shards: int = 1,
) -> Any:
    """The cluster's aggregator actor: the running one, or a new one.

    Args:
        store_root: Store directory (default ``$WATTWISE_STORE`` or the per-user
            one), made absolute here because the actor may run elsewhere.
        options: Keyword arguments for :class:`cluster.aggregator.Aggregator`.
        retrain_delay_s: Debounce of the PRE retrain in s.
        create: Create it when it is not running (else raise).
        shard: Which shard (0: the plain ``wattwise-aggregator``); see :func:`aggregators`.
        shards: Shards in all (a new shard rebuilds only the runs it owns).

    Returns:
        A handle to the named detached actor.

    Raises:
        SourceUnavailableError: ``create`` is false and no aggregator runs.

    """
    import secrets

    import ray

    from profiler.errors import SourceUnavailableError
    from profiler.store import Store

    if not create:
        try:
            return ray.get_actor(shard_name(shard), namespace=NAMESPACE)
        except ValueError as err:
            raise SourceUnavailableError(
                f"no aggregator is running in this Ray cluster (actor {AGGREGATOR_NAME!r} in "
                f"namespace {NAMESPACE!r}); start it with 'wattwise aggregator start'"
            ) from err
    root = str(Store(store_root).root.resolve())
    cls = ray.remote(_AggregatorActorImpl)
    return cls.options(
        name=shard_name(shard),
        namespace=NAMESPACE,
        lifetime="detached",
        get_if_exists=True,
        max_restarts=-1,
        num_cpus=0,
        max_concurrency=4,  # queries and the API answer while a batch is being ingested
        # A new launch id for a new actor; Ray's restarts of it run __init__ with the same one,
        # which is how it tells a restart (restore the saved settings) from a fresh start.
    ).remote(root, options, retrain_delay_s, shard, shards, secrets.token_hex(8))


# ------------------------------------------------------------------------------ sidecars


class AggregatorReceiver:
    """A sidecar receiver that hands batches to the aggregator actor.

    Raises from :meth:`send` when the actor cannot be found or does not
    answer within ``timeout_s``; the sidecar then spills to its journal.

    Args:
        timeout_s: Longest wait for the aggregator's acknowledgement, in s.

    """

    def __init__(self, timeout_s: float = 10.0) -> None:
        self.timeout_s = timeout_s
        self._router = Router()

    def send(self, batch: pl.DataFrame) -> None:
        """Deliver one batch (idempotent on the aggregator's side, so resending is safe)."""
        self.send_at(batch, None)

    def send_at(self, batch: pl.DataFrame, sent_at: datetime | None) -> None:
        """Deliver one batch stamped with this node's clock (for the offset estimate)."""
        import ray

        try:  # one part per shard; resending a part a shard already took is harmless
            refs = [h.ingest_samples.remote(part, sent_at) for h, part in self._router.split(batch)]
            ray.get(refs, timeout=self.timeout_s)
        except Exception:
            self._router.reset()  # look the shards up again next time
            raise


class _SidecarActorImpl:
    """One node's sidecar inside a Ray actor.

    Args:
        node: Node name stored with the samples.
        sources: Power sources to open here, as (registry name, kwargs).
        run_id: Run the samples belong to at first (``None``: unassigned).
        interval_s: Seconds between samples.
        batch_interval_s: Seconds between batches.
        journal_dir: Spill journal directory (default per node under
            ``$WATTWISE_JOURNAL`` or the per-user state directory).
        send_timeout_s: Longest wait for the aggregator, in s.

    """

    def __init__(
        self,
        node: str,
        sources: list[SourceSpec],
        run_id: str | None = None,
        interval_s: float = 1.0,
        batch_interval_s: float = 5.0,
        journal_dir: str | None = None,
        send_timeout_s: float = 10.0,
    ) -> None:
        from profiler.journal import default_journal_dir
        from profiler.sidecar import Sidecar
        from profiler.sources import open_source

        opened = [open_source(name, **kwargs) for name, kwargs in sources]
        journal = Path(journal_dir) if journal_dir else default_journal_dir() / node
        self.sidecar = Sidecar(
            opened,
            node=node,
            run_id=run_id,
            interval_s=interval_s,
            batch_interval_s=batch_interval_s,
            receiver=AggregatorReceiver(send_timeout_s),
            journal=journal,
        )
        self.node = node
        # Run assignments survive a restart of this actor: kept beside the journal (on the
        # node) and applied to the replacement before it takes its first sample.
        self._state = journal / "assignments.json"
        self._node_run: str | None = run_id
        self._jobs: dict[str, dict[str, Any]] = {}
        self._state_lock = threading.RLock()  # actor calls run in several threads
        self._stop_verify = threading.Event()
        self._restore()
        self.sidecar.start()

    #: Seconds between asks about restored runs the aggregator could not confirm.
    verify_interval_s = 30.0

    def _restore(self) -> None:
        import json

        try:
            saved = json.loads(self._state.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return
        unverified: list[str] = []  # kept because the aggregator could not say
        node_run = saved.get("node_run")
        if self._node_run is None and node_run:
            state = self._still_running(str(node_run))
            if state is not False:
                self._node_run = str(node_run)
                self.sidecar.set_run(self._node_run)
                if state is None:
                    unverified.append(self._node_run)
        # Re-attached in the order they held the node (the last one attached holds it now,
        # the others get it back in turn when it detaches).
        order = [str(r) for r in saved.get("node_runs") or ()]
        jobs = sorted(
            dict(saved.get("jobs") or {}).items(),
            key=lambda kv: order.index(kv[0]) if kv[0] in order else -1,
        )
        for rid, job in jobs:
            pid = job.get("pid")
            if pid is not None and not _pid_alive(int(pid)):
                continue  # the job's process is gone: nothing of it to measure
            state = self._still_running(rid)
            if state is False:
                continue
            try:
                self.sidecar.attach_job(rid, gpus=job.get("gpus") or (), pid=pid)
                self._jobs[rid] = job
            except Exception as err:
                log.warning("sidecar %s: could not re-attach run %s: %s", self.node, rid, err)
                continue
            if state is None:
                unverified.append(rid)
        log.info("sidecar %s: restored assignments %s", self.node, self.sidecar.owners())
        if unverified:
            threading.Thread(
                target=self._verify_restored,
                args=(unverified,),
                name=f"wattwise-verify-{self.node}",
                daemon=True,
            ).start()

    def _verify_restored(self, run_ids: list[str]) -> None:
        """Ask again about restored runs the aggregator could not confirm; drop ended ones.

        A restored node-wide run has no process to check, so without this a run
        that ended while the aggregator was unreachable would keep collecting
        the node's samples.
        """
        pending = list(run_ids)
        while pending and not self._stop_verify.wait(self.verify_interval_s):
            for rid in list(pending):
                state = self._still_running(rid)
                if state is None:
                    continue
                pending.remove(rid)
                if state is False:
                    with self._state_lock:
                        held = rid in self._jobs or rid == self._node_run
                    if held:
                        log.warning(
                            "sidecar %s: restored run %s is no longer running; released",
                            self.node,
                            rid,
                        )
                        self.detach(rid)

    @staticmethod
    def _still_running(run_id: str) -> bool | None:
        """Whether the run's aggregator still holds it as running; ``None`` if it cannot tell."""
        import ray

        try:
            status = ray.get(Router().for_run(run_id).status.remote(run_id), timeout=10)
        except Exception:
            return None
        return bool(status.get("status") == "running")

    def _save(self) -> None:
        import json

        data = {
            "node_run": self._node_run,
            "jobs": self._jobs,
            "node_runs": self.sidecar.node_runs,  # who holds the node, oldest first
        }
        tmp = self._state.with_name(self._state.name + ".tmp")
        try:
            self._state.parent.mkdir(parents=True, exist_ok=True)
            with open(tmp, "w", encoding="utf-8") as fh:
                json.dump(data, fh)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, self._state)  # readers see the old file or the new, never half
        except OSError as err:
            log.warning("sidecar %s: could not save assignments: %s", self.node, err)

    def ping(self) -> str:
        """The node name (liveness check)."""
        return self.node

    def set_run(self, run_id: str | None) -> None:
        """Assign samples from now on to ``run_id`` (``None``: unassigned)."""
        with self._state_lock:
            self.sidecar.set_run(run_id)
            self._node_run = run_id
            self._save()

    def attach_job(
        self, run_id: str, gpus: list[str] | None = None, pid: int | None = None
    ) -> dict[str, Any]:
        """See :meth:`profiler.sidecar.Sidecar.attach_job`."""
        with self._state_lock:
            out = self.sidecar.attach_job(run_id, gpus=gpus or (), pid=pid)
            self._jobs.pop(run_id, None)  # kept in attach order, as the sidecar keeps them
            self._jobs[run_id] = {"gpus": list(gpus or ()), "pid": pid}
            self._save()
        return out

    def detach(self, run_id: str) -> int:
        """See :meth:`profiler.sidecar.Sidecar.detach`."""
        with self._state_lock:
            n = self.sidecar.detach(run_id)
            self._jobs.pop(run_id, None)
            if self._node_run == run_id:
                self._node_run = None
            self._save()
        return n

    def owners(self) -> dict[str, str | None]:
        """See :meth:`profiler.sidecar.Sidecar.owners`."""
        return self.sidecar.owners()

    def flush(self) -> dict[str, int]:
        """Cut the buffer and deliver everything now; returns the counters."""
        self.sidecar.cut()
        self.sidecar.ship()
        return self.stats()

    def stats(self) -> dict[str, int]:
        """The sidecar's counters (rows)."""
        from dataclasses import asdict

        out = asdict(self.sidecar.stats)
        out["pending"] = self.sidecar.pending_rows
        return out

    def stop(self) -> dict[str, int]:
        """Stop sampling, deliver what is left; returns the final counters."""
        self._stop_verify.set()
        self.sidecar.stop()
        return self.stats()


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def sidecar_actor(
    node_id: str,
    node: str,
    sources: Sequence[SourceSpec],
    *,
    name: str | None = None,
    **kwargs: Any,
) -> Any:
    """Start a sidecar actor pinned to the Ray node ``node_id`` (hard affinity).

    Args:
        node_id: Ray node id (hex).
        node: Node name stored with the samples.
        sources: Power sources to open there.
        name: Actor name in the ``wattwise`` namespace (default from the node id).
        **kwargs: See ``_SidecarActorImpl``.

    """
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    cls = ray.remote(_SidecarActorImpl)
    return cls.options(
        name=name or SIDECAR_PREFIX + node_id[:16],
        namespace=NAMESPACE,
        num_cpus=0,
        max_concurrency=4,  # stats, flush and attach answer while the threads run (several runs)
        scheduling_strategy=NodeAffinitySchedulingStrategy(node_id=node_id, soft=False),
    ).remote(node, list(sources), **kwargs)


def sources_for_node(
    resources: Mapping[str, float], requested: Sequence[SourceSpec]
) -> tuple[list[SourceSpec], list[SourceSpec]]:
    """Split the requested sources into those that apply on a node and those that do not.

    A GPU source (:data:`GPU_SOURCES`) applies only where the node's Ray
    resources include at least one ``GPU``; every other source (``rapl``,
    ``modelled``, ``replay``, ...) applies everywhere.

    Args:
        resources: The node's Ray resources (``ray.nodes()[i]["Resources"]``).
        requested: The sources asked for, as (registry name, kwargs).

    Returns:
        (the sources to open there, the sources left out), each in the given order.

    """
    has_gpu = float(resources.get("GPU", 0.0) or 0.0) > 0
    use: list[SourceSpec] = []
    skipped: list[SourceSpec] = []
    for spec in requested:
        (use if has_gpu or spec[0] not in GPU_SOURCES else skipped).append(spec)
    return use, skipped


def init_failure_reason(err: BaseException) -> str | None:
    """Why a sidecar actor's ``__init__`` raised (its last traceback line), else ``None``.

    ``None`` means the actor died some other way (node lost, killed), which a
    restart can fix; a failed ``__init__`` (a source that would not open) would
    fail again at once.
    """
    if not getattr(err, "actor_init_failed", False):
        return None
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    return lines[-1] if lines else type(err).__name__


@dataclass
class StartFailure:
    """A node whose sidecar could not start, and when to try again.

    Attributes:
        reason: The error that stopped it (the last traceback line).
        tries: Failed starts in a row.
        delay_s: Wait before the next try, in s.
        retry_at: ``time.monotonic()`` of the next try.

    """

    reason: str
    tries: int
    delay_s: float
    retry_at: float


class SidecarManager:
    """Keeps one sidecar actor on every alive node.

    Args:
        sources: Power sources each sidecar opens, or a function of the Ray
            node record (``ray.nodes()`` entry) returning them (say, NVML on
            GPU nodes, the modelled CPU source elsewhere).
        period_s: Least time between two reconciles driven by :meth:`due`.
        ping_timeout_s: A sidecar that does not answer in this time is replaced.
        retry_s: Wait before starting again a sidecar whose ``__init__`` failed
            (a source that would not open), in s; doubled after each failure.
        max_retry_s: Longest such wait, in s.
        **sidecar_options: Passed to each sidecar (``interval_s``, ...); a
            ``journal_dir`` is a root holding one journal per node.

    Attributes:
        failed: Node id -> the sidecar that could not start there (reported once).
        skipped: Node id -> the requested sources left out there (no GPU).

    """

    def __init__(
        self,
        sources: Sequence[SourceSpec] | Callable[[dict[str, Any]], Sequence[SourceSpec]],
        *,
        period_s: float = 10.0,
        ping_timeout_s: float = 10.0,
        retry_s: float = 60.0,
        max_retry_s: float = 3600.0,
        **sidecar_options: Any,
    ) -> None:
        self.sources = sources
        self.period_s = period_s
        self.ping_timeout_s = ping_timeout_s
        self.retry_s = retry_s
        self.max_retry_s = max_retry_s
        self.options = sidecar_options
        self.handles: dict[str, Any] = {}
        self.names: dict[str, str] = {}
        self.restarts = 0
        self.failed: dict[str, StartFailure] = {}
        self.skipped: dict[str, list[str]] = {}
        self._last = 0.0

    def due(self) -> bool:
        """Whether ``period_s`` has passed since the last reconcile."""
        return time.monotonic() - self._last >= self.period_s

    def node_names(self) -> dict[str, str]:
        """Node id -> node name of every managed sidecar."""
        return dict(self.names)

    def plan(self, node: Mapping[str, Any], name: str) -> list[SourceSpec]:
        """The sources to open on ``node`` (a ``ray.nodes()`` entry); logs left-out ones once.

        Args:
            node: The node's Ray record (``NodeID``, ``Resources``).
            name: The node's name, for the log.

        Returns:
            The sources that apply there; empty: no sidecar on that node.

        """
        requested = self.sources(dict(node)) if callable(self.sources) else self.sources
        use, skipped = sources_for_node(node.get("Resources") or {}, list(requested))
        left_out = [spec[0] for spec in skipped]
        node_id = str(node["NodeID"])
        if left_out and self.skipped.get(node_id) != left_out:
            log.info(
                "sidecar on %s: Ray sees no GPU on this node, so not opening %s there; %s",
                name,
                ", ".join(left_out),
                f"opening {', '.join(s[0] for s in use)}" if use else "no sidecar on this node",
            )
        if left_out:
            self.skipped[node_id] = left_out
        else:
            self.skipped.pop(node_id, None)
        return use

    def note_start_failure(self, node_id: str, name: str, reason: str) -> StartFailure:
        """Record that the sidecar on ``node_id`` failed in ``__init__``; warn once per reason.

        The next start waits ``retry_s``, doubled after each failure up to
        ``max_retry_s``, rather than the next reconcile (a source that would not
        open fails again at once).
        """
        prev = self.failed.get(node_id)
        delay = self.retry_s if prev is None else min(prev.delay_s * 2, self.max_retry_s)
        failure = StartFailure(
            reason=reason,
            tries=1 if prev is None else prev.tries + 1,
            delay_s=delay,
            retry_at=time.monotonic() + delay,
        )
        self.failed[node_id] = failure
        if prev is None or prev.reason != reason:
            log.warning(
                "sidecar on %s could not start: %s; trying again in %.0f s, then less often "
                "(up to every %.0f s), without warning again for this reason",
                name,
                reason,
                delay,
                self.max_retry_s,
            )
        else:
            log.debug("sidecar on %s failed again (%d tries): %s", name, failure.tries, reason)
        return failure

    def reconcile(self) -> list[str]:
        """Start sidecars on alive nodes without a live one; returns the node ids started."""
        import ray

        self._last = time.monotonic()
        nodes: list[dict[str, Any]] = ray.nodes()  # type: ignore[no-untyped-call]
        alive = [n for n in nodes if n.get("Alive")]
        hosts = [n.get("NodeManagerHostname") or socket.gethostname() for n in alive]
        started = []
        for n, host in zip(alive, hosts, strict=True):
            node_id = n["NodeID"]
            # Several Ray nodes on one host (tests, the demo) need distinct names.
            name = host if hosts.count(host) == 1 else f"{host}-{node_id[:8]}"
            handle = self.handles.get(node_id)
            if handle is None:  # adopt a sidecar an earlier manager started on this node
                try:
                    handle = ray.get_actor(SIDECAR_PREFIX + node_id[:16], namespace=NAMESPACE)
                    self.handles[node_id] = handle
                    self.names[node_id] = name
                except ValueError:
                    handle = None
            if handle is not None:
                try:
                    ray.get(handle.ping.remote(), timeout=self.ping_timeout_s)
                    failure = self.failed.pop(node_id, None)
                    if failure is not None:
                        log.info("sidecar on %s started after %d failures", name, failure.tries)
                    continue
                except Exception as err:
                    reason = init_failure_reason(err)
                    if reason is not None:  # its sources would not open: not a tight loop
                        self.note_start_failure(node_id, name, reason)
                        self.handles.pop(node_id, None)
                        self.names.pop(node_id, None)
                    else:
                        log.warning("sidecar on %s is gone (%s); restarting it", name, err)
                        self.restarts += 1
                    try:
                        ray.kill(handle)
                    except Exception:  # already dead
                        pass
            failure = self.failed.get(node_id)
            if failure is not None and time.monotonic() < failure.retry_at:
                continue
            sources = self.plan(n, name)
            if not sources:  # no requested source applies here (logged once by plan)
                self.handles.pop(node_id, None)
                self.names.pop(node_id, None)
                continue
            opts = dict(self.options)
            if opts.get("journal_dir"):  # one journal per node under the given root
                opts["journal_dir"] = journal_dir_for(opts["journal_dir"], name)
            deadline = time.monotonic() + 30.0
            while True:
                try:
                    self.handles[node_id] = sidecar_actor(node_id, name, list(sources), **opts)
                    break
                except ValueError:  # ActorAlreadyExistsError: a killed one's name not freed yet
                    if time.monotonic() > deadline:
                        raise
                    time.sleep(0.2)
            self.names[node_id] = name
            started.append(node_id)
        live = {n["NodeID"] for n in alive}
        for gone in [k for k in self.handles if k not in live]:
            self.handles.pop(gone)
            self.names.pop(gone, None)
        for book in (self.failed, self.skipped):
            for gone in [k for k in book if k not in live]:
                book.pop(gone)
        return started

    def stop_all(self) -> dict[str, dict[str, int]]:
        """Stop every sidecar (delivering what it holds); returns node name -> counters."""
        import ray

        out = {}
        for node_id, h in list(self.handles.items()):
            try:
                out[self.names[node_id]] = ray.get(h.stop.remote(), timeout=60)
            except Exception as err:
                log.warning("could not stop the sidecar on %s: %s", self.names[node_id], err)
            ray.kill(h)
        self.handles.clear()
        return out


def journal_dir_for(root: str | Path, node: str) -> str:
    """A per-node journal directory under ``root`` (for tests and the demo)."""
    return str(Path(root) / node)
