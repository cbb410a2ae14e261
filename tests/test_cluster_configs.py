"""Every YAML under cluster/ is validated, offline: launcher configs against the JSON schema and the
config checks that ship inside the installed ray package; KubeRay manifests for required fields and
for Ray resources that match the pods'; the fold-run driver resource. Security (no world-open Ray ports,
no public Services, no credentials) is test_cluster_security.py. Files are found by globbing
(cluster_files.py), so a new file is validated without touching this module."""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path

import pytest
import yaml
from cluster_files import (
    CLOUD,
    CLUSTER,
    IMAGE_HOME,
    LAUNCHERS,
    ONPREM,
    RAY_DOCS,
    ROOT,
    YAML_FILES,
    _kid,
    _rel,
    cluster_spec,
    groups,
    kind_of,
    load_docs,
    quantity,
)


def test_cluster_folder_has_the_expected_files():
    names = {_rel(p) for p in YAML_FILES}
    assert {"cluster/aws.yaml", "cluster/gcp.yaml", "cluster/kuberay/raycluster.yaml",
            "cluster/kuberay/rayjob.yaml"} <= names


@pytest.mark.parametrize("path", YAML_FILES, ids=_rel)
def test_every_yaml_is_a_known_kind(path):
    docs = load_docs(path)
    assert docs, f"{_rel(path)} is empty"
    assert all(kind_of(d) for d in docs), f"{_rel(path)}: neither a launcher config nor a k8s manifest"


# -- launcher configs ------------------------------------------------------------------------------
def ray_schema() -> dict:
    import ray.autoscaler

    return json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())


@pytest.mark.parametrize("path", LAUNCHERS, ids=_rel)
def test_launcher_matches_ray_schema(path):
    import jsonschema

    jsonschema.validate(load_docs(path)[0], ray_schema())


def test_ray_schema_rejects_a_misspelt_field():
    import jsonschema

    config = copy.deepcopy(load_docs(CLUSTER / "aws.yaml")[0])
    config["available_node_types"]["worker.gpu1"]["min_worker"] = 1
    with pytest.raises(jsonschema.ValidationError, match="min_worker"):
        jsonschema.validate(config, ray_schema())


@pytest.mark.parametrize("path", LAUNCHERS, ids=_rel)
def test_launcher_passes_rays_own_config_checks(path):
    """What `ray up` runs before touching the cloud: merge with the provider's defaults, validate."""
    from ray.autoscaler._private.util import prepare_config, validate_config

    validate_config(prepare_config(copy.deepcopy(load_docs(path)[0])))


@pytest.mark.parametrize("path", CLOUD, ids=_rel)
def test_launcher_has_cpu_head_and_gpu_worker_types_with_limits(path):
    config = load_docs(path)[0]
    types = config["available_node_types"]
    assert types[config["head_node_type"]]["resources"].get("GPU", 0) == 0, "the head is a CPU node"
    workers = {k: v for k, v in types.items() if k != config["head_node_type"]}
    for name, node in workers.items():
        assert 0 <= node["min_workers"] <= node["max_workers"], name
    gpus = sorted((n["resources"].get("GPU", 0), n["max_workers"]) for n in workers.values())
    assert (1, 8) in gpus, "a single-GPU node type scaling to 8 nodes"
    assert any(g == 8 for g, _ in gpus), "an 8-GPU node type"
    assert sum(n["max_workers"] for n in workers.values()) <= config["max_workers"]
    assert sum(n["min_workers"] for n in workers.values()) >= 1, "a GPU worker stays up"


def docker_images(config: dict) -> list[str]:
    types = config.get("available_node_types", {}).values()
    sections = [config.get("docker", {})] + [n.get("docker", {}) for n in types]
    return [s[k] for s in sections for k in ("image", "head_image", "worker_image") if s.get(k)]


