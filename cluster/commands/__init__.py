"""Sub-commands of the ``wattwise`` CLI, one module per group.

Each module exposes ``register(subparsers)``, which adds its parsers and sets
``func`` to a ``run(args) -> int`` returning the exit status. Bad input is
raised as :class:`profiler.errors.BadInputError`; the CLI prints it as one
line and exits with status 2.
"""

from __future__ import annotations

import argparse

#: Modules registered in the CLI, in help order.
MODULES: tuple[str, ...] = (
    "cluster.commands.store_cmds",
    "cluster.commands.import_cmds",
    "cluster.commands.energy_cmds",
    "cluster.commands.step_cmds",
    "cluster.commands.profiler_cmds",
    "cluster.commands.pre_cmds",
    "cluster.commands.cluster_cmds",
    "cluster.commands.run_cmds",
    "cluster.commands.ops_cmds",
    "cluster.commands.demo_cmds",
)


def bench_subparsers(
    subparsers: argparse._SubParsersAction[argparse.ArgumentParser],
) -> argparse._SubParsersAction[argparse.ArgumentParser]:
    """The sub-parsers of ``wattwise bench``, created on first use.

    Several modules add benchmark commands (``bench step``, ``bench pre``);
    each calls this to get the shared ``bench`` group. The group is kept on
    the ``subparsers`` object itself, so it lives and dies with its parser.
    """
    group: argparse._SubParsersAction[argparse.ArgumentParser] | None = getattr(
        subparsers, "_wattwise_bench", None
    )
    if group is None:
        bench = subparsers.add_parser("bench", help="accuracy benchmarks on recorded runs")
        group = bench.add_subparsers(dest="bench_command", required=True, metavar="BENCH")
        subparsers._wattwise_bench = group  # type: ignore[attr-defined]
    return group
