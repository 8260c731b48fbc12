"""The boot script's first check: one HEAD of the model archive, before anything is installed.

The whole boot runs here (``gpu_host_boot.sh`` with no argument, as root or in a user
namespace), with IMDSv2 played on loopback and stand-ins on PATH that record every call:
``aws`` answers ``head-object`` as S3 does (404, 403 or the object's size), ``dnf`` fails, so
a boot that reached an install step stops there and leaves the machine as it was.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

from conftest import unavailable
from test_gpu_host import BOOT, bash, host_env, lifecycle_call, serve

BUCKET = "models"  # host_env's CHIPSCALE_MODEL_BUCKET and CHIPSCALE_MODEL_KEY
KEY = "models/demo-0123456789ab.mar"
URI = f"s3://{BUCKET}/{KEY}"
HEAD_ERRORS = {
    "404": "An error occurred (404) when calling the HeadObject operation: Not Found",
    "403": "An error occurred (403) when calling the HeadObject operation: Forbidden",
}


def fake_commands(tmp_path: Path, head: str) -> Path:
    """Stand-ins for what the boot calls before its first install, each recording its
    arguments in ``calls``; ``head`` is what S3 answers to the HEAD (404, 403 or 200)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    calls = tmp_path / "calls"
    record = f'echo "$(basename "$0") $*" >> "{calls}"'
    error = HEAD_ERRORS.get(head, "")
    scripts = {
        "aws": f"""{record}
case "$1 $2" in
  "s3api head-object")
    if [ -n "{error}" ]; then echo; echo "{error}" >&2; exit 254; fi
    echo 1234567 ;;
esac
exit 0""",
        "dnf": f"{record}\nexit 1",  # any install fails: nothing is installed on this machine
        "apt-get": f"{record}\nexit 1",
        "systemctl": f"{record}\nexit 0",
        "nvidia-smi": f"""{record}
case "$*" in
  *driver_version*) echo 580.95.05 ;;
  *) echo "GPU 0: NVIDIA A10G (UUID: GPU-0)" ;;
esac""",
    }
    for name, body in scripts.items():
        path = bin_dir / name
        path.write_text(f"#!/bin/sh\n{body}\n")
        path.chmod(0o755)
    return calls


def boot(tmp_path: Path, head: str) -> tuple[subprocess.CompletedProcess[str], list[str]]:
    """The whole boot (``gpu_host_boot.sh``, no argument) with the stand-ins; its calls."""
    command = [bash(), str(BOOT)]
    if os.geteuid() != 0:  # the boot wants root: a user namespace maps this user to it
        unshare = shutil.which("unshare")
        if unshare is None or subprocess.run([unshare, "-r", "true"], check=False).returncode:
            unavailable("the boot needs root, or unshare -r for a user namespace")
        command = [str(unshare), "-r", *command]
    with serve([["READY"]]) as server:  # plays IMDSv2 for the instance id
        env = host_env(server.url, tmp_path)  # its bin/ is first on PATH
        calls = fake_commands(tmp_path, head)  # replaces host_env's plain `aws` there
        result = subprocess.run(
            command, env=env, capture_output=True, text=True, timeout=60, check=False
        )
    return result, calls.read_text().splitlines() if calls.exists() else []


def head_call() -> str:
    return (
        f"aws s3api head-object --region eu-west-1 --bucket {BUCKET} --key {KEY} "
        "--query ContentLength --output text"
    )


def installs(calls: list[str]) -> list[str]:
    return [c for c in calls if c.startswith(("dnf ", "apt-get ", "aws s3 "))]


def test_a_missing_archive_abandons_before_any_install_naming_the_key(tmp_path: Path) -> None:
    result, calls = boot(tmp_path, "404")
    assert result.returncode == 1, result.stderr
    assert installs(calls) == [], calls  # no package, no venv, no archive download
    assert [c for c in calls if c.startswith("aws s3api")] == [head_call()]  # one HEAD
    # The reason names the key, in the log line that says why the launch is abandoned...
    assert f"boot failed while checking the model archive {URI} (exit 1)" in result.stderr
    assert f"model archive {URI} does not exist (404)" in result.stderr
    # ...which reaches the host log group itself: the CloudWatch agent is not running yet.
    (put,) = [c for c in calls if c.startswith("aws logs put-log-events")]
    assert "chipscale-GpuFleetHostLogs" in put and KEY in put
    assert "--log-stream-name i-0a1b2c3d4e5f60789/cloud-init-output.log" in put
    # The launch is abandoned the way every failed boot is: the EXIT trap, once, last.
    assert calls[-1] == f"aws {lifecycle_call('ABANDON')}"
    assert sum("complete-lifecycle-action" in c for c in calls) == 1


def test_a_forbidden_archive_says_so(tmp_path: Path) -> None:
    result, calls = boot(tmp_path, "403")
    assert result.returncode == 1, result.stderr
    assert installs(calls) == []
    assert f"model archive {URI}: access denied (403)" in result.stderr
    assert calls[-1] == f"aws {lifecycle_call('ABANDON')}"


def test_a_present_archive_is_checked_first_and_the_boot_goes_on(tmp_path: Path) -> None:
    """With the archive there, the HEAD comes before the first install, and the boot goes on
    to it (here the stand-in package manager fails, so the boot stops at that install)."""
    result, calls = boot(tmp_path, "200")
    assert f"model archive {URI}: 1234567 bytes" in result.stderr
    first_install = next(i for i, c in enumerate(calls) if c.startswith("dnf "))
    assert calls.index(head_call()) < first_install
    assert result.returncode != 0 and calls[-1] == f"aws {lifecycle_call('ABANDON')}"