@pytest.mark.parametrize("path", LAUNCHERS, ids=_rel)
def test_launcher_images_pin_the_installed_ray(path):
    import ray

    config = load_docs(path)[0]
    images = docker_images(config)
    assert images and all(i.startswith(f"rayproject/ray:{ray.__version__}-py311") for i in images), images
    assert config["docker"]["worker_image"].endswith("-gpu")


@pytest.mark.parametrize("path", LAUNCHERS, ids=_rel)
def test_launcher_installs_the_synced_working_copy(path):
    config = load_docs(path)[0]
    remote = [r for r, local in config["file_mounts"].items() if local == "."]
    assert len(remote) == 1, "the working copy is synced with file_mounts"
    assert any("pip install" in c and f"-e {remote[0]}" in c for c in config["setup_commands"])


@pytest.mark.parametrize("path", LAUNCHERS, ids=_rel)
def test_launcher_turns_on_token_auth_everywhere(path):
    config = load_docs(path)[0]
    assert "~/.ray/auth_token" in config["file_mounts"]
    starts = [c for c in config["head_start_ray_commands"] + config["worker_start_ray_commands"]
              if "ray start" in c]
    assert len(starts) == 2 and all("RAY_AUTH_MODE=token" in c for c in starts)


@pytest.mark.parametrize("path", CLOUD, ids=_rel)
def test_launcher_storage_is_a_bucket_placeholder(path):
    assert re.search(r"\b(s3|gs)://YOUR-BUCKET/fers\b", path.read_text())


def test_onprem_launcher_runs_fixed_machines_on_a_shared_filesystem():
    """provider: local: a head and worker hosts to fill in, the NFS mount inside the containers, and the
    fers command line that says the storage is shared (it parses against fers cv)."""
    import argparse
    import shlex

    from fers_dist.cv import cli as cv

    assert [_rel(p) for p in ONPREM] == ["cluster/onprem.yaml"]
    text = ONPREM[0].read_text()
    config = load_docs(ONPREM[0])[0]
    assert config["provider"]["head_ip"] == "YOUR-HEAD-HOST" and len(config["provider"]["worker_ips"]) >= 1
    assert "-v /mnt/shared:/mnt/shared" in config["docker"]["run_options"]
    line = re.search(r"#\s+(--storage /mnt/shared\S*.*--shared-filesystem)", text).group(1)
    parser = argparse.ArgumentParser()
    cv.add_arguments(parser)
    args = parser.parse_args(shlex.split(line))
    assert args.shared_filesystem and args.storage.startswith("/mnt/shared/")


def driver_resources_of(path: Path) -> list[tuple[str, dict]]:
    """(node kind, custom resources) of every node a cluster file starts: launcher node types (the head's
    `--resources` for provider: local), KubeRay groups' rayStartParams."""
    out = []
    for doc in load_docs(path):
        if kind_of(doc) == "launcher" and "available_node_types" in doc:
            out += [("head" if k == doc["head_node_type"] else k, t.get("resources", {}))
                    for k, t in doc["available_node_types"].items()]
        elif kind_of(doc) == "launcher":
            flags = [re.search(r"--resources='([^']*)'", c) for c in doc["head_start_ray_commands"]]
            out += [("head", json.loads(next(f.group(1) for f in flags if f)))]
        elif doc["apiVersion"].startswith("ray.io/"):
            out += [(n, json.loads(yaml.safe_load(g.get("rayStartParams", {}).get("resources", '"{}"'))))
                    for n, g in groups(doc)]
    return out


@pytest.mark.parametrize("path", [*LAUNCHERS, *sorted({p for p, _ in RAY_DOCS})], ids=_rel)
def test_fold_run_drivers_live_on_the_head_never_on_a_spot_node(path):
    """cv.driver_resource: the head (never preempted) advertises it, no worker type does."""
    from fers_dist.config import CVConfig

    name = CVConfig().driver_resource
    nodes = driver_resources_of(path)
    assert [k for k, r in nodes if r.get(name, 0) >= 100] == ["head"], nodes


