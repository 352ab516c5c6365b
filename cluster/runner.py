"""The job runner: a training command on a chosen node type of a Ray cluster, recorded as a run.

:func:`run_job` (behind ``wattwise run``, which works as the entrypoint of
``ray job submit``):

1. checks the node type against the cluster's ``node_type:<name>`` resources
   (``auto``: the PRE recommendation, see :mod:`cluster.placement`);
2. gets or starts the aggregator (:func:`cluster.actors.aggregator`) and, when
   it has none, one sidecar per node (NVML where Ray sees GPUs, else the
   modelled CPU source, whose samples say ``modelled``);
3. places a small actor on that node type (resource request
   ``{"node_type:<name>": 0.001}`` plus CPUs/GPUs) that starts the command
   as a subprocess with ``WATTWISE_RUN_ID``, ``WATTWISE_STORE``,
   ``WATTWISE_AGGREGATOR`` and ``WATTWISE_EPOCHS`` in its environment;
4. records the run (``running``), tells the node's sidecar which samples
   are the run's, forwards the epoch marks the command's
   :class:`profiler.hooks.EpochHooks` write to the store to the aggregator
   while it runs, and at the end records ``finished`` or ``failed``
   (non-zero exit) with the measured totals.

**Runs sharing a node** each get their own samples
(:meth:`profiler.sidecar.Sidecar.attach_job`): a job given GPUs owns those
devices (Ray's ``get_gpu_ids()`` in the job's actor, NVML indices); a job on
a node measured by the modelled CPU source gets a modelled source of its own
process tree (:mod:`profiler.sources.process`, attached once the command
runs, counting from its start); only where neither applies (a replay or
RAPL source and no GPU) does the run take the whole node's samples, as
before. ``num_cpus`` (default 1) is what the job reserves, not a device of
measurement: pass a fraction to run several jobs on one CPU.

**Clocks.** The run record's config names the node whose clock the epoch
marks use (``clock_home``: the node of the job's actor, where the hooks and
the mark relay run); the relay stamps every forward with that node's clock
so the aggregator estimates its offset (see :mod:`cluster.aggregator`).
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import secrets
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from profiler.errors import BadInputError, SourceUnavailableError
from profiler.schema import check_run_id

if TYPE_CHECKING:
    import polars as pl

    from estimators.features import JobDescription
    from estimators.recommend import NodeType

log = logging.getLogger(__name__)

ENV_STORE = "WATTWISE_STORE"
ENV_AGGREGATOR = "WATTWISE_AGGREGATOR"
ENV_NODE_TYPE = "WATTWISE_NODE_TYPE"

#: Called with the run's aggregator summary while it runs; True stops the command.
StopWhen = Callable[[dict[str, Any]], bool]


def default_sources(node: Mapping[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    """A node's sidecar sources: NVML where Ray sees GPUs, else the modelled CPU source."""
    if float((node.get("Resources") or {}).get("GPU", 0.0)) > 0:
        return [("nvml", {})]
    return [("modelled", {})]


def new_run_id(node_type: str) -> str:
    """A fresh run id: ``<node type>-<UTC yyyymmdd-hhmmss>-<6 hex>``."""
    stamp = datetime.now(UTC).strftime("%Y%m%d-%H%M%S")
    safe = "".join(c if c.isalnum() or c in "._-" else "-" for c in node_type)[:40]
    return check_run_id(f"{safe}-{stamp}-{secrets.token_hex(3)}")


def job_from_command(command: Sequence[str]) -> JobDescription | None:
    """The job of a built-in workload command (``wattwise train ...``), else ``None``.

    Also recognised: ``python -m cluster.cli train ...``.
    """
    import argparse

    from cluster.train import add_train_arguments, config_from_args

    for i, word in enumerate(command[:-1]):
        if os.path.basename(word) in ("wattwise", "cluster.cli") and command[i + 1] == "train":
            parser = argparse.ArgumentParser(add_help=False)
            add_train_arguments(parser)
            args, _ = parser.parse_known_args(list(command[i + 2 :]))
            return config_from_args(args).job()
    return None


