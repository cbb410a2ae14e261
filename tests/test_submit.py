"""`fers submit`: argument handling, the runtime env it ships, token headers, the fast and clear error
for an unreachable cluster, and the warning for storage that is not shared across nodes. The
end-to-end run against a real `ray start --head` cluster lives with jobs/run_cv.py's tests."""

from __future__ import annotations

import argparse
import itertools
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from fers_dist import cli, submit
from fers_dist.errors import FersError

ROOT = Path(__file__).resolve().parents[1]


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    submit.add_arguments(parser)
    return parser.parse_args(argv)


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def clean_env(monkeypatch, tmp_path):
    for key in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS", "RAY_AUTH_TOKEN", "RAY_AUTH_MODE", "RAY_AUTH_TOKEN_PATH"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    return monkeypatch


# -- arguments and runtime env ---------------------------------------------------------------------
def test_entrypoint_after_double_dash_keeps_its_own_flags():
    args = parse(["--address", "http://head:8265", "--num-cpus", "2", "--pip", "optuna-dashboard",
                  "--follow", "--", "python", "jobs/run_cv.py", "--config", "c.yaml", "--address", "x"])
    assert args.address == "http://head:8265" and args.num_cpus == 2.0 and args.follow
    assert args.pip == ["optuna-dashboard"]
    assert args.entrypoint == ["--", "python", "jobs/run_cv.py", "--config", "c.yaml", "--address", "x"]
    assert parse(["--", "python", "x.py"]).follow is False  # --no-wait is the default


def test_follow_and_no_wait_exclude_each_other():
    with pytest.raises(SystemExit):
        parse(["--follow", "--no-wait", "--", "python", "x.py"])


def test_runtime_env_extra_merges_json_and_pip():
    args = parse(["--runtime-env-json", '{"env_vars": {"A": "1"}, "pip": ["a"]}', "--pip", "b", "--", "x"])
    assert submit.runtime_env_extra_from_args(args) == {"env_vars": {"A": "1"}, "pip": ["a", "b"]}
    with pytest.raises(FersError, match="--runtime-env-json: invalid JSON"):
        submit.runtime_env_extra_from_args(parse(["--runtime-env-json", "{nope", "--", "x"]))
    with pytest.raises(FersError, match="expected a JSON object"):
        submit.runtime_env_extra_from_args(parse(["--runtime-env-json", "[1]", "--", "x"]))


def uploaded_files(working_dir: Path, runtime_env: dict) -> set[str]:
    """What Ray would pack from the working dir, walked with Ray's own exclude rules."""
    from ray._private.runtime_env.packaging import _dir_travel, _get_excludes

    files: set[str] = set()
    _dir_travel(working_dir, [_get_excludes(working_dir, runtime_env["excludes"])],
                lambda p: p.is_file() and files.add(str(p.relative_to(working_dir))), include_gitignore=True)
    return files


def test_runtime_env_ships_code_but_not_data_results_or_venv(tmp_path):
    for rel in ("fers_dist/data/loader.py", "fers_dist/__pycache__/a.pyc", "jobs/run_cv.py",
                "jobs/configs/paper.yaml", "data/ckplus/faces.parquet", "results/paper/folds.parquet",
                ".venv/bin/python", "notes/todo.txt", "weights/lightcnn9.pth"):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text("x")
    env = submit.build_runtime_env(tmp_path, {"excludes": ["/notes"], "pip": ["optuna-dashboard"]})
    assert env["working_dir"] == str(tmp_path.resolve()) and env["pip"] == ["optuna-dashboard"]
    assert set(submit.DEFAULT_EXCLUDES) < set(env["excludes"])
    assert uploaded_files(tmp_path, env) == {"fers_dist/data/loader.py", "jobs/run_cv.py",
                                             "jobs/configs/paper.yaml", "weights/lightcnn9.pth"}


def test_address_comes_from_flag_then_env_then_default(clean_env):
    assert submit.resolve_address(None) == "http://127.0.0.1:8265"
    clean_env.setenv("RAY_ADDRESS", "head:8265")
    assert submit.resolve_address(None) == "http://head:8265"
    assert submit.resolve_address("https://ray.example/") == "https://ray.example"
    with pytest.raises(FersError, match="dashboard's HTTP address"):
        submit.resolve_address("ray://head:10001")


