"""Submit a command to a Ray cluster as a Ray job: a thin wrapper over Ray's JobSubmissionClient.

The working directory is shipped with the job (minus virtual environments, data and results), so
``fers submit -- python jobs/run_cv.py --config jobs/configs/paper.yaml`` runs the same command on
the cluster that runs locally. The address comes from --address, else RAY_ADDRESS, else
http://127.0.0.1:8265 (``ray dashboard cluster/aws.yaml`` or ``kubectl port-forward`` put the
dashboard there). Token authentication: RAY_AUTH_TOKEN, or RAY_AUTH_MODE=token with the token in
RAY_AUTH_TOKEN_PATH or ~/.ray/auth_token (Ray's own order), is sent as a bearer token.

A client of the cluster: imports only ``config`` and ``errors`` of fers-dist. With ``data/prepare.py``,
``cv/`` and ``tune/``, one of the places Ray lives.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shlex
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from fers_dist.errors import FersError

DEFAULT_ADDRESS = "http://127.0.0.1:8265"
# gitignore-style patterns, anchored at the working dir's root: "/data" must not drop fers_dist/data/.
DEFAULT_EXCLUDES = [
    "/.venv", "/venv", "/.git", "/data", "/results", "/runs", "/demo-out",
    "/docs", "__pycache__", "*.egg-info", ".pytest_cache",
]
PROBE_TIMEOUT_S = 3.0
_NOT_DASHBOARD_PORTS = {"6379": "GCS", "10001": "Ray Client"}


# -- address and authentication ---------------------------------------------------------------
def resolve_address(address: str | None = None) -> str:
    """The dashboard's HTTP address: --address, else RAY_ADDRESS, else the local default."""
    raw = (address or os.environ.get("RAY_ADDRESS") or DEFAULT_ADDRESS).strip().rstrip("/")
    if "://" not in raw:
        raw = f"http://{raw}"
    scheme = raw.split("://", 1)[0].lower()
    if scheme not in ("http", "https"):
        raise FersError(
            f"address {raw!r}: fers submit needs the dashboard's HTTP address, e.g. http://HEAD:8265 "
            f"(set --address or RAY_ADDRESS)"
        )
    return raw


def auth_token() -> str | None:
    """The Ray auth token the client should send, in Ray's own precedence, or None."""
    token = os.environ.get("RAY_AUTH_TOKEN", "").strip()
    if token:
        return token
    if os.environ.get("RAY_AUTH_MODE", "").lower() != "token":
        return None
    explicit = os.environ.get("RAY_AUTH_TOKEN_PATH")
    path = Path(explicit).expanduser() if explicit else Path.home() / ".ray" / "auth_token"
    try:
        token = path.read_text().strip()
    except OSError:
        token = ""
    if token:
        return token
    if explicit:
        raise FersError(f"RAY_AUTH_TOKEN_PATH={explicit}: cannot read a token from that file")
    return None  # no token: let the cluster answer 401 if it wants one


def auth_headers() -> dict[str, str]:
    token = auth_token()
    return {"Authorization": f"Bearer {token}"} if token else {}


def _unreachable_hint(address: str) -> str:
    port = address.rsplit(":", 1)[-1].split("/")[0]
    wrong = _NOT_DASHBOARD_PORTS.get(port)
    if wrong:
        return f"port {port} is the {wrong} port; jobs go to the dashboard port (8265)"
    return (
        "start a cluster (local: ray start --head; VMs: ray up cluster/aws.yaml, then "
        "ray dashboard cluster/aws.yaml; KubeRay: kubectl port-forward svc/fers-head-svc 8265:8265) "
        "and pass --address or set RAY_ADDRESS"
    )