def run_record(
    run_id: str,
    *,
    node_type: str,
    command: Sequence[str],
    job: JobDescription | None,
    planned_epochs: int | None,
    gpu_model: str | None,
    gpu_count: int,
    job_name: str | None,
    extra: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """The ``runs`` row of a starting run (FLOPs measured for a torchvision model)."""
    row: dict[str, Any] = {
        "run_id": run_id,
        "job_name": job_name or os.path.basename(command[0]),
        "node_type": node_type,
        "gpu_model": gpu_model,
        "gpu_count": gpu_count,
        "planned_epochs": planned_epochs,
        "status": "running",
        "start": datetime.now(UTC),
    }
    config: dict[str, Any] = {"command": list(command), **(extra or {})}
    if job is not None:
        from estimators.features import complete_job

        try:
            full = complete_job(job)
        except BadInputError as err:
            log.warning("run %s: job description incomplete (%s); PRE cannot learn it", run_id, err)
            full = job
        row.update(
            architecture=full.architecture,
            batch_size=full.batch_size,
            image_height=full.image_height,
            image_width=full.image_width,
            training_size=full.training_size,
            validation_size=full.validation_size,
            gflops_forward=full.gflops_forward,
            precision=full.precision,
        )
        if row["planned_epochs"] is None:
            row["planned_epochs"] = full.planned_epochs
        for k in ("gflops_train", "params", "layers", "activation_mb"):
            if getattr(full, k) is not None:
                config[k] = getattr(full, k)
    row["config"] = json.dumps(config)
    return row


# ------------------------------------------------------------------------------ the job's actor


class _JobActorImpl:
    """Runs one command as a subprocess on its node and forwards its epoch marks.

    A threaded actor: :meth:`node` and :meth:`stop` answer while :meth:`run` waits.
    """

    def __init__(self) -> None:
        self.proc: subprocess.Popen[bytes] | None = None
        self.stopped = False
        self._started = threading.Event()

    def node(self) -> dict[str, Any]:
        """Where this actor runs: Ray node id (hex), host name, pid, and the GPU ids Ray gave it."""
        import ray

        return {
            "node_id": ray.get_runtime_context().get_node_id(),
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "gpus": [str(g) for g in ray.get_gpu_ids()],
        }

    def command_pid(self, timeout_s: float = 60.0) -> int | None:
        """Process id of the command once started (``None``: it could not start)."""
        self._started.wait(timeout=timeout_s)
        return None if self.proc is None else int(self.proc.pid)

    def run(
        self,
        command: list[str],
        env: dict[str, str],
        run_id: str,
        relay_s: float,
        node: str | None = None,
    ) -> dict[str, Any]:
        """Run ``command`` to its end; returns its outcome.

        The outcome is ``{"returncode", "stopped", "marks", "refused_marks"}``
        (marks delivered to the aggregator and marks it refused).

        Output goes to this actor's stdout/stderr, which Ray forwards to the
        driver (the job's log under ``ray job submit``). ``node`` is the
        sidecar's name of this node, sent with the epoch marks (their clock).
        A command that cannot start (no such program, not executable) gives
        return code 127 and ``"error"``, the reason, which is also logged.
        """
        relay = MarkRelay(run_id, env[ENV_STORE], node=node)
        try:
            self.proc = subprocess.Popen(command, env={**os.environ, **env})
        except OSError as err:
            self._started.set()
            why = f"could not start the command {command[0]!r}: {err}"
            log.error("run %s: %s", run_id, why)
            return {"returncode": 127, "stopped": False, "marks": 0, "error": why}
        self._started.set()
        while True:
            rc = _exited(self.proc)
            if rc is not None:
                break
            relay.forward()
            time.sleep(relay_s)
        relay.forward(final=True)
        return {
            "returncode": rc,
            "stopped": self.stopped,
            "marks": relay.sent,
            "refused_marks": relay.refused,
        }

    def reap(self) -> int | None:
        """Reap the ended command (a zombie after :meth:`run` so a final read sees its CPU)."""
        return None if self.proc is None else self.proc.poll()

    def stop(self, grace_s: float = 10.0) -> bool:
        """SIGTERM the command (SIGKILL after ``grace_s``); True if it was running."""
        self._started.wait(timeout=60)
        proc = self.proc
        if proc is None or proc.returncode is not None or _exited(proc) is not None:
            return False
        self.stopped = True
        proc.terminate()
        try:
            proc.wait(timeout=grace_s)
        except subprocess.TimeoutExpired:
            proc.kill()
        return True


def _exited(proc: subprocess.Popen[bytes]) -> int | None:
    """The exit status of an ended process without reaping it (``None`` while it runs).

    The process stays a zombie, so its ``/proc/<pid>/stat`` still holds its
    whole CPU time for the process source's final read; :meth:`Popen.poll`
    reaps it later. Negative: killed by that signal.
    """
    if proc.returncode is not None:
        return proc.returncode
    try:
        info = os.waitid(os.P_PID, proc.pid, os.WEXITED | os.WNOWAIT | os.WNOHANG)
    except ChildProcessError:  # reaped already (by poll): ask Popen
        return proc.poll()
    if info is None or info.si_pid == 0:
        return None
    if info.si_code == os.CLD_EXITED:
        return int(info.si_status)
    return -int(info.si_status)


class MarkRelay:
    """Forwards a run's epoch marks from the store to the aggregator actor, each once.

    The training process writes marks with the default ``EpochHooks`` sink
    (the store named by ``$WATTWISE_STORE``), so it needs no Ray connection;
    this relay, living in the job's actor, hands them to the aggregator so
    its per-epoch energy and STEP projection follow the run live.

    Each forward carries ``node`` (the node whose clock the marks use) and
    the send time on this process's clock, from which the aggregator
    estimates that node's clock offset (as it does from sample batches).

    The aggregator refuses a whole batch when one mark is bad (it overlaps
    a mark it holds, restarts an epoch, or the run has ended). Such a refusal
    (:class:`profiler.errors.BadInputError`) is deterministic, so the relay
    then sends that batch's marks one at a time, in epoch order: the good
    ones are taken and each refused one is logged once and not sent again
    (a mark whose start or end changes in the store is a new mark and is
    tried). Any other failure (timeout, aggregator gone) is transient: the
    marks are kept and sent again on the next forward.

    Args:
        run_id: The run.
        store_root: The store the training process writes to.
        node: The sidecar's name of this node (``None``: the run's home node).
        clock: UTC clock stamped on each forward (default
            :func:`profiler.sources.base.utc_now`).

    Attributes:
        sent: Marks delivered so far.
        refused: Marks the aggregator refused so far (kept in the store, which
            the run's final figures read; missing from the live view).

    """

    def __init__(
        self,
        run_id: str,
        store_root: str,
        *,
        node: str | None = None,
        clock: Callable[[], datetime] | None = None,
    ) -> None:
        from profiler.sources.base import utc_now
        from profiler.store import Store

        self.node = node
        self.clock = clock or utc_now
        self.run_id = run_id
        self.store = Store(store_root)
        self.sent = 0
        self.refused = 0
        self._seen: set[tuple[int, Any, Any]] = set()
        self._refused: set[tuple[int, Any, Any]] = set()
        self._handle: Any = None

    def forward(self, *, final: bool = False) -> int:
        """Send marks not sent (nor refused) yet; returns how many were delivered.

        Returns 0 when the aggregator is away (the marks are sent next time).
        """
        import polars as pl

        try:
            marks = self.store.epochs(self.run_id)
        except Exception as err:  # a store being written: try again next time
            log.debug("run %s: could not read epoch marks yet: %s", self.run_id, err)
            return 0
        keys = [(int(e), s, t) for e, s, t in marks.select("epoch", "start", "end").iter_rows()]
        new = [k not in self._seen and k not in self._refused for k in keys]
        if not any(new):
            return 0
        fresh = marks.filter(pl.Series(new)).sort("epoch")
        timeout_s = 30.0 if final else 10.0
        try:
            self._send(fresh, timeout_s)
        except Exception as err:
            reason = self._refusal(err)
            if reason is None:  # kept in the store; the aggregator reads it on rebuild
                self._handle = None
                log.warning("run %s: aggregator did not take epoch marks: %s", self.run_id, err)
                return 0
            if fresh.height == 1:
                self._refuse(fresh, reason)
                return 0
            return self._one_by_one(fresh, timeout_s)
        self._seen.update(k for k, n in zip(keys, new, strict=True) if n)
        self.sent += fresh.height
        return fresh.height

    def _send(self, marks: pl.DataFrame, timeout_s: float) -> None:
        """Hand ``marks`` (an ``epochs`` frame) to the run's aggregator shard; raises as it did."""
        import ray

        from cluster.actors import Router

        if self._handle is None:
            self._handle = Router().for_run(self.run_id)
        ray.get(
            self._handle.ingest_epochs.remote(marks, node=self.node, sent_at=self.clock()),
            timeout=timeout_s,
        )

    def _one_by_one(self, marks: pl.DataFrame, timeout_s: float) -> int:
        """Send ``marks`` (an ``epochs`` frame sorted by epoch) one at a time after a refusal.

        Returns how many were delivered. A transient failure stops here; the
        marks not tried yet are sent on the next forward.
        """
        taken = 0
        for i in range(marks.height):
            one = marks.slice(i, 1)
            try:
                self._send(one, timeout_s)
            except Exception as err:
                reason = self._refusal(err)
                if reason is None:
                    self._handle = None
                    log.warning("run %s: aggregator did not take epoch marks: %s", self.run_id, err)
                    break
                self._refuse(one, reason)
                continue
            self._seen.add(self._key(one))
            self.sent += 1
            taken += 1
        return taken

    def _refuse(self, mark: pl.DataFrame, reason: BadInputError) -> None:
        """Remember one refused mark (not sent again while unchanged) and say why, once."""
        key = self._key(mark)
        self._refused.add(key)
        self.refused += 1
        epoch, start, end = key
        log.warning(
            "run %s: the aggregator refused the mark of epoch %d (%s to %s); it stays in the "
            "store but not in the live view, and is not sent again unless the store's copy "
            "changes. Reason: %s",
            self.run_id,
            epoch,
            start.isoformat() if isinstance(start, datetime) else start,
            end.isoformat() if isinstance(end, datetime) else end,
            reason,
        )

    @staticmethod
    def _key(mark: pl.DataFrame) -> tuple[int, Any, Any]:
        """(epoch, start, end) of a one-row marks frame, as :meth:`forward` keys marks."""
        epoch, start, end = mark.select("epoch", "start", "end").row(0)
        return int(epoch), start, end

    @staticmethod
    def _refusal(err: BaseException) -> BadInputError | None:
        """The aggregator's own refusal behind a Ray error (``None``: a transient failure).

        Ray re-raises an actor's exception as a ``RayTaskError`` whose
        ``cause`` is the original (and, where it can, as a class inheriting
        from both); the cause's message is the aggregator's reason without
        Ray's traceback.
        """
        cause = getattr(err, "cause", None)
        if isinstance(cause, BadInputError):
            return cause
        return err if isinstance(err, BadInputError) else None


# ------------------------------------------------------------------------------ the driver side


@dataclass(frozen=True, slots=True)
class RunResult:
    """How a run went.

    Attributes:
        run_id: The run.
        node_type: Node type it ran on.
        node_id: Ray node id (hex) it ran on.
        status: ``finished`` or ``failed``.
        returncode: The command's exit status (negative: killed by that signal).
        stopped: Whether the runner stopped it (probe stable, time limit).
        summary: The aggregator's summary of the run (energy in J, epochs, STEP projection).
        placement: The placement hints used (``source`` says why this node type).
        error: Why the command could not start (``None``: it started).
        end_error: Why the aggregator did not confirm the run's end (``None``:
            it did); ``status`` is still the command's outcome.

    """

    run_id: str
    node_type: str
    node_id: str
    status: str
    returncode: int
    stopped: bool
    summary: dict[str, Any] = field(default_factory=dict)
    placement: dict[str, Any] = field(default_factory=dict)
    error: str | None = None
    end_error: str | None = None


def cluster_node_types() -> dict[str, dict[str, Any]]:
    """The connected Ray cluster's node types (see :func:`cluster.placement.node_types`)."""
    import ray

    from cluster.placement import node_types

    return node_types(ray.nodes())  # type: ignore[no-untyped-call]


def ensure_aggregator(
    store_root: str | os.PathLike[str] | None = None,
    *,
    sources: Any = None,
    sidecar_options: Mapping[str, Any] | None = None,
    aggregator_options: Mapping[str, Any] | None = None,
) -> tuple[Any, str]:
    """The aggregator (started if none runs) with sidecars; returns (handle, store root).

    Args:
        store_root: Store for a new aggregator; a running one keeps its own.
        sources: Sidecar power sources (list or function of the node record);
            default :func:`default_sources`.
        sidecar_options: ``interval_s``, ``batch_interval_s``, ... of new sidecars.
        aggregator_options: Options of a new aggregator.

    """
    import ray

    from cluster.actors import aggregator

    # Several runners may start at once (probes, concurrent job submissions): one at a
    # time per cluster checks and starts the sidecars, or two would race for their names.
    with _ENSURE_LOCK, _cluster_lock():
        handle = aggregator(store_root, options=dict(aggregator_options or {}))
        stats = ray.get(handle.stats.remote(), timeout=120)
        if stats.get("sidecars") is None:
            ray.get(
                handle.start_sidecars.remote(
                    sources or default_sources, dict(sidecar_options or {"interval_s": 0.5})
                ),
                timeout=120,
            )
    return handle, str(stats["store"])


_ENSURE_LOCK = threading.Lock()


@contextlib.contextmanager
def _cluster_lock() -> Iterator[None]:
    """An exclusive file lock per Ray cluster (by GCS address) among processes of this host."""
    import fcntl
    import hashlib
    import tempfile

    import ray

    key = hashlib.sha1(str(ray.get_runtime_context().gcs_address).encode()).hexdigest()[:12]
    path = os.path.join(tempfile.gettempdir(), f"wattwise-runner-{key}.lock")
    with open(path, "a+b") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _sidecar_on(node_id: str, timeout_s: float) -> Any | None:
    import ray

    from cluster.actors import NAMESPACE, SIDECAR_PREFIX

    deadline = time.monotonic() + timeout_s
    while True:
        try:
            return ray.get_actor(SIDECAR_PREFIX + node_id[:16], namespace=NAMESPACE)
        except ValueError:
            if time.monotonic() > deadline:
                return None
            time.sleep(0.2)


def choose_node_type(
    node_type: str,
    *,
    types: Mapping[str, Mapping[str, Any]],
    job: JobDescription | None,
    store_root: str,
    inventory: list[NodeType] | None = None,
) -> dict[str, Any]:
    """Placement hints for ``node_type`` (``auto``: the PRE recommendation among alive node types).

    Raises:
        BadInputError: Unknown node type or none alive; ``auto`` without a job
            description or without an inventory with GPU models.

    """
    import ray

    from cluster.placement import (
        check_node_type,
        inventory_from_ray,
        recommend_hints,
        simple_hints,
    )

    if node_type != "auto":
        check_node_type(node_type, types)
        gpu_model = types[node_type].get("gpu_model")
        if inventory is not None:
            match = [n for n in inventory if n.name == node_type]
            if match:
                from cluster.placement import hints_for

                return {**hints_for(match[0]), "source": "named"}
        hints = simple_hints(node_type)
        hints.update(source="named", gpu_model=gpu_model)
        gpus = float(types[node_type].get("gpus") or 0)
        if gpus > 0:
            hints.update(gpu=True, num_gpus=int(gpus))
            hints["ray_options"]["num_gpus"] = 1.0
        return hints
    if job is None:
        raise BadInputError(
            "--node-type auto needs a job description to predict with: run the built-in "
            "workload ('-- wattwise train --arch ...'), or name a node type with --node-type "
            "TYPE ('wattwise placement --arch ARCH --batch-size N ...' recommends one for "
            "a job described by its options)"
        )
    inv = inventory if inventory is not None else inventory_from_ray(ray.nodes())  # type: ignore[no-untyped-call]
    inv = [n for n in inv if n.name in types and types[n.name]["alive"]]
    if not inv:
        raise BadInputError(
            f"--node-type auto: no node type of the inventory has alive nodes in this cluster "
            f"(cluster node types: {sorted(types)})"
        )
    from pathlib import Path

    from cluster.retrain import latest_model

    try:
        model = latest_model(Path(store_root) / "models")
    except BadInputError as err:
        log.warning("--node-type auto: %s; using the default node type", err)
        model = None
    return recommend_hints(job, inv, model)


def check_job_numbers(
    *, epochs: int | None = None, num_cpus: float | None = 1.0, num_gpus: float | None = None
) -> None:
    """Refuse planned epochs and resource requests that no run can have.

    Checked before Ray is used: Ray refuses a negative or too fine resource
    quantity only when the job's actor is created, after the aggregator and
    sidecars were started.

    Args:
        epochs: Planned epochs (``None``: not given).
        num_cpus: CPUs to reserve (``None``: not given).
        num_gpus: GPUs to reserve (``None``: not given).

    Raises:
        BadInputError: ``epochs`` is not > 0, or a resource quantity is not a
            finite number >= 0 in steps of at least 0.0001 (Ray's resolution).

    """
    if epochs is not None and epochs <= 0:
        raise BadInputError(f"--epochs must be an integer > 0; found {epochs}")
    for name, value in (("--num-cpus", num_cpus), ("--num-gpus", num_gpus)):
        if value is None:
            continue
        if not math.isfinite(value) or value < 0:
            raise BadInputError(f"{name} must be a finite number >= 0; found {value}")
        if 0 < value < 0.0001:
            raise BadInputError(f"{name} must be 0 or at least 0.0001 (Ray's step); found {value}")


def _record_end(
    finish: Callable[[float], Any],
    query: Callable[[float], Any],
    run_id: str,
    status: str,
) -> tuple[dict[str, Any], str | None]:
    """Record the end of a run whose command has ended; returns (summary, why not confirmed).

    The status is the command's outcome, whatever the aggregator does: a
    finish call that timed out may still go through, so a slow (or restarted)
    aggregator never gets the run recorded as ``failed`` here. The end is asked
    for once more with the same status (an aggregator that took the first call
    refuses it as not running), then the aggregator's summary of the run is read.

    Args:
        finish: ``finish(timeout_s)`` records the end with ``status`` and
            returns the aggregator's summary.
        query: ``query(timeout_s)`` returns the aggregator's summary of the run.
        run_id: The run (for the log).
        status: ``finished`` or ``failed``.

    Returns:
        The summary (empty when none could be read) and ``None`` when the
        aggregator has the run ended with ``status``, else the reason it is
        not known to.

    """
    errors: list[str] = []
    for timeout_s in (120.0, 30.0):
        try:
            return dict(finish(timeout_s)), None
        except Exception as err:
            errors.append(_first_line(err))
            log.warning("run %s: recording its end as %r failed: %s", run_id, status, err)
    summary: dict[str, Any] = {}
    try:
        summary = dict(query(10.0))
    except Exception as err:
        errors.append(_first_line(err))
    if summary.get("status") == status:
        return summary, None
    return summary, (
        f"the aggregator did not confirm the run's end as {status!r} ({'; '.join(errors)}); "
        "what was measured stays in the store, but the run's record may say 'running' "
        "(see 'wattwise aggregator status')"
    )


def _first_line(err: BaseException) -> str:
    """``Type: first line of the message`` (a Ray error's message carries a whole traceback)."""
    lines = str(err).strip().splitlines()
    return f"{type(err).__name__}: {lines[0] if lines else ''}"


def check_new_run_id(run_id: str, store_root: str | os.PathLike[str] | None) -> None:
    """Refuse ``run_id`` when the store already has it as an ended run.

    A run id names one run: reusing that of a finished or failed run would mix
    the old run's record, samples and epoch marks with the new run's. A run
    still ``running`` is allowed (its record is updated, as by the aggregator).

    Args:
        run_id: The run id asked for.
        store_root: The store (``None``: the default store).

    Raises:
        BadInputError: The run id is malformed, or the store has it as a run
            that has ended.

    """
    import polars as pl

    from profiler.store import Store

    check_run_id(run_id)
    store = Store(store_root)
    known = store.runs().filter(pl.col("run_id") == run_id)
    if known.height == 0 or known["status"][0] == "running":
        return
    end = known["end"][0]
    when = f"ended at {end.isoformat()}" if end is not None else "end time not recorded"
    raise BadInputError(
        f"--run-id {run_id!r}: the store at {store.root} already has this run as "
        f"{known['status'][0]!r} ({when}); expected a new run id. Choose another id (or leave "
        "--run-id out for a generated one)"
    )


def run_job(
    command: Sequence[str],
    *,
    node_type: str,
    run_id: str | None = None,
    epochs: int | None = None,
    store_root: str | os.PathLike[str] | None = None,
    job: JobDescription | None = None,
    job_name: str | None = None,
    inventory: list[NodeType] | None = None,
    num_cpus: float = 1.0,
    num_gpus: float | None = None,
    sources: Any = None,
    sidecar_options: Mapping[str, Any] | None = None,
    stop_when: StopWhen | None = None,
    time_limit_s: float | None = None,
    poll_s: float = 0.5,
    relay_s: float = 0.5,
    extra_env: Mapping[str, str] | None = None,
    on_start: Callable[[str, dict[str, Any]], object] | None = None,
    extra_config: Mapping[str, Any] | None = None,
) -> RunResult:
    """Run ``command`` on a node of ``node_type`` as a recorded, measured run.

    Needs a connected Ray cluster (``ray.init``). See the module docstring.

    Args:
        command: The program and its arguments.
        node_type: A node type of the cluster, or ``auto`` (PRE recommendation).
        run_id: Run id (default: a new one).
        epochs: Planned epochs (for STEP, and the length ``auto`` places and
            predicts for, overriding ``job``'s); default from the built-in
            workload's ``--epochs`` or ``job``.
        store_root: Store for a new aggregator (a running one keeps its own).
        job: Job description (default: parsed from a ``wattwise train`` command).
        job_name: Human name of the job.
        inventory: Node types with GPU models (for ``auto``; default from the cluster).
        num_cpus: CPUs the job's actor reserves on its node (a fraction lets
            several jobs share a CPU; each still gets its own samples).
        num_gpus: GPUs it reserves (default: 1 on GPU node types, else 0).
        sources: Sidecar power sources when the runner starts the sidecars.
        sidecar_options: Options of those sidecars (default ``interval_s=0.5``).
        stop_when: Polled with the aggregator's summary of the run every
            ``poll_s``; True stops the command (probes).
        time_limit_s: Stop the command after this many s.
        poll_s: Seconds between checks of ``stop_when`` and the time limit.
        relay_s: Seconds between forwards of epoch marks to the aggregator.
        extra_env: More environment variables for the command.
        on_start: Called with (run_id, placement hints) once the command runs.
        extra_config: More keys for the run record's ``config`` JSON.

    Returns:
        The result; ``status`` is ``failed`` when the command exits non-zero
        (unless the runner stopped it) or cannot start (``error`` says why).
        An aggregator that does not confirm the run's end leaves ``status``
        as the command's outcome and says why in ``end_error``.

    Raises:
        BadInputError: Empty command, ``epochs`` not > 0, a negative or
            non-finite ``num_cpus``/``num_gpus``, bad run id, or a run id the
            store has as an ended run (all checked before Ray is used);
            unknown node type or none alive.
        SourceUnavailableError: Ray is not initialised.

    """
    import ray

    from cluster.actors import AGGREGATOR_NAME, NAMESPACE, Router

    if not command:
        raise BadInputError("expected a command after '--', e.g. -- python train.py")
    check_job_numbers(epochs=epochs, num_cpus=num_cpus, num_gpus=num_gpus)
    if run_id is not None:
        check_run_id(run_id)
        if store_root is not None:
            check_new_run_id(run_id, store_root)  # fail early, before any Ray work
    if not ray.is_initialized():
        raise SourceUnavailableError("run_job needs a Ray connection; call ray.init() first")
    if job is None:
        job = job_from_command(command)
    if job is not None and epochs is not None:
        # Placed, predicted and recorded for the run's length, not the job's own default.
        job = replace(job, planned_epochs=epochs)
    types = cluster_node_types()
    agg, root = ensure_aggregator(store_root, sources=sources, sidecar_options=sidecar_options)
    if run_id is not None and (store_root is None or os.path.realpath(store_root) != root):
        check_new_run_id(run_id, root)  # a running aggregator keeps its own store
    hints = choose_node_type(node_type, types=types, job=job, store_root=root, inventory=inventory)
    chosen = str(hints["node_type"])
    run_id = run_id or new_run_id(chosen)
    agg = Router().for_run(run_id)  # the run's aggregator shard (shard 0 when unsharded)
    options = dict(hints["ray_options"])
    options["num_cpus"] = num_cpus
    if num_gpus is not None:
        options["num_gpus"] = num_gpus
    actor: Any = (
        ray.remote(_JobActorImpl)
        .options(max_concurrency=4, name=f"wattwise-job-{run_id}", namespace=NAMESPACE, **options)
        .remote()
    )
    started = finished = False
    end_status = "failed"  # what the run is recorded as if this call ends early
    ref = None
    sidecar = None
    try:
        where = ray.get(actor.node.remote())  # waits until the node type has room
        sidecar = _sidecar_on(where["node_id"], timeout_s=30.0)
        node_name = None
        if sidecar is None:
            log.warning("run %s: no sidecar on node %s; energy is not measured", run_id, where)
        else:
            node_name = ray.get(sidecar.ping.remote(), timeout=30)
        planned = epochs if epochs is not None else (job.planned_epochs if job else None)
        gpu_model = hints.get("gpu_model") or (
            hints.get("accelerator_type") if hints.get("gpu") else None
        )
        # A node type described by its numbers: the run carries them (STEP's power cap, PRE).
        spec = next(
            (
                n.gpu_model
                for n in inventory or []
                if n.name == chosen and isinstance(n.gpu_model, dict)
            ),
            None,
        )
        if gpu_model is None and spec is not None:
            # A CPU node type described by its numbers: hints carry no GPU name, but PRE
            # files the run under the spec's (else the run is left out of every retrain).
            from estimators.features import gpu_key

            gpu_model = gpu_key(spec)
        row = run_record(
            run_id,
            node_type=chosen,
            command=command,
            job=job,
            planned_epochs=planned,
            gpu_model=gpu_model,
            gpu_count=int(options.get("num_gpus") or 0) or 1,
            job_name=job_name,
            extra={
                "node_id": where["node_id"],
                "host": where["host"],
                "placement": hints,
                **({"clock_home": node_name} if node_name else {}),
                **({"gpu_spec": dict(spec)} if spec is not None else {}),
                **dict(extra_config or {}),
            },
        )
        ray.get(agg.start_run.remote(row), timeout=60)
        started = True
        attached: dict[str, Any] = {}
        if sidecar is not None:  # devices and whole-node holds before the command starts
            attached = ray.get(
                sidecar.attach_job.remote(run_id, list(where.get("gpus") or []), None),
                timeout=30,
            )
        env = {
            "WATTWISE_RUN_ID": run_id,
            ENV_STORE: root,
            ENV_AGGREGATOR: f"{NAMESPACE}/{AGGREGATOR_NAME}",
            ENV_NODE_TYPE: chosen,
            "WATTWISE_RUNNER": "1",
            "PYTHONUNBUFFERED": "1",
            **({"WATTWISE_EPOCHS": str(planned)} if epochs is not None else {}),
            **dict(extra_env or {}),
        }
        ref = actor.run.remote(list(command), env, run_id, relay_s, node_name)
        if attached.get("pending") and sidecar is not None:  # its own process tree, once running
            pid = ray.get(actor.command_pid.remote(), timeout=120)
            if pid is not None:
                got: Any = ray.get(sidecar.attach_job.remote(run_id, [], pid), timeout=30)
                attached = dict(got)
        log.info("run %s: samples attributed by %s", run_id, attached.get("mode"))
        if on_start is not None:
            on_start(run_id, hints)
        t0 = time.monotonic()
        stop_sent = False
        while True:
            ready, _ = ray.wait([ref], timeout=poll_s)
            if ready:
                break
            if stop_sent:
                continue
            over = time_limit_s is not None and time.monotonic() - t0 >= time_limit_s
            if not over and stop_when is not None:
                try:
                    over = bool(stop_when(ray.get(agg.status.remote(run_id), timeout=30)))
                except Exception as err:
                    log.warning("run %s: status query failed: %s", run_id, err)
            if over:
                actor.stop.remote()
                stop_sent = True
        out = ray.get(ref)
        if sidecar is not None:
            try:  # cut this run's samples and deliver them before the totals are taken
                ray.get(sidecar.detach.remote(run_id), timeout=30)
                ray.get(sidecar.flush.remote(), timeout=60)
            except Exception as err:
                log.warning("run %s: sidecar flush failed: %s", run_id, err)
        with contextlib.suppress(Exception):
            ray.get(actor.reap.remote(), timeout=30)
        rc = int(out["returncode"])
        status = end_status = "finished" if rc == 0 or out["stopped"] else "failed"
        summary, end_error = _record_end(
            lambda t: ray.get(agg.finish_run.remote(run_id, status), timeout=t),
            lambda t: ray.get(agg.status.remote(run_id), timeout=t),
            run_id,
            status,
        )
        finished = True
        return RunResult(
            run_id=run_id,
            node_type=chosen,
            node_id=str(where["node_id"]),
            status=status,
            returncode=rc,
            stopped=bool(out["stopped"]),
            summary=summary,
            placement=hints,
            error=out.get("error"),
            end_error=end_error,
        )
    finally:
        if ref is not None and not finished:  # interrupted: do not leave the command running
            try:
                ray.get(actor.stop.remote(grace_s=5.0), timeout=30)
            except Exception as err:
                log.warning("run %s: could not stop the command: %s", run_id, err)
        if started and not finished:
            if sidecar is not None:
                try:
                    ray.get(sidecar.detach.remote(run_id), timeout=30)
                except Exception as err:
                    log.warning("run %s: could not detach it from the sidecar: %s", run_id, err)
            try:
                ray.get(agg.finish_run.remote(run_id, end_status), timeout=120)
            except Exception as err:
                log.warning("run %s: could not record it as %s: %s", run_id, end_status, err)
        ray.kill(actor)


def connect(address: str | None = "auto") -> None:
    """Connect to the Ray cluster at ``address`` (``auto``: the local one) unless connected.

    Raises:
        SourceUnavailableError: No cluster there.

    """
    import ray

    from cluster.actors import NAMESPACE

    if ray.is_initialized():
        return
    try:
        ray.init(address=address, namespace=NAMESPACE, logging_level=logging.ERROR)
    except (ConnectionError, RuntimeError) as err:
        raise SourceUnavailableError(
            f"no Ray cluster at address {address!r} ({err}); start one with 'ray start --head' "
            "or pass --address HOST:PORT"
        ) from err
