"""Promises about how chipscale is split and installed."""

from __future__ import annotations

import os
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())


def _names(requirements: list[str]) -> set[str]:
    return {
        r.split("[")[0].split("=")[0].split("<")[0].split(">")[0].strip().lower()
        for r in requirements
    }


def test_the_lambda_bundle_carries_no_torch_and_no_cdk() -> None:
    project = PYPROJECT["project"]
    bundle = _names(project["dependencies"]) | _names(project["optional-dependencies"]["worker"])
    assert not bundle & {"torch", "torchserve", "aws-cdk-lib", "matplotlib"}
    assert {"rasterio", "numpy", "mercantile", "psycopg", "aws-lambda-powertools"} <= bundle


def test_worker_imports_without_torch_or_matplotlib() -> None:
    code = (
        "import sys, chipscale.pipeline.process, chipscale.pipeline.messages, chipscale.cli, "
        "chipscale.pipeline.runner; "
        "bad = {'torch', 'matplotlib'} & set(sys.modules); assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)


@pytest.mark.parametrize(
    "script", ["download", "convert-geojson", "sqs-push", "verify", "redrive", "gpu-monitor"]
)
def test_operator_scripts_are_executable_entries_into_the_cli(script: str) -> None:
    path = ROOT / "scripts" / script
    assert os.access(path, os.X_OK)
    result = subprocess.run([str(path), "--help"], capture_output=True, text=True)
    assert result.returncode == 0 and "Usage:" in result.stdout


def test_console_script_is_installed() -> None:
    exe = Path(sys.executable).parent / "chipscale"
    result = subprocess.run([str(exe), "--help"], capture_output=True, text=True)
    assert result.returncode == 0
    commands = ("run", "cover", "tile", "download", "convert-geojson", "status", "model", "push")
    for command in (*commands, "db-setup", "redrive", "verify", "serve"):
        assert command in result.stdout