def test_rayjob_tells_fers_cv_how_far_its_cluster_grows():
    """KubeRay's autoscaler reads the RayCluster object, which a job cannot see: --max-gpus says it."""
    args = rayjob_cv_args()
    spec = cluster_spec(_only("RayJob"))
    most = sum(g["maxReplicas"] * quantity(g["rayStartParams"].get("num-gpus", 0)) for g in spec["workerGroupSpecs"])
    assert float(args[args.index("--max-gpus") + 1]) == most


# -- security --------------------------------------------------------------------------------------
# -- KubeRay manifests -----------------------------------------------------------------------------
def containers(group: dict) -> list[dict]:
    spec = group["template"]["spec"]
    return spec.get("initContainers", []) + spec["containers"]


@pytest.mark.parametrize("item", RAY_DOCS, ids=_kid)
def test_kuberay_required_fields(item):
    _, doc = item
    assert doc["apiVersion"] == "ray.io/v1" and doc["kind"] in ("RayCluster", "RayJob")
    assert doc["metadata"]["name"]
    spec = cluster_spec(doc)
    assert spec["headGroupSpec"]["template"]["spec"]["containers"]
    assert spec["workerGroupSpecs"], "at least one worker group"
    for g in spec["workerGroupSpecs"]:
        assert g["groupName"] and g["template"]["spec"]["containers"]
        assert 0 <= g["minReplicas"] <= g.get("replicas", g["minReplicas"]) <= g["maxReplicas"]
    if doc["kind"] == "RayJob":
        assert doc["spec"]["entrypoint"].strip()


@pytest.mark.parametrize("item", RAY_DOCS, ids=_kid)
def test_kuberay_containers_have_image_and_resources(item):
    for name, group in groups(item[1]):
        for c in containers(group):
            assert c.get("image"), f"{name}/{c['name']}: no image"
            limits, requests = c["resources"]["limits"], c["resources"]["requests"]
            assert {"cpu", "memory"} <= set(limits) and {"cpu", "memory"} <= set(requests), c["name"]
            assert quantity(requests["cpu"]) <= quantity(limits["cpu"])
            if "nvidia.com/gpu" in limits:  # extended resources: requests must equal limits
                assert quantity(requests.get("nvidia.com/gpu", limits["nvidia.com/gpu"])) == \
                    quantity(limits["nvidia.com/gpu"])


@pytest.mark.parametrize("item", RAY_DOCS, ids=_kid)
def test_kuberay_ray_resources_match_the_pods(item):
    """rayStartParams num-gpus / num-cpus (when set) equal the Ray container's limits."""
    gpu_groups = 0
    for name, group in groups(item[1]):
        limits = group["template"]["spec"]["containers"][0]["resources"]["limits"]
        params = group.get("rayStartParams", {})
        gpus = quantity(limits.get("nvidia.com/gpu", 0))
        gpu_groups += gpus > 0
        if "num-gpus" in params:
            assert quantity(params["num-gpus"]) == gpus, f"{name}: num-gpus vs nvidia.com/gpu"
        if "num-cpus" in params:
            assert quantity(params["num-cpus"]) == quantity(limits["cpu"]), f"{name}: num-cpus vs cpu"
        if name == "head":
            assert gpus == 0, "the head is a CPU pod"
    assert gpu_groups >= 1, "a GPU worker group"


@pytest.mark.parametrize("item", RAY_DOCS, ids=_kid)
def test_kuberay_pins_ray_and_turns_on_token_auth(item):
    import ray

    spec = cluster_spec(item[1])
    assert spec["rayVersion"] == ray.__version__
    assert spec["authOptions"] == {"mode": "token"}


def _only(kind: str) -> dict:
    docs = [d for _, d in RAY_DOCS if d["kind"] == kind]
    assert len(docs) == 1, f"one {kind} expected"
    return docs[0]


def test_rayjob_runs_on_the_raycluster_spec():
    assert _only("RayJob")["spec"]["rayClusterSpec"] == _only("RayCluster")["spec"]


