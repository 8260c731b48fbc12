"""Scale-in does not cut requests in flight (issue 16, item 10).

The template: the target group drains for at least the response timeout (the worker Lambda's
and TorchServe's, from the config), and a termination lifecycle hook holds each terminating
host until the host completes it. The host's side, ``model_server/gpu_host_drain.sh``, runs
here for real against IMDSv2 served on loopback, with ``ss`` and ``aws`` as recording
stand-ins (no socket table of a GPU host, no AWS here; moto has no CompleteLifecycleAction).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from conftest import ROOT, unavailable

sys.path.insert(0, str(ROOT))

from chipscale import names
from stacks.config import DeploymentConfig
from stacks.drain import (
    deregistration_delay_seconds,
    drain_timeout_seconds,
    termination_hook_timeout_seconds,
    torchserve_response_timeout,
)

MODEL_SERVER = ROOT / "model_server"
DRAIN = MODEL_SERVER / "gpu_host_drain.sh"
BOOT = MODEL_SERVER / "gpu_host_boot.sh"
DRAIN_UNIT = MODEL_SERVER / names.DRAIN_UNIT
VENV_BIN = Path(sys.executable).parent
INSTANCE_ID = "i-0fedcba9876543210"
TOKEN = "AQAEA-drain-token=="


# ------------------------------------------------------------------------------- template


@pytest.fixture(scope="module")
def raw(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    from test_stack import synth

    template, _ = synth(tmp_path_factory.mktemp("cdk.out"))
    return template


def _one(raw: dict[str, Any], kind: str) -> dict[str, Any]:
    (resource,) = [r for r in raw["Resources"].values() if r["Type"] == kind]
    return resource


def test_torchserve_and_lambda_timeouts_come_from_the_config() -> None:
    assert torchserve_response_timeout() == 120  # config.properties default_response_timeout
    default = DeploymentConfig()
    assert deregistration_delay_seconds(default) == 120
    longer = DeploymentConfig(lambda_timeout_seconds=300)
    assert deregistration_delay_seconds(longer) == 300
    assert drain_timeout_seconds(longer) == 300
    assert termination_hook_timeout_seconds(longer) > drain_timeout_seconds(longer)
    # A Lambda timeout below TorchServe's: the host may still answer for 120 s.
    assert deregistration_delay_seconds(DeploymentConfig(lambda_timeout_seconds=30)) == 120


def test_target_group_drains_for_at_least_the_response_timeout(raw: dict[str, Any]) -> None:
    group = _one(raw, "AWS::ElasticLoadBalancingV2::TargetGroup")
    attributes = {a["Key"]: a["Value"] for a in group["Properties"]["TargetGroupAttributes"]}
    delay = int(attributes["deregistration_delay.timeout_seconds"])
    assert delay >= torchserve_response_timeout()
    assert delay >= DeploymentConfig().lambda_timeout_seconds
    load_balancer = _one(raw, "AWS::ElasticLoadBalancingV2::LoadBalancer")
    lb_attributes = {
        a["Key"]: a["Value"] for a in load_balancer["Properties"]["LoadBalancerAttributes"]
    }
    assert int(lb_attributes["idle_timeout.timeout_seconds"]) >= torchserve_response_timeout()


def test_termination_hook_waits_for_the_host(raw: dict[str, Any]) -> None:
    asg = _one(raw, "AWS::AutoScaling::AutoScalingGroup")
    hooks = {
        h["LifecycleTransition"]: h for h in asg["Properties"]["LifecycleHookSpecificationList"]
    }
    hook = hooks["autoscaling:EC2_INSTANCE_TERMINATING"]
    assert hook["LifecycleHookName"] == names.LIFECYCLE_HOOK_TERMINATE
    # A host that cannot complete it must not keep the instance (and its bill) forever.
    assert hook["DefaultResult"] == "CONTINUE"
    assert hook["HeartbeatTimeout"] == termination_hook_timeout_seconds(DeploymentConfig())
    assert hook["HeartbeatTimeout"] > drain_timeout_seconds(DeploymentConfig())
    assert "autoscaling:EC2_INSTANCE_LAUNCHING" in hooks  # the readiness hook stays


def test_user_data_tells_the_host_which_hook_and_how_long(raw: dict[str, Any]) -> None:
    template = _one(raw, "AWS::EC2::LaunchTemplate")
    text = json.dumps(template["Properties"]["LaunchTemplateData"]["UserData"])
    assert f"export {names.HOST_ENV_DRAIN_HOOK}={names.LIFECYCLE_HOOK_TERMINATE}" in text
    timeout = drain_timeout_seconds(DeploymentConfig())
    assert f"export {names.HOST_ENV_DRAIN_TIMEOUT}={timeout}" in text


def test_host_role_may_complete_its_own_groups_lifecycle_actions(raw: dict[str, Any]) -> None:
    policies = [r for k, r in raw["Resources"].items() if "GpuFleetInstanceRole" in k]
    text = json.dumps(policies)
    assert "autoscaling:CompleteLifecycleAction" in text


# ------------------------------------------------------------------------------- host side


class FakeImds(ThreadingHTTPServer):
    """IMDSv2 on loopback: a token, the instance id, and the target lifecycle state from a
    scripted sequence (the last one repeats)."""

    def __init__(self, states: list[str]) -> None:
        super().__init__(("127.0.0.1", 0), _ImdsHandler)
        self.states = states
        self.served = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}/latest"


class _ImdsHandler(BaseHTTPRequestHandler):
    server: FakeImds

    def do_PUT(self) -> None:
        if self.path == "/latest/api/token":
            self._answer(TOKEN)
        else:
            self.send_error(404)

    def do_GET(self) -> None:
        if self.headers.get("X-aws-ec2-metadata-token") != TOKEN:
            self.send_error(401)
        elif self.path == "/latest/meta-data/instance-id":
            self._answer(INSTANCE_ID)
        elif self.path == "/latest/meta-data/autoscaling/target-lifecycle-state":
            index = min(self.server.served, len(self.server.states) - 1)
            self.server.served += 1
            self._answer(self.server.states[index])
        else:
            self.send_error(404)

    def _answer(self, body: str) -> None:
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body.encode())

    def log_message(self, format: str, *args: Any) -> None:
        pass


@contextmanager
def imds(states: list[str]) -> Iterator[FakeImds]:
    server = FakeImds(states)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()


def stand_ins(tmp_path: Path, connections: list[str], aws_failures: int) -> dict[str, str]:
    """``ss`` answering one scripted count of open connections per call ("fail": ss fails;
    the last repeats) and ``aws`` failing its first calls as Auto Scaling does before the
    instance is in Terminating:Wait; both append to one ``events`` file, in order."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    events = tmp_path / "events"
    counts = tmp_path / "counts"
    counts.write_text("\n".join(connections) + "\n")
    fails = tmp_path / "fails"
    fails.write_text(f"{aws_failures}\n")
    (bin_dir / "ss").write_text(
        "#!/bin/sh\n"
        f'n=$(head -n1 "{counts}"); rest=$(tail -n +2 "{counts}")\n'
        f'[ -n "$rest" ] && printf "%s\\n" "$rest" > "{counts}"\n'
        f'echo "ss $n" >> "{events}"\n'
        'if [ "$n" = fail ]; then echo "ss: netlink error" >&2; exit 1; fi\n'
        'i=0; while [ "$i" -lt "$n" ]; do echo "0 0 10.0.1.5:8080 10.0.0.9:4$i"; '
        "i=$((i+1)); done\n"
    )
    (bin_dir / "aws").write_text(
        "#!/bin/sh\n"
        f'echo "aws $*" >> "{events}"\n'
        f'n=$(cat "{fails}")\n'
        f'if [ "$n" -gt 0 ]; then echo $((n-1)) > "{fails}"; '
        'echo "An error occurred (ValidationError) when calling the CompleteLifecycleAction '
        'operation: No active Lifecycle Action found" >&2; exit 254; fi\n'
    )
    for tool in ("ss", "aws"):
        (bin_dir / tool).chmod(0o755)
    return {"PATH": f"{bin_dir}{os.pathsep}{VENV_BIN}{os.pathsep}/usr/bin:/bin"}


