"""The job runner and the built-in workload on a real local Ray cluster with two node types."""

from __future__ import annotations

import argparse
import re
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import polars as pl
import pytest

from cluster.runner import job_from_command, new_run_id
from cluster.train import TrainConfig, train
from conftest import typed_ray_cluster
from profiler.errors import BadInputError

WATTWISE = str(Path(sys.executable).parent / "wattwise")
TINY = ["--arch", "resnet18", "--image-size", "32", "--train-size", "64", "--batch-size", "32"]


def test_train_marks_each_epoch_through_the_hooks() -> None:
    from profiler.hooks import EpochHooks

    frames: list[pl.DataFrame] = []
    hooks = EpochHooks("t-1", sink=frames.append)
    cfg = TrainConfig(
        arch="mobilenet_v3_small", epochs=2, image_size=32, train_size=16, batch_size=8
    )
    result = train(cfg, hooks)
    assert result.epochs == 2 and len(result.epoch_s) == 2 and result.device == "cpu"
    marks = pl.concat(frames)
    assert marks["epoch"].to_list() == [0, 1]
    assert (marks["end"] > marks["start"]).all()
    assert marks["start"][1] >= marks["end"][0]


def test_train_refuses_an_unknown_architecture_and_dataset() -> None:
    with pytest.raises(BadInputError, match=r"unknown architecture 'resnet19'; expected"):
        train(TrainConfig(arch="resnet19", epochs=1))
    with pytest.raises(BadInputError, match=r"dataset must be one of \['fake'\]; found 'cifar10'"):
        TrainConfig(dataset="cifar10").check()


def test_the_built_in_workload_command_is_understood_as_a_job() -> None:
    job = job_from_command([WATTWISE, "train", *TINY, "--epochs", "4"])
    assert job is not None
    assert (job.architecture, job.batch_size, job.training_size) == ("resnet18", 32, 64)
    assert (job.image_height, job.image_width, job.planned_epochs) == (32, 32, 4)
    assert job_from_command(["python", "train.py", "--epochs", "4"]) is None


def test_run_ids_are_valid_and_name_the_node_type() -> None:
    rid = new_run_id("gpu a/100")
    assert rid.startswith("gpu-a-100-") and len(rid) == len("gpu-a-100-") + 15 + 1 + 6


# ------------------------------------------------------------ bad input, start and end of a run

RID = "cpu-a-20260101-000000-abcdef"


def _no_ray(monkeypatch: pytest.MonkeyPatch) -> None:
    """Fail the test if the CLI tries to connect to a Ray cluster."""

    def connect(address: str | None = "auto") -> None:
        raise AssertionError(f"connected to Ray at {address!r} before checking the input")

    monkeypatch.setattr("cluster.runner.connect", connect)


