"""deploy/: manifests against the Kubernetes and CRD schemas, dashboards, the nightly retrain."""

from __future__ import annotations

import json
import shlex
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import jsonschema
import polars as pl
import pytest
import yaml

from cluster.cli import main
from estimators.recommend import accelerator_type
from profiler.importers.seaa2023 import import_seaa2023
from profiler.store import Store

REPO = Path(__file__).resolve().parents[1]
DEPLOY = REPO / "deploy"
SCHEMAS = DEPLOY / "schemas"
K8S_VERSION = "1.30.0"
MANIFESTS = [
    DEPLOY / "kuberay" / "raycluster.yaml",
    DEPLOY / "kuberay" / "aggregator.yaml",
    DEPLOY / "dcgm-exporter.yaml",
    DEPLOY / "cronjob-retrain.yaml",
    DEPLOY / "prometheus" / "servicemonitor.yaml",
]
CRD_SCHEMAS = {
    "RayCluster": "raycluster.schema.json",
    "ServiceMonitor": "servicemonitor.schema.json",
}


def documents() -> list[tuple[str, dict[str, Any]]]:
    out = []
    for path in MANIFESTS:
        for doc in yaml.safe_load_all(path.read_text()):
            if doc:
                out.append((path.name, doc))
    return out


def k8s_validate(doc: dict[str, Any]) -> None:
    kubernetes_validate = pytest.importorskip(
        "kubernetes_validate", reason="pip install kubernetes-validate (the test extra)"
    )
    kubernetes_validate.validate(doc, K8S_VERSION, strict=True)


def test_every_manifest_fits_its_schema() -> None:
    docs = documents()
    kinds = sorted(d["kind"] for _, d in docs)
    assert kinds == sorted(
        [
            "RayCluster",
            "Namespace",
            "PersistentVolumeClaim",
            "Job",
            "Service",
            "DaemonSet",
            "Service",
            "CronJob",
            "ServiceMonitor",
            "ServiceMonitor",
        ]
    )
    for _name, doc in docs:
        if doc["kind"] in CRD_SCHEMAS:
            schema = json.loads((SCHEMAS / CRD_SCHEMAS[doc["kind"]]).read_text())
            jsonschema.validate(doc, schema)
        else:
            k8s_validate(doc)
        if doc["kind"] == "RayCluster":  # its pod templates are Kubernetes PodTemplateSpecs
            spec = doc["spec"]
            for group in [spec["headGroupSpec"], *spec["workerGroupSpecs"]]:
                k8s_validate(
                    {
                        "apiVersion": "v1",
                        "kind": "PodTemplate",
                        "metadata": {"name": "t"},
                        "template": group["template"],
                    }
                )


def test_the_validators_catch_mistakes() -> None:
    kubernetes_validate = pytest.importorskip("kubernetes_validate")
    ray = next(d for _, d in documents() if d["kind"] == "RayCluster")
    bad = json.loads(json.dumps(ray))
    bad["spec"]["workerGroupSpecs"][0]["replica"] = 2  # typo of replicas
    schema = json.loads((SCHEMAS / "raycluster.schema.json").read_text())
    with pytest.raises(jsonschema.ValidationError, match="'replica' was unexpected"):
        jsonschema.validate(bad, schema)
    cron = next(d for _, d in documents() if d["kind"] == "CronJob")
    bad = json.loads(json.dumps(cron))
    bad["spec"]["jobTemplate"]["spec"]["backoffLimit"] = "one"
    with pytest.raises(kubernetes_validate.ValidationError, match="backoffLimit"):
        kubernetes_validate.validate(bad, K8S_VERSION, strict=True)


def test_gpu_worker_groups_carry_wattwise_placement_hints() -> None:
    ray = next(d for _, d in documents() if d["kind"] == "RayCluster")
    groups = [
        g
        for g in ray["spec"]["workerGroupSpecs"]
        if "nvidia.com/gpu" in g["template"]["spec"]["containers"][0]["resources"]["limits"]
    ]
    assert len(groups) >= 2
    node_types = set()
    for g in groups:
        name = g["groupName"]
        node_types.add(name)
        resources = json.loads(json.loads(g["rayStartParams"]["resources"]))
        assert f"node_type:{name}" in resources  # what placement() asks for (0.001 of it)
        assert ray_start_labels(g) == {"wattwise.io/node-type": name}
        # placement()'s label selector: Ray sets ray.io/accelerator-type itself from the
        # GPU it finds, the one the nodeSelector picks.
        product = g["template"]["spec"]["nodeSelector"]["nvidia.com/gpu.product"]
        gpu = product.replace("NVIDIA-", "").split("-")[0]
        assert accelerator_type(gpu) == gpu
        assert g["template"]["metadata"]["labels"]["wattwise.io/node-type"] == name
    assert len(node_types) == len(groups)


