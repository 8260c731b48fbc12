"""The GPU hosts' wheelhouse: the wheels a host installs, downloaded once for the hosts' Python
and platform and uploaded to the model bucket, so a boot installs from S3, not PyPI.

:func:`download` runs pip for the hosts' interpreter and platform, :func:`write_manifest`
records what the folder holds (torch, its CUDA, the NVIDIA driver that CUDA needs), and
:func:`upload` puts the folder under the wheelhouse prefix, the manifest last. The boot script
(``model_server/gpu_host_boot.sh``) reads the manifest before it installs anything. Why and
figures: docs/deploy.md, "The AMI and the wheelhouse".
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import zipfile
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from chipscale.errors import ChipscaleError

if TYPE_CHECKING:
    from botocore.client import BaseClient

#: torch the hosts install unless the deployment says otherwise (``torchVersion``).
DEFAULT_TORCH_VERSION = "2.13.0"
#: TorchServe and its archiver, pinned together (the boot script pins the same).
TORCHSERVE_VERSION = "0.12.0"
#: Key prefix of the wheelhouse in the model bucket (``wheelhousePrefix``).
DEFAULT_PREFIX = "wheelhouse/"
#: The hosts' Python (Amazon Linux 2023 packages python3.11; its python3 is 3.9).
HOST_PYTHON = "3.11"
#: The file naming what the wheelhouse holds; uploaded last, so its presence means complete.
MANIFEST = "wheelhouse.json"
#: Amazon Linux 2023 has glibc 2.34: every manylinux tag up to it installs there.
HOST_GLIBC_MINOR = 34

#: Lowest NVIDIA driver for each CUDA major version (NVIDIA's minor-version compatibility
#: table: any 13.x runtime needs >= 580, any 12.x >= 525.60.13, any 11.x >= 450.80.02).
MIN_DRIVER_FOR_CUDA: dict[int, str] = {11: "450.80.02", 12: "525.60.13", 13: "580"}
#: CUDA major of the default Linux x86_64 torch wheel on PyPI, by torch minor version (2.13
#: and 2.14 read from their wheels' metadata, 2.6-2.8 from PyTorch's release notes). Others
#: get no check before an install from PyPI; a wheelhouse's manifest always says.
TORCH_CUDA_MAJOR: dict[str, int] = {"2.6": 12, "2.7": 12, "2.8": 12, "2.13": 13, "2.14": 13}

_CUDA_REQUIREMENT = re.compile(
    r"^Requires-Dist:\s*(?:cuda-toolkit|nvidia-cuda-runtime(?:-cu\d+)?)\b[^=]*==\s*(\d+)\.(\d+)",
    re.MULTILINE,
)


class WheelhouseError(ChipscaleError):
    """The wheelhouse could not be built or uploaded; the message says what to do."""


@dataclass(frozen=True)
class Manifest:
    """What a wheelhouse holds: the boot script checks it before installing."""

    torch: str
    cuda: str
    min_driver: str
    python: str
    wheels: tuple[str, ...]

    def to_json(self) -> str:
        """The manifest as the boot script reads it (one JSON object)."""
        return json.dumps(asdict(self) | {"wheels": list(self.wheels)}, indent=2) + "\n"


def host_requirements(torch_version: str) -> list[str]:
    """What the boot script installs into the hosts' venv, pinned where it pins."""
    return [
        f"torch=={torch_version}",
        f"torchserve=={TORCHSERVE_VERSION}",
        f"torch-model-archiver=={TORCHSERVE_VERSION}",
        "pyyaml",
        "nvgpu",
    ]


def min_driver_for_torch(torch_version: str) -> str:
    """The lowest NVIDIA driver the PyPI build of ``torch_version`` runs on ("" if unknown)."""
    minor = ".".join(torch_version.split("+")[0].split(".")[:2])
    cuda = TORCH_CUDA_MAJOR.get(minor)
    return MIN_DRIVER_FOR_CUDA[cuda] if cuda is not None else ""


def host_platforms() -> list[str]:
    """pip ``--platform`` values of an Amazon Linux 2023 x86_64 host, newest first."""
    tags = [f"manylinux_2_{minor}_x86_64" for minor in range(HOST_GLIBC_MINOR, 4, -1)]
    return [*tags, "manylinux2014_x86_64", "manylinux2010_x86_64", "manylinux1_x86_64"]


