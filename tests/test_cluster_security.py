"""Security of every file under cluster/: no Ray port (GCS, dashboard, Ray Client) open to the world, no
public Kubernetes Service in front of Ray, nothing that looks like a credential. Each check is also shown
to catch what it looks for."""

from __future__ import annotations

import re

import pytest
from cluster_files import (
    KUBE_DOCS,
    RAY_PORTS,
    TEXT_FILES,
    WORLD,
    YAML_FILES,
    _kid,
    _rel,
    cluster_spec,
    kind_of,
    load_docs,
)


def _port_ranges(rule: dict) -> list[tuple[int, int]]:
    if "IpProtocol" in rule:  # AWS IpPermission
        if str(rule["IpProtocol"]) == "-1" or rule.get("FromPort", -1) == -1:
            return [(0, 65535)]
        return [(int(rule["FromPort"]), int(rule.get("ToPort", rule["FromPort"])))]
    ranges = []
    for allowed in rule.get("allowed", []):  # GCP firewall rule
        for spec in allowed.get("ports") or ["0-65535"]:
            lo, _, hi = str(spec).partition("-")
            ranges.append((int(lo), int(hi or lo)))
    return ranges


def _cidrs(rule: dict) -> list[str]:
    return ([r.get("CidrIp") for r in rule.get("IpRanges", [])]
            + [r.get("CidrIpv6") for r in rule.get("Ipv6Ranges", [])] + list(rule.get("sourceRanges", [])))


def world_open_ray_ports(doc) -> list[str]:
    """Firewall rules or start commands that expose 6379/8265/10001 to any address."""
    found = []
    if kind_of(doc) == "launcher":
        found += [f"dashboard bound to 0.0.0.0: {c}" for c in doc.get("head_start_ray_commands", [])
                  if re.search(r"--dashboard-host[= ]0\.0\.0\.0", c)]
    stack = [doc]
    while stack:
        node = stack.pop()
        if isinstance(node, dict):
            if any(c in WORLD for c in _cidrs(node)):
                found += [f"port {p} open to the world" for lo, hi in _port_ranges(node)
                          for p in RAY_PORTS if lo <= p <= hi]
            stack.extend(node.values())
        elif isinstance(node, list):
            stack.extend(node)
    return found


@pytest.mark.parametrize("path", YAML_FILES, ids=_rel)
def test_no_ray_port_is_open_to_the_world(path):
    for doc in load_docs(path):
        assert world_open_ray_ports(doc) == []


def test_world_open_check_catches_open_rules_and_spares_ssh():
    def aws(port, cidr="0.0.0.0/0"):
        return {"provider": {"security_group": {"IpPermissions": [
            {"IpProtocol": "tcp", "FromPort": port, "ToPort": port, "IpRanges": [{"CidrIp": cidr}]}]}}}

    assert world_open_ray_ports(aws(8265)) == ["port 8265 open to the world"]
    assert world_open_ray_ports(aws(8265, "10.0.0.0/16")) == []
    assert world_open_ray_ports(aws(22)) == []
    everything = {"IpProtocol": "-1", "IpRanges": [{"CidrIp": "0.0.0.0/0"}]}
    assert len(world_open_ray_ports({"rules": [everything]})) == 3
    gcp = {"sourceRanges": ["0.0.0.0/0"], "allowed": [{"IPProtocol": "tcp", "ports": ["6000-7000"]}]}
    assert world_open_ray_ports(gcp) == ["port 6379 open to the world"]
    cmd = {"cluster_name": "x", "provider": {}, "head_start_ray_commands": ["ray start --dashboard-host=0.0.0.0"]}
    assert len(world_open_ray_ports(cmd)) == 1


@pytest.mark.parametrize("item", KUBE_DOCS, ids=_kid)
def test_no_public_service_exposes_ray(item):
    _, doc = item
    public = {"LoadBalancer", "NodePort"}
    if doc["kind"] == "Service":
        assert doc.get("spec", {}).get("type", "ClusterIP") not in public
    if doc["kind"] in ("RayCluster", "RayJob"):
        head = cluster_spec(doc)["headGroupSpec"]
        assert head.get("serviceType", "ClusterIP") == "ClusterIP"
        assert head.get("headService", {}).get("spec", {}).get("type", "ClusterIP") == "ClusterIP"
        assert not head.get("enableIngress", False)


SECRET_PATTERNS = {
    "AWS access key id": r"\b(AKIA|ASIA)[0-9A-Z]{16}\b",
    "private key": r"-----BEGIN [A-Z ]*PRIVATE KEY-----",
    "password": r"(?i)password\s*:",
    "AWS secret key": r"(?i)secret_access_key",
    "AWS session token": r"(?i)aws_session_token",
    "service account key": r'"private_key"\s*:',
    "literal Ray token": r"RAY_AUTH_TOKEN\s*[=:]\s*['\"]?[A-Za-z0-9+/_-]{16,}",
}


def secrets_in(text: str) -> list[str]:
    return [name for name, pattern in SECRET_PATTERNS.items() if re.search(pattern, text)]


@pytest.mark.parametrize("path", TEXT_FILES, ids=_rel)
def test_no_credentials_in_cluster_files(path):
    assert secrets_in(path.read_text()) == []


def test_secret_scan_catches_credentials():
    key_id = "AKIA" + "Q" * 16
    assert secrets_in(f"aws_access_key_id = {key_id}") == ["AWS access key id"]
    assert secrets_in("-----BEGIN RSA " + "PRIVATE KEY-----") == ["private key"]
    assert secrets_in("  password: hunter2") == ["password"]
    assert secrets_in("export RAY_AUTH_TOKEN=" + "x" * 32) == ["literal Ray token"]
    assert secrets_in("export RAY_AUTH_TOKEN=$(kubectl get secret fers -o jsonpath=...)") == []