def test_auth_token_follows_rays_precedence(clean_env, tmp_path):
    assert submit.auth_headers() == {}
    token_file = tmp_path / "token"
    token_file.write_text("from-file\n")
    clean_env.setenv("RAY_AUTH_MODE", "token")
    assert submit.auth_headers() == {}  # token mode, but no token anywhere: let the cluster say 401
    default = tmp_path / "home" / ".ray" / "auth_token"
    default.parent.mkdir(parents=True)
    default.write_text("from-default")
    assert submit.auth_headers() == {"Authorization": "Bearer from-default"}
    clean_env.setenv("RAY_AUTH_TOKEN_PATH", str(token_file))
    assert submit.auth_headers() == {"Authorization": "Bearer from-file"}
    clean_env.setenv("RAY_AUTH_TOKEN", "from-env")
    assert submit.auth_headers() == {"Authorization": "Bearer from-env"}
    clean_env.delenv("RAY_AUTH_TOKEN")
    clean_env.setenv("RAY_AUTH_TOKEN_PATH", str(tmp_path / "missing"))
    with pytest.raises(FersError, match="RAY_AUTH_TOKEN_PATH=.*missing"):
        submit.auth_token()


# -- reaching the cluster --------------------------------------------------------------------------
def test_unreachable_cluster_fails_fast_naming_the_address(tmp_path, clean_env):
    url = f"http://127.0.0.1:{closed_port()}"
    start = time.monotonic()
    with pytest.raises(FersError) as err:
        submit.submit_job(["python", "-c", "pass"], url, tmp_path)
    assert time.monotonic() - start < 5
    message = str(err.value)
    assert url in message and "ray start --head" in message and "port-forward" in message
    assert "\n" not in message


def test_gcs_port_is_called_out():
    assert "GCS" in submit._unreachable_hint("http://head:6379")


@pytest.fixture
def fake_dashboard():
    """A loopback HTTP server standing in for the dashboard's /api/version."""
    seen: list[dict] = []

    class Handler(BaseHTTPRequestHandler):
        status, body = 200, b'{"ray_version": "2.60.0"}'

        def do_GET(self):
            seen.append({"path": self.path, **dict(self.headers)})
            self.send_response(Handler.status)
            self.end_headers()
            self.wfile.write(Handler.body)

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_port}", Handler, seen
    server.shutdown()
    server.server_close()


def test_check_cluster_reads_the_version_and_sends_the_token(fake_dashboard):
    url, _, seen = fake_dashboard
    assert submit.check_cluster(url, {"Authorization": "Bearer t0k"}) == "2.60.0"
    assert seen[0]["path"] == "/api/version" and seen[0]["Authorization"] == "Bearer t0k"


@pytest.mark.parametrize("status, body, expected", [
    (401, b"Unauthorized", "needs its auth token; export RAY_AUTH_TOKEN"),
    (404, b"not found", "not a Ray dashboard"),
    (200, b"<html>", "did not answer like a Ray dashboard"),
])
def test_check_cluster_explains_wrong_answers(fake_dashboard, status, body, expected):
    url, handler, _ = fake_dashboard
    handler.status, handler.body = status, body
    with pytest.raises(FersError, match=expected) as err:
        submit.check_cluster(url)
    assert url in str(err.value)


# -- shared-storage warning ------------------------------------------------------------------------
def test_paper_config_warns_that_its_local_storage_is_not_shared():
    warnings = submit.storage_warnings(["python", "jobs/run_cv.py", "--config", "jobs/configs/paper.yaml"], ROOT)
    assert [w.split(" = ")[0] for w in warnings] == ["WARNING: cv.storage", "WARNING: data.root"]
    assert all("relative path" in w and "s3://, gs://" in w and "NFS" in w for w in warnings)


def test_shared_storage_overrides_silence_the_warning():
    entry = ["python", "jobs/run_cv.py", "--config=jobs/configs/paper.yaml", "--storage",
             "s3://YOUR-BUCKET/fers/results", "--data-root", "/home/ray/fers-data"]
    assert submit.storage_warnings(entry, ROOT) == []