@pytest.mark.parametrize(
    ("command", "options", "message"),
    [
        ("run", ["--num-cpus", "-1"], r"--num-cpus must be a finite number >= 0; found -1.0"),
        ("run", ["--num-gpus", "-0.5"], r"--num-gpus must be a finite number >= 0; found -0.5"),
        ("run", ["--num-cpus", "nan"], r"--num-cpus must be a finite number >= 0; found nan"),
        ("run", ["--num-cpus", "0.00001"], r"--num-cpus must be 0 or at least 0.0001"),
        ("run", ["--epochs", "0"], r"--epochs must be an integer > 0; found 0"),
        ("probe", ["--num-cpus", "-1"], r"--num-cpus must be a finite number >= 0; found -1.0"),
        (
            "probe",
            ["--time-limit", "0"],
            r"--time-limit must be a number of seconds > 0; found 0\.0",
        ),
    ],
)
def test_run_and_probe_refuse_bad_numbers_before_connecting(
    command: str,
    options: list[str],
    message: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    from cluster.cli import main

    _no_ray(monkeypatch)
    node_type = ["--node-type", "cpu-a"] if command == "run" else []
    argv = [command, "--store", str(tmp_path), *node_type, *options, "--", "true"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"wattwise {command}: error: ") and "Traceback" not in err
    assert re.search(message, err), err


@pytest.mark.parametrize(
    "numbers",
    [{"num_cpus": -1.0}, {"num_gpus": float("inf")}, {"epochs": 0}, {"num_gpus": 1e-6}],
)
def test_run_job_refuses_bad_numbers_before_using_ray(numbers: dict[str, Any]) -> None:
    from cluster.runner import run_job

    # Refused whether or not Ray is connected: before the aggregator or sidecars start.
    with pytest.raises(BadInputError, match=r"must be"):
        run_job(["true"], node_type="cpu-a", **numbers)


def test_wattwise_run_refuses_an_ended_run_id_before_connecting(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from cluster.cli import main
    from profiler.store import Store

    Store(tmp_path).write_runs(pl.DataFrame({"run_id": [RID], "status": ["finished"]}))
    _no_ray(monkeypatch)
    argv = ["run", "--store", str(tmp_path), "--node-type", "cpu-a", "--run-id", RID, "--", "true"]
    assert main(argv) == 2
    assert f"--run-id {RID!r}: the store at" in capsys.readouterr().err


def test_wattwise_run_takes_no_abbreviated_options() -> None:
    from cluster.cli import build_parser

    parser = build_parser()
    # '--job' is no option of its own; it must not become --job-name (and swallow the JSON).
    with pytest.raises(SystemExit) as exc:
        parser.parse_args(["run", "--node-type", "auto", "--job", "{}", "--", "python", "x.py"])
    assert exc.value.code == 2
    args = parser.parse_args(["run", "--node-type", "a", "--job-name", "j", "--", "p", "--job"])
    assert (args.job_name, args.argv) == ("j", ["--", "p", "--job"])


def test_auto_placement_without_a_job_names_options_that_exist(tmp_path: Path) -> None:
    from cluster.cli import build_parser
    from cluster.runner import choose_node_type

    with pytest.raises(BadInputError) as exc:
        choose_node_type("auto", types={}, job=None, store_root=str(tmp_path))
    message = str(exc.value)
    assert "--node-type TYPE" in message and "wattwise placement" in message
    sub = next(a for a in build_parser()._actions if a.dest == "command")
    assert isinstance(sub, argparse._SubParsersAction)
    known = {
        o for c in ("run", "placement", "train") for o in sub.choices[c]._option_string_actions
    }
    named = set(re.findall(r"--[a-z][a-z-]*", message))
    assert named and named <= known, f"options that do not exist: {named - known}"


class _Placed(Exception):
    """Stops run_job once it has placed the job (the rest needs a Ray cluster)."""


def test_auto_places_and_predicts_for_the_epochs_asked_not_the_jobs_default(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Bug: ``wattwise run --node-type auto --epochs 120 -- wattwise train ...`` ranked the
    node types and stored ``predicted_energy_j`` for the job's own 3 epochs (``train``'s
    default), while the run was recorded and told to train 120."""
    import ray

    import cluster.runner as runner
    from estimators.pre import PREModel
    from estimators.recommend import NodeType
    from tests.test_pre import SMALL, synthetic

    root = tmp_path / "store"
    PREModel(**SMALL).fit(synthetic(4, 5, sigma=0.02, seed=5)).save(
        root / "models" / "pre-v1.json", card={"version": 1, "accepted": True}
    )
    inventory = [NodeType("gpu-t4", "T4", default=True), NodeType("gpu-3090", "RTX 3090")]
    types = {n.name: {"alive": ["n1"], "dead": [], "gpu_model": n.gpu_model} for n in inventory}
    placed: list[dict[str, Any]] = []

    def choose(*args: Any, **kwargs: Any) -> dict[str, Any]:
        placed.append(real_choose(*args, **kwargs))  # the real placement, on the real model
        raise _Placed

    real_choose = runner.choose_node_type
    # Only what needs a live Ray cluster is replaced: its connection, node types, aggregator.
    monkeypatch.setattr(ray, "is_initialized", lambda: True)
    monkeypatch.setattr(runner, "cluster_node_types", lambda: types)
    monkeypatch.setattr(runner, "ensure_aggregator", lambda *a, **k: (None, str(root)))
    monkeypatch.setattr(runner, "choose_node_type", choose)
    command = [WATTWISE, "train", *TINY]  # the job's own planned epochs: train's default
    job = job_from_command(command)
    assert job is not None and job.planned_epochs != 120
    with pytest.raises(_Placed):
        runner.run_job(command, node_type="auto", epochs=120, inventory=inventory)
    hints = placed[0]
    per_epoch = hints["recommendation"]["node_types"][0]["epoch_energy_j"]
    assert hints["source"] == "predicted (PRE)"
    assert hints["predicted_energy_j"] == pytest.approx(per_epoch * 120)
    assert hints["recommendation"]["node_types"][0]["total_energy_kwh"] == pytest.approx(
        per_epoch * 120 / 3.6e6
    )


def test_a_command_that_cannot_start_says_why_and_logs_it(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    from cluster.runner import ENV_STORE, _JobActorImpl

    actor = _JobActorImpl()
    with caplog.at_level("ERROR", logger="cluster.runner"):
        out = actor.run(["wattwise-no-such-program", "x"], {ENV_STORE: str(tmp_path)}, RID, 0.1)
    why = "could not start the command 'wattwise-no-such-program': [Errno 2] No such file"
    assert out["returncode"] == 127 and out["error"].startswith(why)
    assert [r.getMessage() for r in caplog.records] == [f"run {RID}: {out['error']}"]
    assert actor.command_pid(timeout_s=0.1) is None


def test_wattwise_run_prints_why_the_command_did_not_start(
    capsys: pytest.CaptureFixture[str],
) -> None:
    import json

    from cluster.commands.run_cmds import _print_result
    from cluster.runner import RunResult

    why = "could not start the command 'pyhton': [Errno 2] No such file or directory: 'pyhton'"
    result = RunResult(RID, "cpu-a", "n1", "failed", 127, False, {"epochs_done": 0}, error=why)
    _print_result(result, as_json=False)
    out = capsys.readouterr()
    assert "failed (exit 127)" in out.out
    assert out.err == f"wattwise run: error: {why}\n"
    _print_result(result, as_json=True)
    assert json.loads(capsys.readouterr().out)["error"] == why


def _finished_by_hand(tmp_path: Path) -> tuple[Any, Any]:
    from cluster.aggregator import Aggregator
    from profiler.store import Store

    store = Store(tmp_path / "store")
    agg = Aggregator(store)
    agg.start_run({"run_id": RID, "planned_epochs": 2})
    return agg, store


def test_a_finish_call_that_timed_out_but_went_through_is_not_recorded_as_failed(
    tmp_path: Path,
) -> None:
    from ray.exceptions import GetTimeoutError

    from cluster.runner import _record_end

    agg, store = _finished_by_hand(tmp_path)
    calls: list[float] = []

    def finish(timeout_s: float) -> dict[str, Any]:
        calls.append(timeout_s)
        summary = agg.finish_run(RID, "finished")  # the aggregator takes it ...
        if len(calls) == 1:  # ... but answers after the runner stopped waiting
            raise GetTimeoutError("Get timed out: some object(s) not ready.")
        return dict(summary)

    summary, note = _record_end(finish, lambda t: agg.status(RID), RID, "finished")
    assert note is None and summary["status"] == "finished"
    assert calls == [120.0, 30.0]  # asked again with the same status, never 'failed'
    assert store.run(RID)["status"] == "finished"


def test_a_finish_call_that_timed_out_is_asked_again_with_the_commands_status(
    tmp_path: Path,
) -> None:
    from ray.exceptions import GetTimeoutError

    from cluster.runner import _record_end

    agg, store = _finished_by_hand(tmp_path)
    answers: list[BaseException | None] = [GetTimeoutError("Get timed out"), None]

    def finish(timeout_s: float) -> dict[str, Any]:
        err = answers.pop(0)
        if err is not None:  # the aggregator was away (restarting): nothing recorded
            raise err
        return dict(agg.finish_run(RID, "finished"))

    summary, note = _record_end(finish, lambda t: agg.status(RID), RID, "finished")
    assert note is None and summary["status"] == "finished"
    assert store.run(RID)["status"] == "finished"


def test_an_aggregator_that_never_confirms_leaves_the_commands_status_and_says_so(
    tmp_path: Path,
) -> None:
    from ray.exceptions import GetTimeoutError

    from cluster.runner import _record_end

    agg, store = _finished_by_hand(tmp_path)

    def away(timeout_s: float) -> dict[str, Any]:
        raise GetTimeoutError(f"Get timed out after {timeout_s} s\n  (traceback lines)")

    summary, note = _record_end(away, away, RID, "finished")
    assert summary == {}
    assert note is not None
    assert note.startswith("the aggregator did not confirm the run's end as 'finished' (")
    assert "GetTimeoutError: Get timed out after 120.0 s;" in note and "traceback" not in note
    assert store.run(RID)["status"] == "running"  # not 'failed': the command succeeded


# ---------------------------------------------------------------------------- on a Ray cluster


@pytest.fixture(scope="module")
def ray_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """A head node plus two one-CPU worker nodes typed gpu-a and gpu-b."""
    pytest.importorskip("ray")
    with typed_ray_cluster("wattwise"):
        yield {"store": tmp_path_factory.mktemp("runner") / "store"}


SIDECAR = {"interval_s": 0.2, "batch_interval_s": 1.0}


def _node_of(node_type: str) -> str:
    import ray

    return next(
        n["NodeID"]
        for n in ray.nodes()
        if n["Alive"] and f"node_type:{node_type}" in n["Resources"]
    )


@pytest.mark.slow
def test_a_run_is_placed_on_its_node_type_measured_and_recorded(
    ray_cluster: dict[str, Any],
) -> None:
    import ray

    from cluster.actors import aggregator
    from cluster.runner import run_job
    from profiler.store import Store

    result = run_job(
        [WATTWISE, "train", *TINY, "--epochs", "3"],
        node_type="gpu-b",
        store_root=ray_cluster["store"],
        sidecar_options=SIDECAR,
    )
    assert result.status == "finished" and result.returncode == 0
    assert result.node_id == _node_of("gpu-b")
    assert result.summary["epochs_done"] == 3
    assert result.summary["planned_epochs"] == 3
    store = Store(ray_cluster["store"])
    run = store.run(result.run_id)
    assert run["status"] == "finished" and run["trained_epochs"] == 3
    assert run["node_type"] == "gpu-b" and run["architecture"] == "resnet18"
    assert run["gflops_forward"] is not None and run["gflops_forward"] > 0
    assert run["energy_j"] == pytest.approx(result.summary["measured_energy_j"])
    assert run["energy_j"] > 0
    samples = store.samples(result.run_id)
    assert samples.height == result.summary["samples"] > 0
    assert samples["source"].unique().to_list() == ["modelled"]
    epochs = store.epochs(result.run_id)
    assert epochs["epoch"].to_list() == [0, 1, 2]
    # The aggregator answers for the finished run.
    agg = aggregator(create=False)
    status = ray.get(agg.status.remote(result.run_id))
    assert status["status"] == "finished" and status["epochs_done"] == 3
    per_epoch = ray.get(agg.epochs.remote(result.run_id))
    assert per_epoch.height == 3 and (per_epoch["energy_j"] > 0).all()


@pytest.mark.slow
def test_a_crashing_command_is_stored_as_failed_with_its_exit_code(
    ray_cluster: dict[str, Any],
) -> None:
    from cluster.runner import run_job
    from profiler.store import Store

    result = run_job(
        [sys.executable, "-c", "import sys, time; time.sleep(1); sys.exit(3)"],
        node_type="gpu-a",
        store_root=ray_cluster["store"],
        sidecar_options=SIDECAR,
    )
    assert (result.status, result.returncode, result.stopped) == ("failed", 3, False)
    assert result.node_id == _node_of("gpu-a")
    assert Store(ray_cluster["store"]).run(result.run_id)["status"] == "failed"


@pytest.mark.slow
def test_an_unknown_node_type_is_refused_with_the_known_ones(
    ray_cluster: dict[str, Any],
) -> None:
    from cluster.runner import run_job

    with pytest.raises(BadInputError, match=r"unknown node type 'gpu-z'.*gpu-a \(1 alive\), gpu-b"):
        run_job(["true"], node_type="gpu-z", store_root=ray_cluster["store"])


@pytest.mark.slow
def test_a_command_that_cannot_start_is_failed_with_the_reason(
    ray_cluster: dict[str, Any],
) -> None:
    from cluster.runner import run_job
    from profiler.store import Store

    result = run_job(
        ["wattwise-no-such-program", "train.py"],
        node_type="gpu-a",
        store_root=ray_cluster["store"],
        sidecar_options=SIDECAR,
    )
    assert (result.status, result.returncode) == ("failed", 127)
    assert result.error is not None
    assert result.error.startswith("could not start the command 'wattwise-no-such-program'")
    assert result.end_error is None
    assert Store(ray_cluster["store"]).run(result.run_id)["status"] == "failed"
