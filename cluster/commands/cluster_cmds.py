"""``wattwise aggregator start|stop|status``: the aggregator actor from the command line."""

from __future__ import annotations

import argparse
import json
import os
from typing import Any

from cluster.commands.common import add_store_option, console, open_store
from profiler.errors import BadInputError, SourceUnavailableError


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``aggregator start``, ``aggregator stop`` and ``aggregator status``."""
    p = subparsers.add_parser("aggregator", help="the cluster's aggregator (a Ray actor)")
    sub = p.add_subparsers(dest="aggregator_command", required=True, metavar="ACTION")

    start = sub.add_parser("start", help="start the aggregator (or find the running one)")
    add_store_option(start)
    start.add_argument("--address", default="auto", help="Ray cluster address (default: auto)")
    start.add_argument(
        "--port", type=int, default=None, help="serve the HTTP/JSON API on this port (0: any)"
    )
    start.add_argument("--host", default="127.0.0.1", help="API bind address (default loopback)")
    start.add_argument(
        "--token",
        default=None,
        help="bearer token for API writes; prefer $WATTWISE_API_TOKEN (a flag shows in ps); "
        "needed off loopback, at least 16 characters",
    )
    start.add_argument(
        "--sidecars",
        choices=("none", "modelled", "nvml"),
        default="none",
        help="also start one sidecar per node with this power source (default none); nvml "
        "only on nodes whose Ray resources include a GPU",
    )
    start.add_argument(
        "--shards",
        type=int,
        default=1,
        help="aggregator shards; runs are split among them by a hash of the run id (default 1)",
    )
    start.add_argument("--json", action="store_true", help="print the status as JSON")
    start.set_defaults(func=run_start)

    stop = sub.add_parser(
        "stop",
        help="stop the aggregator's sidecars and/or HTTP API, so that a restart does not "
        "start them again (the aggregator itself keeps running)",
    )
    stop.add_argument("--address", default="auto", help="Ray cluster address (default: auto)")
    stop.add_argument("--sidecars", action="store_true", help="stop every node's sidecar")
    stop.add_argument("--api", action="store_true", help="stop serving the HTTP API")
    stop.set_defaults(func=run_stop)

    status = sub.add_parser("status", help="runs, counters and API address of the aggregator")
    status.add_argument("--address", default="auto", help="Ray cluster address (default: auto)")
    status.add_argument("--json", action="store_true", help="print the status as JSON")
    status.set_defaults(func=run_status)


def _connect(address: str) -> None:
    import ray

    from cluster.actors import NAMESPACE

    if ray.is_initialized():
        return
    try:
        ray.init(address=address, namespace=NAMESPACE, logging_level=40)
    except (ConnectionError, RuntimeError) as err:
        raise SourceUnavailableError(
            f"no Ray cluster at address {address!r} ({err}); start one with "
            "'ray start --head' or pass --address HOST:PORT"
        ) from err


def _print(stats: dict[str, Any], runs: list[dict[str, Any]], as_json: bool) -> None:
    from cluster.aggregator import _jsonable

    if as_json:
        print(json.dumps(_jsonable({"aggregator": stats, "runs": runs})))
        return
    out = console()
    out.print(
        f"aggregator: store {stats.get('store')}, API {stats.get('api') or 'off'}, "
        f"{stats['running_runs']} running runs, {stats['samples']} samples in "
        f"{stats['batches']} batches, {stats['pending_rows']} waiting for the store"
    )
    for r in runs:
        proj = r.get("projection") or {}
        e = proj.get("energy_j")
        band = (
            f" [{proj['lower_j']:.0f}, {proj['upper_j']:.0f}]"
            if proj.get("lower_j") is not None
            else ""
        )
        out.print(
            f"  {r['run_id']}: {r['status']}, {r.get('epochs_done')} epochs, measured "
            f"{(r.get('measured_energy_j') or 0):.0f} J, projected (STEP) "
            + (f"{e:.0f} J{band}" if e is not None else "n/a")
        )


def run_start(args: argparse.Namespace) -> int:
    """Run ``wattwise aggregator start``."""
    import ray

    from cluster.actors import aggregators

    token = args.token or os.environ.get("WATTWISE_API_TOKEN")
    from cluster.api import MIN_TOKEN_CHARS, is_loopback

    if args.token:
        console(stderr=True).print(
            "[yellow]warning: --token shows the token to anyone who can list processes "
            "(ps); prefer the environment variable WATTWISE_API_TOKEN[/]"
        )
    if args.port is not None and not is_loopback(args.host):
        if not token:
            raise BadInputError(
                f"--host {args.host} accepts API writes from the network; set "
                "$WATTWISE_API_TOKEN (or give --token), or keep the default 127.0.0.1"
            )
        if len(token) < MIN_TOKEN_CHARS:
            raise BadInputError(
                f"the API token must have at least {MIN_TOKEN_CHARS} characters; found "
                f"{len(token)}. Make one with: python -c 'import secrets; "
                "print(secrets.token_urlsafe())'"
            )
    _connect(args.address)
    handles = aggregators(open_store(args).root, shards=args.shards)
    handle = handles[0]
    if args.port is not None:
        ray.get(handle.start_api.remote(args.host, args.port, token))
    if args.sidecars != "none":
        ray.get(handle.start_sidecars.remote([(args.sidecars, {})]))
    _print(*_merged(handles), args.json)
    return 0


def _merged(handles: list[Any]) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Counters summed over the shards (shard 0's store, API and sidecars) and all their runs."""
    import ray

    stats = ray.get([h.stats.remote() for h in handles])
    out = dict(stats[0])
    for key in ("running_runs", "samples", "batches", "pending_rows"):
        out[key] = sum(int(s.get(key) or 0) for s in stats)
    out["per_shard"] = [
        {k: s.get(k) for k in ("shard", "running_runs", "samples", "batches")} for s in stats
    ]
    runs = [r for rs in ray.get([h.status.remote() for h in handles]) for r in rs]
    return out, runs


def run_status(args: argparse.Namespace) -> int:
    """Run ``wattwise aggregator status``."""
    from cluster.actors import Router, aggregator

    _connect(args.address)
    aggregator(create=False)  # a clear message when none runs
    _print(*_merged(Router().handles()), args.json)
    return 0


def run_stop(args: argparse.Namespace) -> int:
    """Run ``wattwise aggregator stop``."""
    import ray

    from cluster.actors import aggregator

    if not (args.sidecars or args.api):
        raise BadInputError(
            "aggregator stop needs what to stop: --sidecars, --api or both; found neither "
            "(the aggregator itself keeps running: it is a detached actor)"
        )
    _connect(args.address)
    handle = aggregator(create=False)  # a clear message when none runs
    out = console()
    if args.sidecars:
        stopped = ray.get(handle.stop_sidecars.remote())
        out.print(f"stopped the sidecars of {len(stopped)} node(s); a restart starts none")
    if args.api:
        had = ray.get(handle.stop_api.remote())
        out.print("stopped the HTTP API" if had else "the HTTP API was not running")
    return 0
