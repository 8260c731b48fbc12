"""The Lambda bundle runs on its own: built as the stack builds it (local pip, manylinux
wheels), but for this machine's interpreter, every handler imports with nothing on the path
but the bundle (no site-packages, no checkout), and it carries no torch and no aws_cdk.

tests/test_stack_cli.py checks the bundle the CDK CLI builds for the Lambda runtime itself
(size, wheels' ABI); this one proves what that bundle cannot prove here: that it is complete.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from stacks.bundle import HEADROOM_BYTES, MAX_UNZIPPED_BYTES, build_bundle, bundle_size

LAMBDAS = Path(__file__).resolve().parents[1] / "lambdas"


@pytest.fixture(scope="module")
def bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    return build_bundle(tmp_path_factory.mktemp("bundle") / "asset", python_version=version)


def test_the_bundle_is_small_and_carries_no_model_or_cdk_code(bundle: Path) -> None:
    size = bundle_size(bundle)
    assert HEADROOM_BYTES < MAX_UNZIPPED_BYTES
    assert size < HEADROOM_BYTES, f"the bundle is {size / 2**20:.1f} MiB unzipped (cap 250)"
    print(f"bundle: {size / 2**20:.1f} MiB unzipped")
    top = {p.name for p in bundle.iterdir()}
    assert not top & {"torch", "aws_cdk", "torchserve", "matplotlib"}
    assert {"psycopg", "psycopg_binary", "aws_lambda_powertools", "rasterio"} <= top


def test_every_handler_imports_from_the_bundle_alone(bundle: Path, tmp_path: Path) -> None:
    modules = sorted(p.stem for p in LAMBDAS.glob("*.py"))
    assert "sqs_worker" in modules
    probe = (
        "import sys, importlib\n"
        f"sys.path[:0] = [{str(bundle)!r}]\n"
        f"for name in {modules!r}:\n"
        "    module = importlib.import_module(name)\n"
        "    assert callable(module.handler), name\n"
        "import psycopg\n"
        "assert psycopg.pq.__impl__ == 'binary', psycopg.pq.__impl__\n"
        "assert 'torch' not in sys.modules\n"
        "print('imported', len(sys.modules), 'modules')\n"
    )
    # -I: no user site, no PYTHON* variables, no script directory; -S: no site-packages.
    result = subprocess.run(
        [sys.executable, "-I", "-S", "-c", probe],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        env={"AWS_DEFAULT_REGION": "us-east-1", "PATH": "/usr/bin:/bin"},
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert "imported" in result.stdout
