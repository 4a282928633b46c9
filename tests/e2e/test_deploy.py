"""Deployment files: Kubernetes manifests validate against the API schemas; the Grafana dashboard only queries
metrics a live server exposes; the Dockerfile keeps its contract (non-root, /health check, TGI's PORT/HF_HOME)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import kubernetes_validate
import pytest
import requests
import yaml

ROOT = Path(__file__).resolve().parents[2]
MANIFESTS = sorted((ROOT / "deploy" / "kubernetes").glob("*.yaml"))


@pytest.mark.parametrize("path", MANIFESTS, ids=lambda p: p.name)
def test_kubernetes_manifests_validate(path):
    docs = [d for d in yaml.safe_load_all(path.read_text()) if d]
    assert docs
    for doc in docs:
        kubernetes_validate.validate(doc, "1.33.0", strict=True)


def test_deployment_probes_and_secret():
    docs = list(yaml.safe_load_all((ROOT / "deploy/kubernetes/deployment.yaml").read_text()))
    pod = next(d for d in docs if d["kind"] == "Deployment")["spec"]["template"]["spec"]
    container = pod["containers"][0]
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert container[probe]["httpGet"]["path"] == "/health"
    env = {e["name"]: e for e in container["env"]}
    assert env["HF_TOKEN"]["valueFrom"]["secretKeyRef"]["name"] == "loom-hf-token"
    assert container["resources"]["requests"]["cpu"]
    hpa = yaml.safe_load((ROOT / "deploy/kubernetes/hpa.yaml").read_text())
    assert hpa["spec"]["metrics"][0]["pods"]["metric"]["name"] == "tgi_queue_size"


def test_dashboard_queries_metrics_the_server_exposes(server):
    requests.post(f"{server.url}/generate", json={"inputs": "Hi", "parameters": {"max_new_tokens": 2}})
    requests.post(f"{server.url}/generate", json={"inputs": "Hi", "parameters": {"temperature": 0}})  # a failure
    exposed = {ln.split("{")[0].split(" ")[0] for ln in requests.get(f"{server.url}/metrics").text.splitlines()
               if ln and not ln.startswith("#")}
    dashboard = json.loads((ROOT / "deploy/grafana/loom-dashboard.json").read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p["targets"]]
    used = {m for e in exprs for m in re.findall(r"\b(tgi_[a-z_]+)", e)}
    assert used and used <= exposed, used - exposed


def test_dockerfile_contract():
    text = (ROOT / "Dockerfile").read_text()
    assert re.search(r"^USER loom$", text, re.MULTILINE)
    assert "HEALTHCHECK" in text and "/health" in text
    assert "PORT=80" in text and "HF_HOME=/data" in text
    assert "pip install --no-cache-dir ." in text  # installed from the project's own files, as the README does
    assert 'ENTRYPOINT ["text-generation-launcher"]' in text
    assert "install -y --no-install-recommends g++" in text  # the CPU kernels compile at first start
    assert "TORCH_EXTENSIONS_DIR=/data/torch_extensions" in text  # ... once per CPU, kept on the volume
