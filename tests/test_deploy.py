"""The deployment files in deploy/: Kubernetes manifests, Prometheus, Grafana, nginx template.

No cluster here: every manifest is parsed (``yaml.safe_load_all``) and checked for what must
hold together: kinds, the Services select the Deployment's pods, the probes hit the
container's HTTP port on Triton's health paths, the GPU is requested, the container's
recorun-server arguments are real options whose ports are the declared container ports; the
Prometheus config scrapes Triton's metrics port and the recorun exporter (9400); the Grafana
dashboard plots the paper's quantities with PromQL naming real metrics.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import yaml

DEPLOY = Path(__file__).resolve().parent.parent / "deploy"
KUBERNETES = DEPLOY / "kubernetes"

#: the metrics Triton exports (server/README.md) and recorun's exporter (framework/prometheus.py)
TRITON_METRICS = {"nv_inference_count", "nv_inference_exec_count",
                  "nv_inference_request_success", "nv_inference_request_failure",
                  "nv_inference_queue_duration_us", "nv_inference_compute_infer_duration_us",
                  "nv_inference_compute_input_duration_us",
                  "nv_inference_compute_output_duration_us",
                  "nv_inference_request_duration_us", "nv_inference_pending_request_count",
                  "nv_gpu_utilization", "nv_gpu_memory_used_bytes", "nv_cpu_utilization"}
RECORUN_METRICS = {"recorun_events_processed_total", "recorun_module_seconds_total",
                   "recorun_sonic_requests_in_flight", "recorun_sonic_retries_total",
                   "recorun_sonic_failures_total", "recorun_sonic_bytes_sent_total"}


def manifests() -> list[tuple[Path, dict]]:
    docs = []
    for path in sorted(KUBERNETES.glob("*.yaml")):
        with open(path) as handle:
            docs += [(path, doc) for doc in yaml.safe_load_all(handle) if doc is not None]
    return docs


def by_kind(kind: str) -> list[dict]:
    return [doc for _, doc in manifests() if doc["kind"] == kind]


def test_every_manifest_parses_with_a_known_kind():
    docs = manifests()
    assert docs, f"no manifests in {KUBERNETES}"
    for path, doc in docs:
        assert {"apiVersion", "kind"} <= set(doc), f"{path.name}: apiVersion and kind"
        assert doc["kind"] in {"Deployment", "Service", "Kustomization"}, path.name
        if doc["kind"] != "Kustomization":
            assert doc["metadata"]["name"], path.name
    kinds = sorted(doc["kind"] for _, doc in docs)
    assert kinds.count("Deployment") == 1 and kinds.count("Service") == 2
    (kustomization,) = by_kind("Kustomization")
    listed = set(kustomization["resources"])
    assert listed == {p.name for p in KUBERNETES.glob("*.yaml")} - {"kustomization.yaml"}


@pytest.fixture(scope="module")
def deployment() -> dict:
    (deployment,) = by_kind("Deployment")
    return deployment


@pytest.fixture(scope="module")
def container(deployment) -> dict:
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    return container


def test_deployment_selects_its_own_pods(deployment):
    assert deployment["apiVersion"] == "apps/v1"
    selector = deployment["spec"]["selector"]["matchLabels"]
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert selector and selector.items() <= pod_labels.items()
    assert deployment["spec"]["replicas"] >= 1


def test_container_runs_recorun_server_on_its_declared_ports(container):
    from recorun.server.cli import serve_parser

    assert container["command"] == ["recorun-server"]
    args = serve_parser().parse_args(container["args"])       # real options only
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports == {"grpc": args.grpc_port, "http": args.http_port,
                     "metrics": args.metrics_port}
    assert len(set(ports.values())) == 3
    assert args.address == "0.0.0.0", "bound to 127.0.0.1 nothing outside the pod reaches it"
    assert args.device == "cuda"


def test_probes_hit_tritons_health_endpoints_on_the_http_port(container):
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    want = {"livenessProbe": "/v2/health/live", "readinessProbe": "/v2/health/ready",
            "startupProbe": "/v2/health/live"}
    for probe, path in want.items():
        get = container[probe]["httpGet"]
        assert get["path"] == path, probe
        assert get["port"] in ("http", ports["http"]), f"{probe} must use the HTTP port"


def test_the_gpu_is_requested_on_gpu_nodes(deployment, container):
    resources = container["resources"]
    assert int(resources["limits"]["nvidia.com/gpu"]) == 1
    assert int(resources["requests"].get("nvidia.com/gpu", 1)) == 1
    spec = deployment["spec"]["template"]["spec"]
    assert spec["nodeSelector"], "schedule on GPU nodes"
    assert any(t["key"] == "nvidia.com/gpu" for t in spec["tolerations"])
    shm = [m for m in container["volumeMounts"] if m["mountPath"] == "/dev/shm"]
    assert shm, "Triton's python backend needs more /dev/shm than the default 64 MiB"


def test_services_select_the_deployments_pods(deployment, container):
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    port_names = {p["name"] for p in container["ports"]}
    services = {s["metadata"]["name"]: s for s in by_kind("Service")}
    for name, service in services.items():
        selector = service["spec"]["selector"]
        assert selector and selector.items() <= pod_labels.items(), name
        for port in service["spec"]["ports"]:
            assert port["targetPort"] in port_names, f"{name}: {port}"
    balanced = [s for s in services.values() if s["spec"].get("type") == "LoadBalancer"]
    assert len(balanced) == 1
    assert [p["targetPort"] for p in balanced[0]["spec"]["ports"]] == ["grpc"]


def test_prometheus_scrapes_triton_and_the_recorun_exporter():
    config = yaml.safe_load((DEPLOY / "prometheus" / "prometheus.yml").read_text())
    assert config["global"]["scrape_interval"]
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    assert {"triton", "recorun"} <= set(jobs)
    assert len(jobs) == len(config["scrape_configs"]), "job names must be unique"
    keep = [r for r in jobs["triton"]["relabel_configs"] if r.get("action") == "keep"]
    assert {"regex": "metrics", "source_labels": ["__meta_kubernetes_pod_container_port_name"],
            "action": "keep"} in keep
    assert any(r["regex"] == "recorun-server" for r in keep)
    targets = [t for c in jobs["recorun"]["static_configs"] for t in c["targets"]]
    assert targets and all(t.endswith(":9400") for t in targets)
    static = [t for c in jobs["triton-static"]["static_configs"] for t in c["targets"]]
    assert all(t.endswith(":8002") for t in static)


def _metric_names(expr: str) -> set[str]:
    """Metric names in a PromQL expression: identifiers that are not functions, keywords,
    label names (inside {...} or by/without (...)) or range selectors."""
    expr = re.sub(r"\{[^}]*\}", "", expr)                        # label matchers
    expr = re.sub(r"\b(by|without)\s*\([^)]*\)", "", expr)       # grouping labels
    expr = re.sub(r"\[[^\]]*\]", "", expr)                       # ranges
    names = set(re.findall(r"[a-zA-Z_:][a-zA-Z0-9_:]*", expr))
    return {n for n in names if n.startswith(("nv_", "recorun_"))}


def test_grafana_dashboard_plots_the_papers_quantities():
    dashboard = json.loads((DEPLOY / "grafana" / "recorun-sonic.json").read_text())
    panels = [p for p in dashboard["panels"] if p["type"] != "row"]
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    exprs: dict[str, list[str]] = {}
    for panel in panels:
        assert panel["title"] and panel["targets"] and panel["gridPos"]["w"] > 0
        assert panel["datasource"]["type"] == "prometheus"
        for target in panel["targets"]:
            expr = target["expr"]
            assert expr.count("(") == expr.count(")") and expr.count("{") == expr.count("}")
            names = _metric_names(expr)
            assert names, f"{panel['title']}: no metric in {expr!r}"
            unknown = names - TRITON_METRICS - RECORUN_METRICS
            assert not unknown, f"{panel['title']}: unknown metrics {unknown}"
            exprs.setdefault(panel["title"], []).append(expr)

    def panel_with(metric: str, *, rate: bool) -> str:
        found = [title for title, es in exprs.items()
                 if any(metric in _metric_names(e) and ("rate(" in e) == rate for e in es)]
        assert found, f"no panel plots {'rate of ' if rate else ''}{metric}"
        return found[0]

    assert "Throughput" in panel_with("nv_inference_count", rate=True)
    assert "Queue" in panel_with("nv_inference_queue_duration_us", rate=True)
    assert "Compute" in panel_with("nv_inference_compute_infer_duration_us", rate=True)
    assert "GPU" in panel_with("nv_gpu_utilization", rate=False)
    assert "bandwidth" in panel_with("recorun_sonic_bytes_sent_total", rate=True)
    panel_with("recorun_events_processed_total", rate=True)
    panel_with("recorun_sonic_requests_in_flight", rate=False)
    panel_with("recorun_sonic_retries_total", rate=True)
    panel_with("recorun_sonic_failures_total", rate=True)
    panel_with("recorun_module_seconds_total", rate=True)
    variables = {v["name"] for v in dashboard["templating"]["list"]}
    assert "datasource" in variables


def test_nginx_template_has_the_grpc_balancer_directives():
    from recorun.server.balancer import TEMPLATE, render

    text = TEMPLATE.read_text()
    assert TEMPLATE == DEPLOY / "nginx" / "grpc_balancer.conf.template"
    for directive in ("grpc_pass grpc://", "grpc_next_upstream error timeout",
                      "grpc_connect_timeout", "grpc_read_timeout", "grpc_send_timeout",
                      "upstream ", "listen {{ listen }}{{ listen_http2 }};",
                      "client_max_body_size 0;", "non_idempotent"):
        assert directive in text, directive
    placeholders = set(re.findall(r"\{\{\s*(\w+)\s*\}\}", text))
    rendered = render(text, dict.fromkeys(placeholders, "X"))
    assert "{{" not in rendered
    assert text.count("{") - text.count("{{") * 2 == text.count("}") - text.count("}}") * 2


def test_deploy_readme_explains_every_file():
    readme = (DEPLOY / "README.md").read_text()
    for path in DEPLOY.rglob("*"):
        if path.is_file() and path.name != "README.md":
            assert path.name in readme, f"deploy/README.md does not mention {path.name}"