def check_cluster(address: str, headers: dict[str, str] | None = None,
                  timeout: float = PROBE_TIMEOUT_S) -> str:
    """Ask the dashboard for its version (GET /api/version) within ``timeout`` seconds.

    Returns the cluster's Ray version; raises FersError naming the address and the fix.
    """
    request = urllib.request.Request(f"{address}/api/version", headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            body = response.read()
    except urllib.error.HTTPError as e:
        if e.code in (401, 403):
            raise FersError(
                f"the Ray cluster at {address} refused the request (HTTP {e.code}): it needs its auth "
                f"token; export RAY_AUTH_TOKEN (launcher clusters: the ~/.ray/auth_token you mounted; "
                f"KubeRay: the cluster's Secret, see cluster/README.md)"
            ) from None
        raise FersError(
            f"{address} answered HTTP {e.code} for /api/version: not a Ray dashboard; "
            f"{_unreachable_hint(address)}"
        ) from None
    except (urllib.error.URLError, OSError) as e:
        reason = getattr(e, "reason", e)
        raise FersError(
            f"no Ray cluster reachable at {address} ({reason}); {_unreachable_hint(address)}"
        ) from None
    try:
        return str(json.loads(body)["ray_version"])
    except (ValueError, KeyError, TypeError):
        raise FersError(
            f"{address}/api/version did not answer like a Ray dashboard; {_unreachable_hint(address)}"
        ) from None


@contextlib.contextmanager
def _without_address_env() -> Iterator[None]:
    """Ray's client lets RAY_ADDRESS / RAY_API_SERVER_ADDRESS override its address argument;
    hide them while it is built so --address wins."""
    saved = {k: os.environ.pop(k) for k in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS") if k in os.environ}
    try:
        yield
    finally:
        os.environ.update(saved)


def make_client(address: str, headers: dict[str, str] | None = None):
    """A JobSubmissionClient for ``address`` (after a fast reachability check)."""
    headers = auth_headers() if headers is None else headers
    check_cluster(address, headers)
    from ray.exceptions import RayError  # AuthenticationError among them
    from ray.job_submission import JobSubmissionClient

    with _without_address_env():
        try:
            return JobSubmissionClient(address, headers=headers)
        except (ConnectionError, RuntimeError, RayError) as e:
            raise FersError(f"Ray job client for {address}: {_first_line(e)}") from None


def _first_line(error: Exception) -> str:
    return (str(error).strip().splitlines() or [type(error).__name__])[0]


# -- runtime environment and storage checks ---------------------------------------------------
def build_runtime_env(working_dir: str | os.PathLike, runtime_env_extra: dict | None = None) -> dict:
    """``{"working_dir": ..., "excludes": [...]}`` merged with extra fields (pip, env_vars, ...).

    Extra ``excludes`` are added to the defaults, never replace them.
    """
    env: dict[str, Any] = {"working_dir": str(Path(working_dir).resolve()), "excludes": list(DEFAULT_EXCLUDES)}
    for key, value in (runtime_env_extra or {}).items():
        if key == "excludes":
            env["excludes"] += [v for v in value if v not in env["excludes"]]
        else:
            env[key] = value
    return env


def _flag_value(argv: list[str], flag: str) -> str | None:
    for i, token in enumerate(argv):
        if token == flag and i + 1 < len(argv):
            return argv[i + 1]
        if token.startswith(flag + "="):
            return token.split("=", 1)[1]
    return None


def _is_uri(value: str) -> bool:
    return "://" in value


def storage_warnings(entrypoint: list[str], working_dir: str | os.PathLike) -> list[str]:
    """Warnings for a ``--config`` whose storage is not shared across nodes.

    A relative cv.storage or data.root resolves inside the job's temporary working dir, which
    differs per node and vanishes with the job; an absolute cv.storage is shared only if it is an
    NFS mount on every node. An absolute data.root is read-only input and may be a per-node copy
    (cluster/*.yaml fetch one to /home/ray/fers-data), so it is not flagged. ``--storage`` and
    ``--data-root`` in the entrypoint override the config's values.
    """
    config_arg = _flag_value(entrypoint, "--config")
    if config_arg is None:
        return []
    config_path = Path(config_arg)
    if not config_path.is_absolute():
        config_path = Path(working_dir) / config_path
        if not config_path.is_file():
            raise FersError(
                f"--config {config_arg}: no such file under the working dir {working_dir}, "
                f"so it would not be shipped with the job"
            )
    elif not config_path.is_file():
        return []  # an absolute path may exist only on the cluster (a KubeRay image, say)
    from fers_dist.config import load_config

    sets = [entrypoint[i + 1] for i, a in enumerate(entrypoint[:-1]) if a == "--set"]
    cfg = load_config(config_path, sets=sets)
    fields = {"cv.storage": ("--storage", cfg.cv.storage), "data.root": ("--data-root", cfg.data.root)}
    warnings = []
    for field, (flag, value) in fields.items():
        override = _flag_value(entrypoint, flag)
        source = flag if override else str(config_arg)
        value = override or value
        relative = not _is_uri(value) and not Path(value).is_absolute()
        if relative or (field == "cv.storage" and not _is_uri(value)):
            where = "a relative path (it resolves in each node's temporary job dir)" if relative \
                else "a local path"
            warnings.append(
                f"WARNING: {field} = {value!r} ({source}) is {where}: on multi-node clusters storage "
                f"must be shared (s3://, gs://, or an NFS mount at the same path on every node)"
            )
    return warnings


# -- submit and wait ----------------------------------------------------------------------------
AGENT_WAIT_S = 60.0  # how long a fresh head may take to start the agent that accepts jobs
def submit_job(entrypoint: list[str], address: str | None = None, working_dir: str | os.PathLike = ".",
               runtime_env_extra: dict | None = None, entrypoint_num_cpus: float = 1.0,
               entrypoint_num_gpus: float | None = None, submission_id: str | None = None) -> str:
    """Submit ``entrypoint`` (an argv list) with the working dir shipped; returns the job id."""
    if not entrypoint:
        raise FersError("no entrypoint: put the command after --, e.g. "
                        "fers submit -- python jobs/run_cv.py --config jobs/configs/paper.yaml")
    if not Path(working_dir).is_dir():
        raise FersError(f"--working-dir {working_dir}: not a directory")
    client = make_client(resolve_address(address))
    from ray.exceptions import RayError

    runtime_env = build_runtime_env(working_dir, runtime_env_extra)
    deadline = time.monotonic() + AGENT_WAIT_S
    while True:
        try:
            return client.submit_job(entrypoint=shlex.join(entrypoint), runtime_env=runtime_env,
                                     entrypoint_num_cpus=entrypoint_num_cpus,
                                     entrypoint_num_gpus=entrypoint_num_gpus, submission_id=submission_id)
        except (ConnectionError, RuntimeError, RayError) as e:
            # a head that just started answers before its job agent is up: that passes, anything else is final
            if "No available agent" in str(e) and time.monotonic() < deadline:
                time.sleep(2.0)
                continue
            raise FersError(f"job submission to {client.get_address()} failed: {_first_line(e)}") from None


def wait_for_job(client_or_address, job_id: str, timeout: float, poll_s: float = 2.0):
    """Poll until the job is SUCCEEDED, FAILED or STOPPED; returns that JobStatus (a str enum)."""
    client = client_or_address
    if client is None or isinstance(client, str):
        client = make_client(resolve_address(client))
    deadline = time.monotonic() + timeout
    while True:
        status = client.get_job_status(job_id)
        if status.is_terminal():
            return status
        if time.monotonic() >= deadline:
            raise FersError(f"job {job_id} is still {status} after {timeout:g} s")
        time.sleep(min(poll_s, max(0.0, deadline - time.monotonic())))


def follow_logs(client, job_id: str, out=sys.stdout) -> None:
    """Print the job's logs as they come, until the job ends."""
    import asyncio

    async def _tail() -> None:
        async for chunk in client.tail_job_logs(job_id):
            out.write(chunk)
            out.flush()

    asyncio.run(_tail())


def next_steps(job_id: str, address: str) -> str:
    auth = "  (with RAY_AUTH_MODE=token and the token in RAY_AUTH_TOKEN or ~/.ray/auth_token)\n" \
        if auth_token() else ""
    return (
        f"submitted job {job_id} to {address}\n"
        f"  follow the logs: ray job logs -f {job_id} --address {address}\n"
        f"  status:          ray job status {job_id} --address {address}\n"
        f"  stop the job:    ray job stop {job_id} --address {address}\n{auth}"
    )


# -- CLI ----------------------------------------------------------------------------------------
def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.usage = "fers submit [options] -- python jobs/run_cv.py --config jobs/configs/paper.yaml ..."
    parser.add_argument("--address", default=None,
                        help=f"dashboard URL; when unset: $RAY_ADDRESS, else {DEFAULT_ADDRESS}")
    parser.add_argument("--working-dir", default=".", help="directory shipped with the job")
    parser.add_argument("--pip", nargs="+", default=None, metavar="PKG",
                        help="extra pip packages installed for the job (runtime_env pip)")
    parser.add_argument("--runtime-env-json", default=None, metavar="JSON",
                        help='extra runtime_env fields, e.g. \'{"env_vars": {"K": "V"}}\'')
    parser.add_argument("--num-cpus", type=float, default=1.0, help="CPUs reserved for the entrypoint")
    parser.add_argument("--num-gpus", type=float, default=None, help="GPUs reserved for the entrypoint")
    parser.add_argument("--job-id", default=None, help="submission id; when unset, Ray makes one")
    parser.set_defaults(follow=False)
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--no-wait", dest="follow", action="store_false", default=argparse.SUPPRESS,
                      help="print the job id and how to follow it, then return (the default)")
    mode.add_argument("--follow", dest="follow", action="store_true", default=argparse.SUPPRESS,
                      help="tail the logs until the job ends; exit 0 only if it SUCCEEDED")
    from fers_dist.config import add_set_argument

    add_set_argument(parser)  # appended to the entrypoint as --set pairs, after a check here
    parser.add_argument("entrypoint", nargs=argparse.REMAINDER,
                        help="the command to run on the cluster, after --")


def runtime_env_extra_from_args(args: argparse.Namespace) -> dict:
    extra: dict[str, Any] = {}
    if args.runtime_env_json:
        try:
            extra = json.loads(args.runtime_env_json)
        except ValueError as e:
            raise FersError(f"--runtime-env-json: invalid JSON ({e})") from None
        if not isinstance(extra, dict):
            raise FersError("--runtime-env-json: expected a JSON object")
    if args.pip:
        extra["pip"] = list(extra.get("pip", [])) + list(args.pip)
    return extra


def run(args: argparse.Namespace) -> int:
    entrypoint = list(args.entrypoint)
    if entrypoint[:1] == ["--"]:
        entrypoint = entrypoint[1:]
    if args.sets:  # checked here (a bad key fails before anything is shipped), then passed to the job
        from fers_dist.config import load_config

        if _flag_value(entrypoint, "--config") is None:  # with a --config, storage_warnings checks them on it
            load_config(None, sets=args.sets)
        entrypoint += [a for pair in args.sets for a in ("--set", pair)]
    address = resolve_address(args.address)
    extra = runtime_env_extra_from_args(args)
    if entrypoint:
        for line in storage_warnings(entrypoint, args.working_dir):
            print(line, file=sys.stderr)
    job_id = submit_job(entrypoint, address, args.working_dir, extra, args.num_cpus, args.num_gpus,
                        args.job_id)
    print(next_steps(job_id, address), end="")
    if not args.follow:
        return 0
    client = make_client(address)
    follow_logs(client, job_id)
    status = wait_for_job(client, job_id, timeout=120)
    print(f"job {job_id}: {status}")
    return 0 if status == "SUCCEEDED" else 1
