"""The hosts' wheelhouse (issue 16, item 9): built by ``chipscale wheelhouse build`` with this
machine's pip and its local wheel index, uploaded to moto S3; and the boot script's install
part run locally with ``aws``, ``nvidia-smi`` and the venv's ``pip`` faked on PATH: a driver
older than the torch build needs abandons before any pip install, and a wheelhouse installs
with ``--no-index --find-links`` from the synced folder."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner
from conftest import unavailable
from test_gpu_host import BOOT, aws_calls, bash, host_env, lifecycle_call, serve

from chipscale.cli import cli
from chipscale.ops import wheelhouse
from chipscale.ops.stack_outputs import StackOutputs

TORCH = "2.13.0"
STACK = "chipscale"
WHEELHOUSE_URI = "s3://models-bucket/wheelhouse/"


def fake_torch(folder: Path, version: str = TORCH, cuda: str | None = "13.0.3") -> Path:
    """A wheel named and described as PyPI's torch (its CUDA requirement as the real one
    writes it), a few hundred bytes instead of 527 MB."""
    folder.mkdir(parents=True, exist_ok=True)
    wheel = folder / f"torch-{version}-cp311-cp311-manylinux_2_28_x86_64.whl"
    info = f"torch-{version.split('+')[0]}.dist-info"
    requires = (
        f'Requires-Dist: cuda-toolkit[cublas,cudart]=={cuda}; platform_system == "Linux"\n'
        if cuda
        else ""
    )
    with zipfile.ZipFile(wheel, "w") as archive:
        archive.writestr("torch/__init__.py", "")
        archive.writestr(
            f"{info}/METADATA",
            f"Metadata-Version: 2.1\nName: torch\nVersion: {version}\n{requires}",
        )
        archive.writestr(
            f"{info}/WHEEL",
            "Wheel-Version: 1.0\nRoot-Is-Purelib: false\nTag: cp311-cp311-manylinux_2_28_x86_64\n",
        )
        archive.writestr(f"{info}/RECORD", "")
    return wheel


def local_index() -> str:
    """The first local (file://) index in this machine's pip configuration."""
    listed = subprocess.run(
        [sys.executable, "-m", "pip", "config", "list"], capture_output=True, text=True
    ).stdout
    values = [
        line.split("=", 1)[1].strip("'\"") for line in listed.splitlines() if "index-url=" in line
    ]
    urls = [url for value in values for url in value.split() if url.startswith("file://")]
    if not urls:
        unavailable("no local file:// package index in pip's configuration")
    return urls[0]


# ------------------------------------------------------------------------------- the library


def test_min_driver_follows_the_torch_build() -> None:
    assert wheelhouse.min_driver_for_torch("2.13.0") == "580"  # CUDA 13
    assert wheelhouse.min_driver_for_torch("2.8.0") == "525.60.13"  # CUDA 12.8
    assert wheelhouse.min_driver_for_torch("9.9.0") == ""  # unknown: no guess


def test_the_boot_script_installs_what_the_wheelhouse_holds() -> None:
    """The builder downloads exactly the packages the boot script installs."""
    script = BOOT.read_text()
    assert f"readonly TORCHSERVE_VERSION={wheelhouse.TORCHSERVE_VERSION}\n" in script
    install = script.split('"$VENV/bin/pip" install "${pip_args[@]}"', 1)[1].split('\n  "$VENV', 1)[
        0
    ]
    for requirement in wheelhouse.host_requirements("X"):
        name = requirement.split("==")[0]
        assert name in install, name


def test_a_cpu_torch_is_refused(tmp_path: Path) -> None:
    fake_torch(tmp_path, version=f"{TORCH}+cpu", cuda=None)
    with pytest.raises(wheelhouse.WheelhouseError, match=r"torch 2.13.0\+cpu is a CPU-only"):
        wheelhouse.write_manifest(tmp_path, TORCH)


def test_build_downloads_for_the_hosts_and_uploads_to_the_stack_bucket(
    tmp_path: Path, moto_server: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``chipscale wheelhouse build --stack``: pip (this machine's config and local index,
    torch from a find-links folder) fetches cp311 manylinux wheels, the manifest names torch,
    its CUDA and the driver it needs, and everything lands under wheelhouse/ of the model
    bucket, the manifest last; a stale wheel there is deleted, an unchanged one not re-sent."""
    import boto3

    monkeypatch.setenv("AWS_ENDPOINT_URL", moto_server)
    s3 = boto3.client("s3", endpoint_url=moto_server)
    bucket = f"models-{os.getpid()}"
    s3.create_bucket(Bucket=bucket)
    s3.put_object(Bucket=bucket, Key="wheelhouse/torch-2.12.0-old.whl", Body=b"old")
    s3.put_object(Bucket=bucket, Key="models/keep.mar", Body=b"model")
    outputs = StackOutputs(STACK, "us-east-1", "q", "dlq", model_bucket=bucket)
    monkeypatch.setattr(
        "chipscale.ops.stack_outputs.resolve_stack", lambda name, session=None: outputs
    )
    fake_torch(tmp_path / "links")
    # This machine's find-links folder holds a CPU torch (refused, see above): the CUDA one
    # comes from a folder of our own; pyyaml from the local index pip is configured with.
    monkeypatch.setenv("PIP_FIND_LINKS", str(tmp_path / "links"))
    folder = tmp_path / "wheels"
    args = ["wheelhouse", "build", "--stack", STACK, "--dir", str(folder), "--pip-arg=--no-deps"]
    args.append(f"--pip-arg=--index-url={local_index()}")  # offline: never pypi.org
    sent: list[dict[str, Any]] = []
    monkeypatch.setattr(wheelhouse, "host_requirements", lambda v: [f"torch=={v}", "pyyaml"])
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.output
    assert "torch 2.13.0, CUDA 13.0: hosts need NVIDIA driver >= 580" in result.output
    wheels = sorted(p.name for p in folder.glob("*.whl"))
    assert wheels[0].startswith("pyyaml-") and "cp311" in wheels[0] and "manylinux" in wheels[0]
    assert wheels[1] == f"torch-{TORCH}-cp311-cp311-manylinux_2_28_x86_64.whl"
    keys = [o["Key"] for o in s3.list_objects_v2(Bucket=bucket)["Contents"]]
    assert sorted(keys) == sorted(
        ["models/keep.mar", "wheelhouse/wheelhouse.json", *(f"wheelhouse/{w}" for w in wheels)]
    )
    manifest = json.loads(
        s3.get_object(Bucket=bucket, Key="wheelhouse/wheelhouse.json")["Body"].read()
    )
    assert manifest == {
        "torch": TORCH, "cuda": "13.0", "min_driver": "580", "python": "3.11", "wheels": wheels,
    }  # fmt: skip
    assert "3 uploaded" in result.output and "1 stale deleted" in result.output
    # A second upload of the same folder sends only the manifest.
    summary = wheelhouse.upload(folder, s3, bucket, "wheelhouse/", sent.append)
    assert (summary.uploaded, summary.unchanged, summary.deleted) == (1, 2, 0)


# ------------------------------------------------------------------------------- the boot


def fake_tools(tmp_path: Path, driver: str, manifest_torch: str = TORCH) -> dict[str, str]:
    """``aws`` (records its calls; ``s3 cp`` of the manifest writes one, ``s3 sync`` puts a
    wheel in the target), ``nvidia-smi`` (this driver, two GPUs) and ``python3.11`` whose
    ``-m venv`` makes a venv whose pip records its arguments."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    manifest = json.dumps(
        {"torch": manifest_torch, "cuda": "13.0", "min_driver": "580", "python": "3.11",
         "wheels": []}
    )  # fmt: skip
    scripts = {
        "aws": f"""#!/bin/sh
echo "$*" >> "{tmp_path / "aws-calls"}"
case "$1 $2 $4" in
  "s3 cp {WHEELHOUSE_URI}wheelhouse.json") printf '%s' '{manifest}' > "$5" ;;
  "s3 cp "*) echo "fatal error: An error occurred (404) when calling the HeadObject operation" >&2
    exit 1 ;;
  "s3 sync "*) mkdir -p "$5" && touch "$5/torch-{TORCH}-cp311-cp311-manylinux_2_28_x86_64.whl" ;;
esac
""",
        "nvidia-smi": f"#!/bin/sh\nprintf '{driver}\\n{driver}\\n'\n",
        "python3.11": f"""#!/bin/sh
[ "$1 $2" = "-m venv" ] || exit 1
mkdir -p "$3/bin"
printf '#!/bin/sh\\necho "$*" >> "{tmp_path / "pip-calls"}"\\n' > "$3/bin/pip"
printf '#!/bin/sh\\ncat >/dev/null\\n' > "$3/bin/python"
chmod +x "$3/bin/pip" "$3/bin/python"
""",
    }
    for name, text in scripts.items():
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    return {"CHIPSCALE_PREFIX": str(tmp_path / "opt")}


def install_part(
    tmp_path: Path, driver: str, **extra: str
) -> tuple[subprocess.CompletedProcess[str], list[str], list[str]]:
    """The boot's install steps, in cmd_boot's order, under its EXIT trap."""
    with serve([["READY"]]) as server:  # IMDSv2 for the instance id
        env = host_env(server.url, tmp_path) | fake_tools(tmp_path, driver) | {
            "CHIPSCALE_TORCH_VERSION": TORCH, "CHIPSCALE_MIN_DRIVER": "",
            "CHIPSCALE_WHEELHOUSE_URI": WHEELHOUSE_URI,
        } | extra  # fmt: skip
        script = (
            f'source "{BOOT}"; trap on_exit EXIT; PKG=dnf; check_torch_driver; '
            'python=$(ensure_python "$WHEEL_PYTHON"); create_venv "$python"'
        )
        result = subprocess.run(
            [bash(), "-c", script], env=env, capture_output=True, text=True, timeout=60
        )
    pip = tmp_path / "pip-calls"
    return result, aws_calls(tmp_path), pip.read_text().splitlines() if pip.exists() else []


def test_driver_too_old_abandons_before_any_pip_install(tmp_path: Path) -> None:
    result, calls, pip = install_part(tmp_path, driver="570.124.06")
    assert result.returncode == 1
    assert pip == []
    assert not any(call.startswith("s3 sync") for call in calls)  # no gigabytes fetched
    assert calls[-1] == lifecycle_call("ABANDON")
    assert (
        "NVIDIA driver 570.124.06 is older than 580, which torch 2.13.0 (the wheelhouse's "
        "CUDA 13.0 build) needs" in result.stderr
    )


def test_driver_too_old_for_the_pypi_build_abandons_too(tmp_path: Path) -> None:
    result, calls, pip = install_part(
        tmp_path, "535.230.02", CHIPSCALE_WHEELHOUSE_URI="", CHIPSCALE_MIN_DRIVER="580"
    )
    assert result.returncode == 1 and pip == []
    assert "NVIDIA driver 535.230.02 is older than 580, which torch 2.13.0 (PyPI's build)" in (
        result.stderr
    )
    assert calls[-1] == lifecycle_call("ABANDON")


def test_a_wheelhouse_of_another_torch_abandons_naming_both(tmp_path: Path) -> None:
    result, calls, pip = install_part(tmp_path, "580.65.06", CHIPSCALE_TORCH_VERSION="2.14.1")
    assert result.returncode == 1 and pip == []
    assert "the wheelhouse holds torch 2.13.0, the stack wants torch 2.14.1" in result.stderr
    assert "chipscale wheelhouse build --stack chipscale-gpu --torch-version 2.14.1" in (
        result.stderr
    )
    assert calls[-1] == lifecycle_call("ABANDON")


def test_wheelhouse_installs_offline_from_the_synced_folder(tmp_path: Path) -> None:
    result, calls, pip = install_part(tmp_path, driver="580.65.06")
    assert result.returncode == 0, result.stderr
    wheel_dir = tmp_path / "opt" / "wheelhouse"
    assert f"s3 sync --only-show-errors {WHEELHOUSE_URI} {wheel_dir}/" in calls
    (install,) = pip
    assert f"--no-index --find-links {wheel_dir} torch=={TORCH} " in install
    assert "NVIDIA driver 580.65.06: torch 2.13.0" in result.stderr
    assert not any("complete-lifecycle-action" in call for call in calls)


def test_a_missing_manifest_abandons_naming_the_command(tmp_path: Path) -> None:
    result, calls, pip = install_part(
        tmp_path, "580.65.06", CHIPSCALE_WHEELHOUSE_URI="s3://models-bucket/elsewhere/"
    )
    assert result.returncode == 1 and pip == []
    assert (
        "wheelhouse manifest s3://models-bucket/elsewhere/wheelhouse.json is missing or "
        "unreadable (fatal error: An error occurred (404)" in result.stderr
    )
    assert "chipscale wheelhouse build --stack chipscale-gpu" in result.stderr
    assert calls[-1] == lifecycle_call("ABANDON")


def test_the_driver_check_comes_before_every_install() -> None:
    body = BOOT.read_text().split("\ncmd_boot() {", 1)[1].split("\n}\n", 1)[0]
    check = body.index("check_torch_driver")
    for install in ("start_cloudwatch_agent", "ensure_java", "ensure_python", "create_venv"):
        assert check < body.index(install), install