def rayjob_cv_args() -> list[str]:
    argv = _only("RayJob")["spec"]["entrypoint"].split()
    assert argv[:2] == ["python", "jobs/run_cv.py"]
    return argv[2:]


def test_rayjob_ships_the_images_working_copy():
    """The submitter pod runs the head's image, so it can ship the copy the Dockerfile put there."""
    runtime_env = yaml.safe_load(_only("RayJob")["spec"]["runtimeEnvYAML"])
    assert runtime_env["working_dir"] == IMAGE_HOME
    dockerfile = (CLUSTER / "kuberay" / "Dockerfile").read_text()
    for folder in ("fers_dist", "jobs"):
        assert f"COPY --chown=1000:100 {folder} {IMAGE_HOME}/{folder}" in dockerfile


def test_rayjob_runs_the_cv_protocol_on_a_real_config():
    from fers_dist.config import load_config

    args = rayjob_cv_args()
    config = args[args.index("--config") + 1]
    assert config == "jobs/configs/paper.yaml"
    cfg = load_config(ROOT / config)
    assert cfg.cv.experiment == "paper" and len(cfg.cv.variants) == 4
    assert args[args.index("--storage") + 1].startswith("s3://YOUR-BUCKET/")


def test_rayjob_entrypoint_parses_with_fers_cv():
    import argparse

    from fers_dist.cv import cli as cv

    parser = argparse.ArgumentParser()
    cv.add_arguments(parser)
    parser.parse_args(rayjob_cv_args())


def test_kuberay_image_is_built_from_the_pinned_ray_image():
    import ray

    import fers_dist

    dockerfile = (CLUSTER / "kuberay" / "Dockerfile").read_text()
    assert re.search(rf"^FROM rayproject/ray:{re.escape(ray.__version__)}-py311-gpu$", dockerfile, re.MULTILINE)
    assert f"-e {IMAGE_HOME}" in dockerfile
    images = {c["image"] for _, d in RAY_DOCS for _, g in groups(d) for c in containers(g)}
    assert images == {f"YOUR-REGISTRY/fers-dist:{fers_dist.__version__}"}


# -- SLURM -----------------------------------------------------------------------------------------
SBATCH = CLUSTER / "slurm" / "fers-cv.sbatch"


def test_slurm_script_parses_and_its_fers_command_parses_against_the_cli():
    """`bash -n` on the batch script, then its fers arguments (the block between its markers, run by
    bash) through the `fers cv` parser; Ray is started across the allocation by `ray symmetric-run`."""
    import argparse
    import subprocess

    from fers_dist.cv import cli as cv

    check = subprocess.run(["bash", "-n", str(SBATCH)], capture_output=True, text=True, check=False)
    assert check.returncode == 0, check.stderr
    text = SBATCH.read_text()
    block = re.search(r"# >>> fers command.*?\n(.*?)# <<< fers command", text, re.DOTALL).group(1)
    out = subprocess.run(["bash", "-c", block + '\nprintf "%s\\0" "${FERS_ARGS[@]}"'], capture_output=True,
                         check=False, env={"PATH": "/usr/bin:/bin", "SHARED": "/nfs/fers"})
    argv = out.stdout.decode().split("\0")[:-1]
    parser = argparse.ArgumentParser()
    cv.add_arguments(parser)
    args = parser.parse_args(argv)
    cfg = cv.config_from_args(args)
    assert cfg.cv.storage == "/nfs/fers/results" and cfg.data.root == "/nfs/fers/data" and cfg.cv.shared_filesystem
    assert len(cfg.cv.variants) == 4 and cfg.cv.folds == "all"
    assert re.search(r"srun .*\\\n\s+ray symmetric-run --address \"\$head_ip:6379\"", text)
    assert '-- python jobs/run_cv.py "${FERS_ARGS[@]}"' in text and "--dashboard-host 127.0.0.1" in text