def pip_download_command(
    requirements: Sequence[str], dest: Path, python: str, pip_args: Sequence[str] = ()
) -> list[str]:
    """The pip command that fetches binary wheels of ``requirements`` for the hosts."""
    platforms = [arg for tag in host_platforms() for arg in ("--platform", tag)]
    abi = "cp" + python.replace(".", "")
    return [
        sys.executable, "-m", "pip", "download", "--dest", str(dest),
        "--only-binary=:all:", *platforms, "--python-version", python,
        "--implementation", "cp", "--abi", abi, "--abi", "abi3", "--abi", "none",
        "--disable-pip-version-check", "--no-input", *pip_args, *requirements,
    ]  # fmt: skip


def download(
    requirements: Sequence[str], dest: Path, python: str = HOST_PYTHON, pip_args: Sequence[str] = ()
) -> list[Path]:
    """Download the wheels into ``dest`` (created); return the wheel files there."""
    dest.mkdir(parents=True, exist_ok=True)
    command = pip_download_command(requirements, dest, python, pip_args)
    result = subprocess.run(command, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        tail = "\n".join((result.stderr or result.stdout).strip().splitlines()[-5:])
        raise WheelhouseError(f"pip download failed (exit {result.returncode}):\n{tail}")
    return sorted(dest.glob("*.whl"))


def torch_cuda(wheel: Path) -> tuple[int, int] | None:
    """CUDA (major, minor) a torch wheel depends on, read from its metadata; None: CPU only."""
    with zipfile.ZipFile(wheel) as archive:
        name = next(n for n in archive.namelist() if n.endswith(".dist-info/METADATA"))
        metadata = archive.read(name).decode("utf-8", "replace")
    match = _CUDA_REQUIREMENT.search(metadata)
    return (int(match[1]), int(match[2])) if match else None


def write_manifest(folder: Path, torch_version: str, python: str = HOST_PYTHON) -> Manifest:
    """Check the folder holds a CUDA build of ``torch_version``; write and return its manifest."""
    wheels = sorted(p.name for p in folder.glob("*.whl"))
    torches = [folder / w for w in wheels if w.lower().startswith("torch-")]
    if not torches:
        raise WheelhouseError(f"no torch wheel in {folder}")
    version = torches[0].name.split("-")[1]
    if version.split("+")[0] != torch_version:
        raise WheelhouseError(f"pip fetched torch {version}, not the {torch_version} asked for")
    cuda = torch_cuda(torches[0])
    if cuda is None or "+cpu" in version:
        raise WheelhouseError(
            f"torch {version} is a CPU-only build: the GPU hosts need PyPI's CUDA build "
            "(check your pip index and find-links)"
        )
    min_driver = MIN_DRIVER_FOR_CUDA.get(cuda[0])
    if min_driver is None:
        raise WheelhouseError(f"torch {version} needs CUDA {cuda[0]}.{cuda[1]}: no driver rule")
    manifest = Manifest(
        torch=version,
        cuda=f"{cuda[0]}.{cuda[1]}",
        min_driver=min_driver,
        python=python,
        wheels=tuple(wheels),
    )
    (folder / MANIFEST).write_text(manifest.to_json())
    return manifest


@dataclass(frozen=True)
class UploadSummary:
    """What :func:`upload` did: files sent, files already there, stale keys deleted, bytes."""

    uploaded: int
    unchanged: int
    deleted: int
    bytes_sent: int


def upload(
    folder: Path,
    s3: BaseClient,
    bucket: str,
    prefix: str,
    progress: Callable[[str], None] | None = None,
) -> UploadSummary:
    """Upload the wheels (skipping keys of the same size), then the manifest, then delete
    keys under ``prefix`` the folder no longer holds (a host syncing meanwhile gets a
    superset, never a wheelhouse without its manifest)."""
    prefix = prefix.strip("/") + "/"
    if not (folder / MANIFEST).is_file():
        raise WheelhouseError(f"{folder} has no {MANIFEST}: build it first")
    existing: dict[str, int] = {}
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
        existing.update({o["Key"]: int(o["Size"]) for o in page.get("Contents", [])})
    wheels = sorted(folder.glob("*.whl"))
    uploaded = unchanged = sent = 0
    for path in [*wheels, folder / MANIFEST]:
        key = prefix + path.name
        size = path.stat().st_size
        if path.name != MANIFEST and existing.get(key) == size:
            unchanged += 1
            continue
        if progress is not None:
            progress(key)
        s3.upload_file(str(path), bucket, key)
        uploaded += 1
        sent += size
    keep = {prefix + p.name for p in [*wheels, folder / MANIFEST]}
    stale = sorted(set(existing) - keep)
    for start in range(0, len(stale), 1000):
        batch = [{"Key": k} for k in stale[start : start + 1000]]
        s3.delete_objects(Bucket=bucket, Delete={"Objects": batch, "Quiet": True})
    return UploadSummary(uploaded, unchanged, len(stale), sent)