def ray_start_labels(group: dict[str, Any]) -> dict[str, str]:
    """The labels ``ray start`` gets for a worker group, parsed as Ray parses them.

    KubeRay (>= 1.5) passes the group's top-level ``labels`` as ``--labels=k=v,...``
    (keys sorted); a ``labels`` rayStartParam is passed through a shell. ``ray start``
    reads ``key=value`` pairs, falling back to JSON; both must stay off the ``ray.io/``
    prefix Ray reserves for its own labels.
    """
    label_utils = pytest.importorskip(
        "ray._private.label_utils", reason="Ray's label parser moved; update this test"
    )
    args = []
    if group.get("labels"):
        args.append(",".join(f"{k}={v}" for k, v in sorted(group["labels"].items())))
    if "labels" in group["rayStartParams"]:
        raw = group["rayStartParams"]["labels"]
        args.append(shlex.split(f"--labels={raw}")[0].split("=", 1)[1])
    out: dict[str, str] = {}
    for arg in args:
        try:
            labels = label_utils.parse_node_labels_string(arg)
        except ValueError:  # as `ray start` does: JSON when not key=value pairs
            labels = label_utils.parse_node_labels_json(arg)
        label_utils.validate_node_labels(labels)  # the reserved ray.io/ prefix
        out.update(labels)
    return out


def test_worker_group_labels_pass_rays_own_label_parser() -> None:
    """Regression: ``ray.io/accelerator-type`` in rayStartParams made ``ray start`` abort.

    Ray reserves the ``ray.io/`` prefix ("cannot start with the prefix ray.io/"), so
    every GPU worker crash-looped. KubeRay >= 1.5 also refuses ``labels`` in
    rayStartParams; the group's own label goes in its top-level ``labels``.
    """
    ray = next(d for _, d in documents() if d["kind"] == "RayCluster")
    for g in ray["spec"]["workerGroupSpecs"]:
        labels = ray_start_labels(g)
        assert not [k for k in labels if k.startswith("ray.io/")], g["groupName"]
        assert "labels" not in g["rayStartParams"], g["groupName"]
    # The old manifest's value, as the YAML gave it.
    bad = {"rayStartParams": {"labels": r'"{\"ray.io/accelerator-type\": \"A100\"}"'}}
    with pytest.raises(ValueError, match="cannot start with the prefix `ray.io/`"):
        ray_start_labels(bad)


def test_scrape_config_and_service_monitors_name_the_same_targets() -> None:
    prom = yaml.safe_load((DEPLOY / "prometheus" / "prometheus.yml").read_text())
    jobs = {j["job_name"]: j for j in prom["scrape_configs"]}
    assert set(jobs) == {"wattwise-aggregator", "dcgm-exporter"}
    assert jobs["wattwise-aggregator"]["honor_labels"] is True
    assert jobs["wattwise-aggregator"]["static_configs"][0]["targets"] == [
        "wattwise-metrics.wattwise.svc:9401"
    ]
    services = {d["metadata"]["name"]: d for _, d in documents() if d["kind"] == "Service"}
    monitors = [d for _, d in documents() if d["kind"] == "ServiceMonitor"]
    for m in monitors:
        sel = m["spec"]["selector"]["matchLabels"]
        matched = [s for s in services.values() if sel.items() <= s["metadata"]["labels"].items()]
        assert len(matched) == 1, m["metadata"]["name"]
        ports = {p["name"] for p in matched[0]["spec"]["ports"]}
        assert m["spec"]["endpoints"][0]["port"] in ports
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool not installed (apt-get install prometheus)")
    res = subprocess.run(
        [
            promtool,
            "check",
            "config",
            "--syntax-only",
            str(DEPLOY / "prometheus" / "prometheus.yml"),
        ],
        capture_output=True,
        text=True,
    )
    assert res.returncode == 0, res.stdout + res.stderr


def test_service_monitors_give_the_job_names_of_prometheus_yml() -> None:
    """Regression: the wattwise ServiceMonitor's job was ``wattwise``, not ``wattwise-aggregator``.

    The operator sets ``job`` to the value of the Service label named by ``jobLabel``
    (the Service's name without one); the comment promised prometheus.yml's jobs.
    """
    prom = yaml.safe_load((DEPLOY / "prometheus" / "prometheus.yml").read_text())
    services = [d for _, d in documents() if d["kind"] == "Service"]
    jobs = {}
    for m in (d for _, d in documents() if d["kind"] == "ServiceMonitor"):
        sel = m["spec"]["selector"]["matchLabels"]
        (service,) = [s for s in services if sel.items() <= s["metadata"]["labels"].items()]
        labels, job_label = service["metadata"]["labels"], m["spec"].get("jobLabel")
        jobs[service["metadata"]["name"]] = labels.get(job_label, service["metadata"]["name"])
    assert jobs == {"wattwise-metrics": "wattwise-aggregator", "dcgm-exporter": "dcgm-exporter"}
    assert sorted(jobs.values()) == sorted(j["job_name"] for j in prom["scrape_configs"])