def run_drain(
    tmp_path: Path, url: str, env: dict[str, str], *args: str, timeout: str = "5"
) -> subprocess.CompletedProcess[str]:
    bash = shutil.which("bash")
    if bash is None:
        unavailable("bash is not installed")
    assert bash is not None
    full = env | {
        "CHIPSCALE_REGION": "eu-west-1",
        "CHIPSCALE_ASG_NAME": "chipscale-gpu-fleet",
        "CHIPSCALE_DRAIN_HOOK": names.LIFECYCLE_HOOK_TERMINATE,
        "CHIPSCALE_DRAIN_TIMEOUT": timeout,
        "CHIPSCALE_DRAIN_POLL": "0.1",
        "CHIPSCALE_DRAIN_FLUSH": "0",
        "CHIPSCALE_IMDS_URL": url,
    }
    return subprocess.run(
        [bash, str(DRAIN), *args], env=full, capture_output=True, text=True, timeout=60
    )


def events(tmp_path: Path) -> list[str]:
    return (tmp_path / "events").read_text().splitlines()


COMPLETE = (
    "aws autoscaling complete-lifecycle-action --region eu-west-1 "
    "--auto-scaling-group-name chipscale-gpu-fleet "
    f"--lifecycle-hook-name {names.LIFECYCLE_HOOK_TERMINATE} "
    f"--instance-id {INSTANCE_ID} --lifecycle-action-result CONTINUE"
)


def test_shellcheck_clean() -> None:
    exe = shutil.which("shellcheck", path=str(VENV_BIN)) or shutil.which("shellcheck")
    if exe is None:
        unavailable("shellcheck is not installed")
    assert exe is not None
    result = subprocess.run(
        [exe, "--shell=bash", "--severity=style", str(DRAIN)], capture_output=True, text=True
    )
    assert result.returncode == 0, result.stdout


