"""``wattwise runs``: list the runs in the store."""

from __future__ import annotations

import argparse

from cluster.commands.common import add_store_option, console, open_store, print_whole


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add the ``runs`` command."""
    p = sub.add_parser("runs", help="list the runs in the store")
    p.add_argument("--json", action="store_true", help="print JSON lines instead of a table")
    add_store_option(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Run ``wattwise runs``."""
    store = open_store(args)
    runs = store.runs()
    if args.json:
        for row in runs.with_columns(
            runs["start"].dt.to_string("%Y-%m-%dT%H:%M:%S%.fZ"),
            runs["end"].dt.to_string("%Y-%m-%dT%H:%M:%S%.fZ"),
        ).iter_rows(named=True):
            import json

            print(json.dumps(row))
        return 0
    from rich.table import Table

    table = Table(title=f"{runs.height} runs in {store.root}", title_justify="left")
    for name in ("run", "node type", "GPU", "arch", "status", "epochs", "duration s", "energy kJ"):
        table.add_column(name)
    for r in runs.iter_rows(named=True):
        table.add_row(
            r["run_id"],
            r["node_type"] or "-",
            r["gpu_model"] or "-",
            r["architecture"] or "-",
            r["status"],
            str(r["trained_epochs"] or "-"),
            "-" if r["duration_s"] is None else f"{r['duration_s']:.0f}",
            "-" if r["energy_j"] is None else f"{r['energy_j'] / 1e3:.1f} ({r['energy_source']})",
        )
    print_whole(console(), table)
    return 0