def test_head_pod_containers_share_the_ray_session_and_readiness_waits_on_nothing() -> None:
    """Regression: the wattwise-metrics container could not join the head's raylet.

    Its ``ray.init`` to 127.0.0.1:6379 needs the raylet and object-store sockets under
    ``/tmp/ray`` of the ray-head container, which containers do not share unless a
    volume is mounted there in both. Its readiness probe on /metrics also kept the head
    pod NotReady until the aggregator existed, out of the head Service that the start
    Job submits the aggregator through.
    """
    ray = next(d for _, d in documents() if d["kind"] == "RayCluster")
    pod = ray["spec"]["headGroupSpec"]["template"]["spec"]
    volumes = {v["name"]: v for v in pod["volumes"]}
    containers = {c["name"]: c for c in pod["containers"]}
    assert set(containers) == {"ray-head", "wattwise-metrics"}
    at_tmp_ray = set()
    for name, c in containers.items():
        mounts = [m["name"] for m in c["volumeMounts"] if m["mountPath"] == "/tmp/ray"]
        assert len(mounts) == 1, f"{name} mounts nothing at /tmp/ray"
        at_tmp_ray.add(mounts[0])
    (shared,) = at_tmp_ray  # one volume, the same in both
    assert volumes[shared] == {"name": shared, "emptyDir": {}}
    assert "127.0.0.1:6379" in " ".join(containers["wattwise-metrics"]["args"])
    assert "readinessProbe" not in containers["wattwise-metrics"]


def test_dashboards_are_generated_and_fit_the_grafana_schema() -> None:
    res = subprocess.run(
        [sys.executable, str(DEPLOY / "grafana" / "generate.py"), "--check"],
        capture_output=True,
        text=True,
    )
    assert res.returncode == 0, res.stderr
    schema = json.loads((SCHEMAS / "grafana-dashboard.schema.json").read_text())
    uids = set()
    for path in sorted((DEPLOY / "grafana" / "dashboards").glob("*.json")):
        dash = json.loads(path.read_text())
        jsonschema.validate(dash, schema)
        uids.add(dash["uid"])
        ids = [p["id"] for p in dash["panels"]]
        assert len(ids) == len(set(ids)), path.name
        for p in dash["panels"]:  # no two panels overlap on the 24-column grid
            g = p["gridPos"]
            assert g["x"] + g["w"] <= 24, (path.name, p["title"])
    assert uids == {"wattwise-cluster", "wattwise-job", "wattwise-fleet"}
    bad = json.loads((DEPLOY / "grafana" / "dashboards" / "job.json").read_text())
    del bad["panels"][0]["gridPos"]["h"]
    with pytest.raises(jsonschema.ValidationError, match="'h' is a required property"):
        jsonschema.validate(bad, schema)


def test_nightly_entries_run_retrain_if_new_runs() -> None:
    cron = next(d for _, d in documents() if d["kind"] == "CronJob")
    container = cron["spec"]["jobTemplate"]["spec"]["template"]["spec"]["containers"][0]
    assert container["command"][:3] == ["wattwise", "retrain", "--if-new-runs"]
    service = (DEPLOY / "systemd" / "wattwise-retrain.service").read_text()
    exec_start = next(x for x in service.splitlines() if x.startswith("ExecStart="))
    assert "ray job submit" in exec_start
    assert exec_start.split(" -- ", 1)[1].startswith("wattwise retrain --if-new-runs")
    timer = (DEPLOY / "systemd" / "wattwise-retrain.timer").read_text()
    assert "OnCalendar=*-*-* 02:30:00 UTC" in timer


@pytest.fixture
def real_store(shared_data: Path, tmp_path: Path) -> Store:
    store = Store(tmp_path / "store")
    import_seaa2023(store, shared_data, progress=False)
    return store


@pytest.mark.shared_data
@pytest.mark.slow  # two PRE fits: ~4 s on an idle 2-core machine
def test_retrain_if_new_runs_skips_then_reports_what_changed(
    real_store: Store, capsys: pytest.CaptureFixture[str]
) -> None:
    root = str(real_store.root)
    held = real_store.runs().filter(pl.col("architecture") == "vgg16")["run_id"].head(6).to_list()
    real_store.write_runs(pl.DataFrame({"run_id": held, "status": ["running"] * 6}))
    assert main(["retrain", "--if-new-runs", "--store", root]) == 0
    out = capsys.readouterr().out
    assert "v1 accepted: validation energy MAPE" in out
    assert "runs added: 243" in out and "trained on 243 finished runs" in out

    assert main(["retrain", "--if-new-runs", "--store", root]) == 0
    assert capsys.readouterr().out.startswith("no new finished runs since v1 (243 usable")
    assert not (real_store.root / "models" / "pre-v2.json").exists()

    real_store.write_runs(pl.DataFrame({"run_id": held, "status": ["finished"] * 6}))
    assert main(["retrain", "--if-new-runs", "--store", root]) == 0
    out = capsys.readouterr().out
    card = json.loads((real_store.root / "models" / "pre-v2.card.json").read_text())
    verdict = "accepted" if card["accepted"] else "rejected"
    before, after = card["previous_score_mape_pct"], card["score_mape_pct"]
    assert f"v2 {verdict} (current was v1): energy MAPE {before:.2f} % -> {after:.2f} %" in out
    assert f"runs added: 6 ({', '.join(held[:5])}, ... (1 more))" in out
    assert sorted(card["run_ids"]) == sorted(real_store.runs()["run_id"].to_list())
