"""deploy/: manifests against the Kubernetes and CRD schemas, dashboards, the nightly retrain."""

from __future__ import annotations

import json
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
        labels = json.loads(json.loads(g["rayStartParams"]["labels"]))
        product = g["template"]["spec"]["nodeSelector"]["nvidia.com/gpu.product"]
        gpu = product.replace("NVIDIA-", "").split("-")[0]
        assert labels["ray.io/accelerator-type"] == accelerator_type(gpu)
        assert g["template"]["metadata"]["labels"]["wattwise.io/node-type"] == name
    assert len(node_types) == len(groups)


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