def test_watch_completes_the_hook_only_once_no_request_is_in_flight(tmp_path: Path) -> None:
    """In service: nothing happens. Terminated: two connections, one, none; then CONTINUE,
    retried while Auto Scaling has no action to complete (the load balancer still drains)."""
    env = stand_ins(tmp_path, ["2", "1", "0"], aws_failures=1)
    with imds(["InService", "InService", "Terminated"]) as server:
        result = run_drain(tmp_path, server.url, env, "watch")
    assert result.returncode == 0, result.stdout + result.stderr
    seen = events(tmp_path)
    assert seen[:3] == ["ss 2", "ss 1", "ss 0"]
    assert [e for e in seen if e.startswith("aws")] == [COMPLETE, COMPLETE]
    assert seen.index(COMPLETE) == 3  # nothing was completed while connections were open
    assert server.served >= 3  # it watched until the state turned Terminated
    assert "no request in flight: completing the termination" in result.stdout
    assert "not completed yet" in result.stdout and "No active Lifecycle Action" in result.stdout
    assert f"completed with CONTINUE for {INSTANCE_ID}" in result.stdout.splitlines()[-1]


def test_drain_gives_up_waiting_after_its_timeout(tmp_path: Path) -> None:
    env = stand_ins(tmp_path, ["1"], aws_failures=0)
    with imds(["Terminated"]) as server:
        result = run_drain(tmp_path, server.url, env, "drain", timeout="2")
    assert result.returncode == 0, result.stdout + result.stderr
    seen = events(tmp_path)
    assert seen[-1] == COMPLETE and seen.count(COMPLETE) == 1
    assert len([e for e in seen if e == "ss 1"]) > 2  # it kept looking until the timeout
    assert "still 1 connection(s) open after 2s: completing the termination anyway" in (
        result.stdout
    )


def test_an_unreadable_socket_table_is_not_read_as_drained(tmp_path: Path) -> None:
    env = stand_ins(tmp_path, ["fail"], aws_failures=0)
    with imds(["Terminated"]) as server:
        result = run_drain(tmp_path, server.url, env, "drain", timeout="2")
    assert result.returncode == 0, result.stdout + result.stderr
    seen = events(tmp_path)
    assert seen.index(COMPLETE) > 2  # only after the timeout, never at the first look
    assert "an unknown number of connection(s) open after 2s" in result.stdout


def test_drain_refuses_to_start_without_its_variables(tmp_path: Path) -> None:
    result = subprocess.run(
        ["bash", str(DRAIN), "watch"], env={"PATH": "/usr/bin:/bin"}, capture_output=True,
        text=True,
    )  # fmt: skip
    assert result.returncode == 2
    assert "CHIPSCALE_DRAIN_HOOK" in result.stderr and "CHIPSCALE_DRAIN_TIMEOUT" in result.stderr


def test_boot_installs_the_watcher_with_its_environment() -> None:
    env = {
        "PATH": f"{VENV_BIN}{os.pathsep}/usr/bin:/bin",
        "CHIPSCALE_REGION": "eu-west-1",
        "CHIPSCALE_ASG_NAME": "chipscale-gpu-fleet",
        "CHIPSCALE_DRAIN_HOOK": names.LIFECYCLE_HOOK_TERMINATE,
        "CHIPSCALE_DRAIN_TIMEOUT": "300",
    }
    result = subprocess.run(
        ["bash", "-c", f'source "{BOOT}"; render_drain_env'], env=env, capture_output=True,
        text=True,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    lines = [line for line in result.stdout.splitlines() if not line.startswith("#")]
    assert dict(line.split("=", 1) for line in lines) == {
        k: v for k, v in env.items() if k != "PATH"
    }
    boot = BOOT.read_text()
    body = boot.split("\ninstall_service() {", 1)[1].split("\n}\n", 1)[0]
    assert "install_drain_watcher" in body  # before the launch's CONTINUE (finish_boot)
    assert f"readonly DRAIN_UNIT={names.DRAIN_UNIT}" in boot
    unit = DRAIN_UNIT.read_text()
    assert "EnvironmentFile=/etc/chipscale/drain.env" in unit
    assert "readonly DRAIN_ENV_FILE=/etc/chipscale/drain.env" in boot
    assert "ExecStart=/opt/chipscale/gpu_host_drain.sh watch" in unit


def test_drain_unit_passes_systemd_analyze_verify(tmp_path: Path) -> None:
    analyze = shutil.which("systemd-analyze")
    true = shutil.which("true")
    if analyze is None or true is None:
        unavailable("systemd-analyze is not installed")
    assert analyze is not None and true is not None
    unit = tmp_path / names.DRAIN_UNIT
    unit.write_text(DRAIN_UNIT.read_text().replace("/opt/chipscale/gpu_host_drain.sh", true))
    result = subprocess.run([analyze, "verify", str(unit)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