def test_absolute_local_storage_warns_and_bad_configs_fail(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("cv:\n  storage: /mnt/results\ndata:\n  root: /mnt/data\n")
    (warning,) = submit.storage_warnings(["python", "x.py", "--config", "c.yaml"], tmp_path)
    assert "cv.storage = '/mnt/results'" in warning and "a local path" in warning
    assert submit.storage_warnings(["python", "x.py"], tmp_path) == []
    (override,) = submit.storage_warnings(["python", "x.py", "--config", "c.yaml", "--storage", "out"], tmp_path)
    assert override.startswith("WARNING: cv.storage = 'out' (--storage) is a relative path")
    with pytest.raises(FersError, match="--config gone.yaml: no such file under the working dir"):
        submit.storage_warnings(["python", "x.py", "--config", "gone.yaml"], tmp_path)
    cfg.write_text("cv:\n  storag: x\n")
    with pytest.raises(FersError, match="c.yaml: cv.storag: unknown key"):
        submit.storage_warnings(["python", "x.py", "--config", "c.yaml"], tmp_path)


def test_cli_warns_then_fails_in_one_line(tmp_path, clean_env, capsys):
    (tmp_path / "local.yaml").write_text("cv:\n  storage: results\n")
    url = f"http://127.0.0.1:{closed_port()}"
    rc = cli.main(["submit", "--address", url, "--working-dir", str(tmp_path), "--",
                   "python", "jobs/run_cv.py", "--config", "local.yaml"])
    err = capsys.readouterr().err
    assert rc == 2
    assert "WARNING: cv.storage = 'results'" in err
    errors = [line for line in err.splitlines() if "error:" in line]
    assert len(errors) == 1 and f"no Ray cluster reachable at {url}" in errors[0]


def test_set_is_checked_here_then_passed_to_the_job(tmp_path, clean_env, monkeypatch, capsys):
    """--set on fers submit: a bad key fails before anything is shipped; good ones ride on the entrypoint
    (jobs/run_cv.py hands them to fers cv) and count in the storage warning."""
    (tmp_path / "local.yaml").write_text("cv:\n  storage: results\n")
    sent = []
    monkeypatch.setattr(submit, "submit_job", lambda entrypoint, *a, **k: sent.append(entrypoint) or "job-1")
    base = ["submit", "--working-dir", str(tmp_path)]
    job = ["--", "python", "jobs/run_cv.py", "--config", "local.yaml"]
    assert cli.main([*base, "--set", "cv.storag=s3://b/r", *job]) == 2
    assert "--set: cv.storag: unknown field" in capsys.readouterr().err and not sent
    assert cli.main([*base, "--set", "cv.storage=s3://b/r", "--set", "train.epochs=3", *job]) == 0
    assert sent == [["python", "jobs/run_cv.py", "--config", "local.yaml", "--set", "cv.storage=s3://b/r",
                     "--set", "train.epochs=3"]]
    assert "WARNING: cv.storage" not in capsys.readouterr().err  # the override put storage on a bucket


def test_cli_without_entrypoint_says_how_to_give_one(tmp_path, clean_env, capsys):
    assert cli.main(["submit", "--working-dir", str(tmp_path)]) == 2
    assert "no entrypoint: put the command after --" in capsys.readouterr().err


# -- waiting and next steps ------------------------------------------------------------------------
class ScriptedClient:
    """Answers get_job_status from a script of statuses, like a JobSubmissionClient would."""

    def __init__(self, statuses):
        self.statuses = iter(statuses)

    def get_job_status(self, job_id):
        return next(self.statuses)


def test_wait_for_job_returns_the_terminal_status_or_times_out():
    from ray.job_submission import JobStatus

    client = ScriptedClient([JobStatus.PENDING, JobStatus.RUNNING, JobStatus.SUCCEEDED])
    assert submit.wait_for_job(client, "raysubmit_1", timeout=5, poll_s=0.01) == "SUCCEEDED"
    with pytest.raises(FersError, match="raysubmit_2 is still RUNNING after"):
        submit.wait_for_job(ScriptedClient(itertools.repeat(JobStatus.RUNNING)), "raysubmit_2",
                            timeout=0.05, poll_s=0.01)


def test_next_steps_say_how_to_follow_and_stop(clean_env):
    text = submit.next_steps("raysubmit_X", "http://127.0.0.1:8265")
    assert "ray job logs -f raysubmit_X --address http://127.0.0.1:8265" in text
    assert "ray job stop raysubmit_X --address http://127.0.0.1:8265" in text
