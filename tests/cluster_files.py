"""The cluster/ files, found by globbing and parsed once, for the tests that validate them
(test_cluster_configs.py, test_cluster_security.py)."""

from __future__ import annotations

from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
CLUSTER = ROOT / "cluster"
IMAGE_HOME = "/home/ray/fers-dist"  # where cluster/kuberay/Dockerfile puts the working copy
YAML_FILES = sorted(p for p in CLUSTER.rglob("*") if p.suffix in (".yaml", ".yml"))
TEXT_FILES = sorted(p for p in CLUSTER.rglob("*") if p.is_file()) + [ROOT / "jobs" / "README.md"]
RAY_PORTS = (6379, 8265, 10001)  # GCS, dashboard, Ray Client
WORLD = ("0.0.0.0/0", "::/0")


def load_docs(path: Path) -> list:
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


def kind_of(doc) -> str | None:
    if isinstance(doc, dict) and "provider" in doc and "cluster_name" in doc:
        return "launcher"
    if isinstance(doc, dict) and "apiVersion" in doc and "kind" in doc:
        return "kubernetes"
    return None


def _rel(p: Path) -> str:
    return str(p.relative_to(ROOT))


LAUNCHERS = [p for p in YAML_FILES if [kind_of(d) for d in load_docs(p)] == ["launcher"]]
# cloud launchers autoscale node types on a bucket; on-prem ones (provider: local) run fixed machines on NFS
CLOUD = [p for p in LAUNCHERS if load_docs(p)[0]["provider"]["type"] != "local"]
ONPREM = [p for p in LAUNCHERS if load_docs(p)[0]["provider"]["type"] == "local"]
KUBE_DOCS = [(p, d) for p in YAML_FILES for d in load_docs(p) if kind_of(d) == "kubernetes"]
RAY_DOCS = [(p, d) for p, d in KUBE_DOCS if d["apiVersion"].startswith("ray.io/")]


def _kid(item) -> str:
    path, doc = item
    return f"{_rel(path)}:{doc['kind']}"


def cluster_spec(doc: dict) -> dict:
    return doc["spec"]["rayClusterSpec"] if doc["kind"] == "RayJob" else doc["spec"]


def groups(doc: dict) -> list[tuple[str, dict]]:
    spec = cluster_spec(doc)
    return [("head", spec["headGroupSpec"])] + [(g["groupName"], g) for g in spec["workerGroupSpecs"]]


def quantity(value) -> float:
    """A Kubernetes CPU/GPU quantity ("4", 4, "500m") as a number."""
    text = str(value)
    return float(text[:-1]) / 1000 if text.endswith("m") else float(text)
