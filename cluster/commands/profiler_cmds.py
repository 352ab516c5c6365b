"""Profiler commands: ``wattwise exporter`` (dcgm-exporter look-alike), ``wattwise sample``."""

from __future__ import annotations

import argparse
import json
import time
from typing import TYPE_CHECKING, Any

from cluster.commands.common import add_store_option, check_positive, open_store
from profiler.errors import BadInputError

if TYPE_CHECKING:
    from profiler.exporter import DcgmExporter

SOURCE_CHOICES = ("nvml", "dcgm", "rapl", "replay", "modelled")


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``exporter`` and ``sample``."""
    p = subparsers.add_parser(
        "exporter",
        help="serve a recorded trace as a dcgm-exporter at http://HOST:PORT/metrics",
        description="Replay a trace (nvidia-smi CSV, store samples or traces parquet) forever "
        "as fake GPUs, in dcgm-exporter's text format, for Prometheus to scrape.",
    )
    p.add_argument("--replay", metavar="FILE", required=True, help="trace to play")
    p.add_argument("--port", type=int, required=True, help="port to listen on (0: any free)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    p.add_argument("--speed", type=float, default=1.0, help="playback speed (default 1.0)")
    p.add_argument("--model", default=None, help="fake GPU model name (default: the trace's)")
    p.add_argument("--node", default="replay-node", help="Hostname label (default replay-node)")
    p.add_argument(
        "--gpus",
        type=int,
        default=1,
        help="runs of a multi-run file to play as GPUs 0..N-1 (default 1)",
    )
    p.add_argument(
        "--run-id",
        action="append",
        default=None,
        dest="run_ids",
        help="run of a multi-run file to play (repeat for more GPUs)",
    )
    p.add_argument(
        "--tz",
        default="UTC",
        metavar="TZ",
        help="IANA time zone of the trace's naive timestamps (default UTC)",
    )
    p.set_defaults(func=run_exporter)

    s = subparsers.add_parser(
        "sample",
        help="run a power sidecar: sample sources and write them to the store",
        description="Sample power sources at a fixed interval and ship batches to the local "
        "store, spilling to a journal if the store cannot be written.",
    )
    s.add_argument(
        "--source",
        action="append",
        choices=SOURCE_CHOICES,
        required=True,
        help="power source (repeat for several)",
    )
    s.add_argument("--interval", type=float, default=1.0, help="seconds between samples (>= 0.1)")
    s.add_argument(
        "--duration",
        type=float,
        default=None,
        help="seconds to run (default: until interrupted, or a replay ends)",
    )
    s.add_argument("--replay", metavar="FILE", default=None, help="trace for --source replay")
    s.add_argument("--speed", type=float, default=1.0, help="replay speed (default 1.0)")
    s.add_argument("--model", default=None, help="model name for replayed devices")
    s.add_argument(
        "--prometheus", metavar="URL", default=None, help="Prometheus URL for --source dcgm"
    )
    s.add_argument(
        "--exporter-url",
        metavar="URL",
        default=None,
        help="scrape this dcgm-exporter /metrics instead of Prometheus (--source dcgm)",
    )
    s.add_argument(
        "--hostname", default=None, help="node whose DCGM series to read (default: --node)"
    )
    s.add_argument(
        "--board-power-w",
        type=float,
        default=100.0,
        help="CPU board power at full load for --source modelled (default 100 W)",
    )
    s.add_argument("--run", dest="run_id", default=None, help="run id to store the samples under")
    s.add_argument("--node", default=None, help="node name (default: this host's name)")
    s.add_argument(
        "--journal",
        metavar="DIR",
        default=None,
        help="spill journal directory (default: $WATTWISE_JOURNAL/<node>, else "
        "~/.local/state/wattwise/journal/<node>); batches there wait for their own store",
    )
    s.add_argument(
        "--batch-interval",
        type=float,
        default=5.0,
        help="seconds between batches shipped to the store (default 5)",
    )
    s.add_argument("--json", action="store_true", help="print the final counters as JSON")
    add_store_option(s)
    s.set_defaults(func=run_sample)


def build_exporter(args: argparse.Namespace) -> DcgmExporter:
    """The exporter ``wattwise exporter`` serves, listening but not yet serving.

    Raises:
        BadInputError: A port outside 0..65535, an unknown ``--tz``, a trace that
            cannot be replayed, or an address that cannot be listened on.

    """
    import zoneinfo

    from profiler.exporter import DcgmExporter
    from profiler.sources.replay import ReplaySource

    if not 0 <= args.port <= 65535:
        raise BadInputError(f"--port must be 0..65535; found {args.port}")
    try:
        zoneinfo.ZoneInfo(args.tz)
    except (zoneinfo.ZoneInfoNotFoundError, ValueError) as err:
        raise BadInputError(
            f"unknown time zone {args.tz!r} (--tz); expected an IANA name such as 'UTC' or "
            "'Europe/Madrid'"
        ) from err
    # As DcgmExporter.for_file does, with the time zone of the trace's naive timestamps.
    source = ReplaySource.from_file(
        args.replay,
        run_ids=args.run_ids,
        max_runs=None if args.run_ids else args.gpus,
        tz=args.tz,
        speed=args.speed,
        model=args.model,
        device_prefix="",
        loop=True,
        counter=True,
    )
    try:
        return DcgmExporter(source, node=args.node, host=args.host, port=args.port)
    except OSError as err:
        raise BadInputError(f"cannot listen on {args.host}:{args.port}: {err}") from err


def run_exporter(args: argparse.Namespace) -> int:
    """Serve until interrupted."""
    exp = build_exporter(args)
    print(
        f"serving {len(exp.source.devices)} fake GPU(s) from {args.replay} at {exp.url} "
        f"(speed {args.speed}x); Ctrl-C stops",
        flush=True,
    )
    try:
        exp.serve_forever()
    finally:
        exp.stop()
    return 0


def _open_sources(args: argparse.Namespace, node: str) -> list[Any]:
    from profiler.sources import open_source

    out: list[Any] = []
    for name in dict.fromkeys(args.source):
        if name == "replay":
            if not args.replay:
                raise BadInputError("--source replay needs --replay FILE (a trace to play)")
            from profiler.sources.replay import ReplaySource

            out.append(ReplaySource.from_file(args.replay, speed=args.speed, model=args.model))
        elif name == "dcgm":
            if args.exporter_url:
                out.append(open_source("dcgm-exporter", args.exporter_url))
            elif args.prometheus:
                out.append(open_source("dcgm", args.prometheus, hostname=args.hostname or node))
            else:
                raise BadInputError(
                    "--source dcgm needs --prometheus URL (with --hostname) or --exporter-url URL"
                )
        elif name == "modelled":
            out.append(open_source("modelled", args.board_power_w))
        else:
            out.append(open_source(name))
    return out


def run_sample(args: argparse.Namespace) -> int:
    """Sample until the duration passes, a replay ends, or Ctrl-C."""
    import socket

    from profiler.sidecar import Sidecar, StoreReceiver

    if args.duration is not None:
        check_positive(args.duration, "--duration", "a finite number of seconds")
    check_positive(args.batch_interval, "--batch-interval", "a finite number of seconds")
    node = args.node or socket.gethostname()
    sources = _open_sources(args, node)
    store = open_store(args)
    side = Sidecar(
        sources,
        node=node,
        run_id=args.run_id,
        interval_s=args.interval,
        batch_interval_s=args.batch_interval,
        receiver=StoreReceiver(store),
        journal=args.journal,
    )
    replays = [s for s in sources if s.name == "replay"]
    t0 = time.monotonic()
    side.start()
    try:
        while True:
            if args.duration is not None and time.monotonic() - t0 >= args.duration:
                break
            if replays and len(replays) == len(sources) and all(r.exhausted for r in replays):
                break
            time.sleep(min(0.1, args.interval))
    except KeyboardInterrupt:
        pass
    finally:
        side.close()
    st = side.stats
    if args.json:
        print(json.dumps({k: getattr(st, k) for k in st.__slots__}))
    else:
        print(
            f"{st.samples} samples from {len(sources)} source(s) in {time.monotonic() - t0:.1f} s: "
            f"{st.sent} written to {store.root}, {st.spilled} spilled to the journal "
            f"{side.journal.directory}, {st.lost} lost, {st.marked} marked"
        )
    return 0
