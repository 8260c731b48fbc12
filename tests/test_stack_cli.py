"""``npx cdk synth`` from the checkout, as a user runs it: the pinned CLI from node_modules,
no AWS credentials, no Docker, real local bundling of the Lambda zip.

The bundle the CLI built is then checked: under Lambda's 250 MB unzipped limit, no torch and
no aws_cdk inside, psycopg's binary build, rasterio and the handlers at the root.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

# stacks/ is not an installed package (the distribution ships chipscale and model_server):
# import it from the checkout whatever pytest's import mode.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from conftest import unavailable
from test_stack import ingress_rules, open_to_the_internet

from stacks.bundle import HEADROOM_BYTES, bundle_size
from stacks.config import REPO_ROOT

pytestmark = pytest.mark.slow

CDK = REPO_ROOT / "node_modules" / ".bin" / "cdk"


def ensure_cli() -> Path:
    """The CLI pinned by package-lock.json (``make test`` runs ``npm ci`` first)."""
    if shutil.which("node") is None:
        unavailable("node is not installed: the CDK CLI needs it")
    if not CDK.exists():
        npm = shutil.which("npm")
        if npm is None:
            unavailable("npm is not installed and node_modules has no CDK CLI")
        subprocess.run([npm, "ci", "--no-audit", "--no-fund"], cwd=REPO_ROOT, check=True)
    return CDK


def clean_env(tmp: Path) -> dict[str, str]:
    """No AWS credentials or profile, and a Docker that cannot run."""
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("AWS_", "CDK_")) and k not in {"DOCKER_HOST"}
    }
    env.update(
        HOME=str(tmp),  # no ~/.aws either
        AWS_CONFIG_FILE=str(tmp / "no-config"),
        AWS_SHARED_CREDENTIALS_FILE=str(tmp / "no-credentials"),
        AWS_EC2_METADATA_DISABLED="true",
        CDK_DOCKER="/bin/false",  # bundling through Docker would fail loudly
        CDK_DISABLE_CLI_TELEMETRY="true",
        JSII_SILENCE_WARNING_END_OF_LIFE_NODE_VERSION="20",
        npm_config_cache=str(Path(os.environ.get("HOME", "/root")) / ".npm"),
    )
    return env


@pytest.fixture(scope="module")
def cli_synth(tmp_path_factory: pytest.TempPathFactory) -> Path:
    ensure_cli()
    npx = shutil.which("npx")
    if npx is None:
        unavailable("npx is not installed (it comes with npm)")
    tmp = tmp_path_factory.mktemp("cli")
    out = tmp / "cdk.out"
    started = time.monotonic()
    # `npx --no` runs the CLI of node_modules (the lock's version) and never downloads one.
    result = subprocess.run(
        [npx, "--no", "cdk", "synth", "--quiet", "--output", str(out)],
        cwd=REPO_ROOT,
        env=clean_env(tmp),
        capture_output=True,
        text=True,
        timeout=900,
    )
    elapsed = time.monotonic() - started
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-8000:]
    print(f"npx cdk synth with local bundling: {elapsed:.1f} s")
    return out


def test_cdk_synth_from_the_checkout(cli_synth: Path) -> None:
    manifest = json.loads((cli_synth / "manifest.json").read_text())
    assert "chipscale" in manifest["artifacts"]
    template = json.loads((cli_synth / "chipscale.template.json").read_text())
    assert "QueueUrl" in template["Outputs"]
    # The template users deploy is held to tests/test_stack.py's network rule too.
    rules = ingress_rules(template)
    assert rules and [r for r in rules if open_to_the_internet(r)] == []


def test_the_cli_is_the_pinned_major_version() -> None:
    cdk = ensure_cli()
    result = subprocess.run([str(cdk), "--version"], capture_output=True, text=True, check=True)
    assert result.stdout.startswith("2."), result.stdout
    lock = json.loads((REPO_ROOT / "package-lock.json").read_text())
    assert lock["packages"]["node_modules/aws-cdk"]["version"].startswith("2.")


def test_the_lambda_bundle(cli_synth: Path) -> None:
    bundles = [p for p in cli_synth.glob("asset.*") if (p / "chipscale").is_dir()]
    assert len(bundles) == 1, bundles
    bundle = bundles[0]
    size = bundle_size(bundle)
    print(f"Lambda bundle: {size / 1e6:.1f} MB unzipped")
    assert size < HEADROOM_BYTES
    top = {p.name for p in bundle.iterdir()}
    assert "torch" not in top and "aws_cdk" not in top
    assert "psycopg_binary" in top and "psycopg" in top
    assert {"rasterio", "numpy", "aws_lambda_powertools", "mercantile", "shapely"} <= top
    for handler in (REPO_ROOT / "lambdas").glob("*.py"):
        assert handler.name in top, handler.name
    wheels = [p for p in bundle.glob("rasterio/*.so")] + list(bundle.glob("rasterio/*.cpython*"))
    assert wheels and all(
        "cpython-312-x86_64-linux-gnu" in p.name for p in wheels if ".so" in p.name
    )
