"""The Lambda bundle: the chipscale distribution with its ``worker`` extra, plus ``lambdas/``.

One zip serves the three functions. ``build_bundle`` builds it with the local ``pip``
(manylinux wheels for the Lambda's interpreter; Docker only as a fallback): the CDK asset
calls it through ``LocalPipBundling`` and a test calls it to check size and contents. Why:
docs/design.md, "The cloud".
"""

from __future__ import annotations

import hashlib
import importlib.util
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import jsii
from aws_cdk import AssetHashType, BundlingOptions, ILocalBundling
from aws_cdk import aws_lambda as lambda_

from stacks.common import LAMBDA_RUNTIME
from stacks.config import REPO_ROOT

#: Wheels for the Lambda: CPython 3.12 on x86_64 (Amazon Linux 2023 has glibc 2.34).
PLATFORMS = ("manylinux2014_x86_64", "manylinux_2_28_x86_64")
PYTHON_VERSION = "3.12"
EXTRA = "worker"
#: What a build of the distribution needs (pyproject's packages: chipscale, model_server).
DIST_FILES = ("pyproject.toml", "README.md", "chipscale", "model_server")
#: Lambda's limit on a function's unzipped code and layers.
MAX_UNZIPPED_BYTES = 250 * 1024 * 1024
#: Where the tests stop a bundle, well before Lambda's limit: a new dependency of the worker
#: extra shows there while there is room to act (213.3 MiB on 2026-12-03).
HEADROOM_BYTES = 235 * 1024 * 1024


class BundlingError(RuntimeError):
    """The local pip bundling failed."""


def pip_install_command(
    python: str, wheel: Path, target: Path, python_version: str = PYTHON_VERSION
) -> list[str]:
    """``pip install`` of ``wheel[worker]`` into ``target`` with manylinux wheels only."""
    platforms = [arg for platform in PLATFORMS for arg in ("--platform", platform)]
    return [
        python,
        "-m",
        "pip",
        "install",
        "--quiet",
        "--no-compile",
        "--only-binary=:all:",
        *platforms,
        "--python-version",
        python_version,
        "--implementation",
        "cp",
        "--target",
        str(target),
        f"{wheel}[{EXTRA}]",
    ]


def build_bundle(
    out_dir: Path,
    *,
    repo_root: Path = REPO_ROOT,
    python: str = sys.executable,
    python_version: str = PYTHON_VERSION,
) -> Path:
    """Build the Lambda bundle into ``out_dir`` (created if needed) and return it.

    ``python_version`` is the Lambda runtime's; a test builds one for its own interpreter to
    import the handlers from the bundle alone.

    The distribution is built as a wheel from a copy of its files (so the build leaves no
    ``build/`` in the checkout), then installed with its dependencies as Lambda wheels; the
    handlers of ``lambdas/`` go to the bundle root, where ``sqs_worker.handler`` finds them.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="chipscale-bundle-") as tmp:
        src = Path(tmp) / "src"
        wheels = Path(tmp) / "wheels"
        src.mkdir()
        for name in DIST_FILES:
            path = repo_root / name
            if path.is_dir():
                shutil.copytree(path, src / name, ignore=shutil.ignore_patterns("__pycache__"))
            elif path.exists():
                shutil.copy2(path, src / name)
        # Build with this interpreter's setuptools when it has one (no download); Python
        # 3.12+ venvs have none, and then pip fetches the build backend in isolation.
        isolation = ["--no-build-isolation"] if _has_setuptools(python) else []
        wheel_args = ["wheel", "--quiet", "--no-deps", *isolation, "--wheel-dir", str(wheels)]
        _run([python, "-m", "pip", *wheel_args, str(src)])
        (wheel,) = wheels.glob("chipscale-*.whl")
        _run(pip_install_command(python, wheel, out_dir, python_version))
    for handler in sorted((repo_root / "lambdas").glob("*.py")):
        shutil.copy2(handler, out_dir / handler.name)
    for cache in list(out_dir.rglob("__pycache__")):
        shutil.rmtree(cache, ignore_errors=True)
    return out_dir


def _has_setuptools(python: str) -> bool:
    if python == sys.executable:
        return importlib.util.find_spec("setuptools") is not None
    probe = subprocess.run([python, "-c", "import setuptools"], capture_output=True)
    return probe.returncode == 0


def bundle_size(path: Path) -> int:
    """Unzipped bytes of a bundle directory."""
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file() and not f.is_symlink())


def source_hash(repo_root: Path = REPO_ROOT) -> str:
    """Hash of what goes into the bundle (the distribution's files and ``lambdas/``) and of
    how it is built: the asset changes exactly when one of them does, and synth never walks
    the whole checkout (``.venv``, ``node_modules``) to fingerprint it."""
    digest = hashlib.sha256()
    digest.update(" ".join(pip_install_command("python", Path("w"), Path("t"))).encode())
    for name in (*DIST_FILES, "lambdas"):
        root = repo_root / name
        files = [root] if root.is_file() else sorted(root.rglob("*")) if root.is_dir() else []
        for path in files:
            if path.is_file() and "__pycache__" not in path.parts:
                digest.update(str(path.relative_to(repo_root)).encode())
                digest.update(path.read_bytes())
    return digest.hexdigest()


@jsii.implements(ILocalBundling)
class LocalPipBundling:
    """CDK's local bundling hook: build with this machine's pip instead of Docker."""

    def try_bundle(self, output_dir: str, *args: Any, **kwargs: Any) -> bool:
        """Return True when the bundle was built locally, False to let CDK use Docker."""
        try:
            subprocess.run(
                [sys.executable, "-m", "pip", "--version"], check=True, capture_output=True
            )
        except (OSError, subprocess.CalledProcessError):
            return False
        build_bundle(Path(output_dir))
        return True


def _docker_command() -> str:
    """The same build inside the Lambda build image, for machines without a usable pip."""
    files = " ".join(f"/asset-input/{name}" for name in DIST_FILES)
    return (
        f"mkdir -p /tmp/src && cp -r {files} /tmp/src/ && "
        f"pip install --no-cache-dir --target /asset-output '/tmp/src[{EXTRA}]' && "
        "cp /asset-input/lambdas/*.py /asset-output/"
    )


def lambda_code() -> lambda_.Code:
    """The bundle as a Lambda code asset (local pip bundling, Docker as fallback)."""
    return lambda_.Code.from_asset(
        str(REPO_ROOT),
        asset_hash_type=AssetHashType.CUSTOM,
        asset_hash=source_hash(),
        bundling=BundlingOptions(
            image=LAMBDA_RUNTIME.bundling_image,
            command=["bash", "-c", _docker_command()],
            local=LocalPipBundling(),
        ),
    )


def _run(command: list[str]) -> None:
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        raise BundlingError(
            f"bundling step failed ({result.returncode}): {' '.join(command)}\n{result.stderr}"
        )
