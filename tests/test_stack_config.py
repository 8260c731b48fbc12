"""The typed deployment config: cdk.json's defaults, ``-c`` strings, and clear errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

# stacks/ is not an installed package (the distribution ships chipscale and model_server):
# import it from the checkout whatever pytest's import mode.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from stacks.config import (
    REPO_ROOT,
    ConfigError,
    DeploymentConfig,
    default_context,
    load_cdk_json_context,
)


def config_of(**context: Any) -> DeploymentConfig:
    return DeploymentConfig.from_context(context.get)


def test_cdk_json_holds_every_key_with_its_default() -> None:
    context = load_cdk_json_context(REPO_ROOT / "cdk.json")
    for key, value in default_context().items():
        assert context.get(key) == value, key
    assert config_of(**context) == DeploymentConfig()


def test_cdk_json_keeps_the_cli_offline() -> None:
    settings = json.loads((REPO_ROOT / "cdk.json").read_text())
    assert settings["cli-telemetry"] is False
    assert settings["notices"] is False
    assert settings["versionReporting"] is False


def test_command_line_strings_are_coerced() -> None:
    config = config_of(
        maxInstances="4",
        dbMultiAz="true",
        interfaceEndpoints="no",
        sourceBuckets="a-bucket, b-bucket/prefix",
        instanceType="g6.12xlarge",
    )
    assert config.max_instances == 4
    assert config.db_multi_az is True and config.interface_endpoints is False
    assert config.source_buckets == ("a-bucket", "b-bucket/prefix")
    assert config.gpus_per_instance == 4
    assert config_of(sourceBuckets='["x-bucket"]').source_buckets == ("x-bucket",)


@pytest.mark.parametrize(
    ("instance_type", "gpus"),
    [
        ("g5.xlarge", 1),
        ("g5.12xlarge", 4),
        ("g5.48xlarge", 8),
        ("g6.16xlarge", 1),
        ("g6e.24xlarge", 4),
        ("g4dn.metal", 8),
    ],
)
def test_gpus_per_instance(instance_type: str, gpus: int) -> None:
    assert config_of(instanceType=instance_type).gpus_per_instance == gpus


def test_visibility_timeout_is_six_times_the_lambda_timeout_plus_the_window() -> None:
    config = config_of(lambdaTimeoutSeconds=200, batchingWindowSeconds=5)
    assert config.visibility_timeout_seconds == 6 * 200 + 5


def test_every_bad_key_is_named_in_one_error() -> None:
    with pytest.raises(ConfigError) as failure:
        config_of(
            instanceType="p4d.24xlarge",
            minInstances=3,
            maxInstances=2,
            logRetentionDays=10,
            maxConcurrency=1,
            sourceBuckets=["Bad_Bucket"],
        )
    message = str(failure.value)
    for key in (
        "instanceType",
        "maxInstances",
        "logRetentionDays",
        "maxConcurrency",
        "sourceBuckets",
    ):
        assert f"  - {key}:" in message, key
    assert "p4d.24xlarge" in message  # the error repeats the input


def test_type_errors_name_the_key() -> None:
    with pytest.raises(ConfigError, match=r"maxInstances: expected an integer \(got 'many'\)"):
        config_of(maxInstances="many")
    with pytest.raises(ConfigError, match="dbMultiAz: expected true or false"):
        config_of(dbMultiAz="perhaps")


def test_rules_across_keys() -> None:
    with pytest.raises(ConfigError, match="wheelhousePrefix: required when natGateways is 0"):
        config_of(natGateways=0, wheelhousePrefix="")
    with pytest.raises(ConfigError, match="interfaceEndpoints: must be true"):
        config_of(natGateways=0, wheelhousePrefix="wheels/", interfaceEndpoints=False)
    with pytest.raises(ConfigError, match="batchingWindowSeconds of at least 1"):
        config_of(batchSize=50, batchingWindowSeconds=0)
    with pytest.raises(ConfigError, match="reservedConcurrency"):
        config_of(reservedConcurrency=1, maxConcurrency=5)
    with pytest.raises(ConfigError, match="modelArchive: an existing file"):
        config_of(modelArchive="no/such/model.mar")


def test_reserved_concurrency_must_feed_the_full_fleet() -> None:
    """The controller caps MaximumConcurrency at the reservation, so a reservation below
    per-GPU concurrency x instances x GPUs would starve a full fleet: refused, with why."""
    # 4 per GPU x 2 instances x 4 GPUs (g5.12xlarge) = 32 (4 given: the default is computed)
    with pytest.raises(ConfigError) as failure:
        config_of(reservedConcurrency=20, instanceType="g5.12xlarge", perGpuConcurrency=4)
    message = str(failure.value)
    assert "reservedConcurrency: 20 is below perGpuConcurrency x maxInstances x GPUs per " in (
        message
    )
    assert "g5.12xlarge = 4 x 2 x 4 = 32" in message
    assert "throttled" in message and "Reserve 32 or more" in message
    config = config_of(reservedConcurrency=32, instanceType="g5.12xlarge", perGpuConcurrency=4)
    assert config.reserved_concurrency == 32
    assert config_of(reservedConcurrency=0).reserved_concurrency == 0  # none: no rule


def test_reserved_concurrency_below_the_event_source_minimum_is_refused() -> None:
    with pytest.raises(ConfigError, match="reservedConcurrency: 0 \\(none\\) or at least 2"):
        config_of(reservedConcurrency=1, perGpuConcurrency=1, maxInstances=1, maxConcurrency=2)


def test_app_exits_with_the_message_and_no_traceback() -> None:
    """What ``cdk synth -c instanceType=p4d.24xlarge`` shows: the CLI passes the context
    in CDK_CONTEXT_JSON, app.py prints the config error alone and exits non-zero."""
    env = dict(os.environ, CDK_CONTEXT_JSON=json.dumps({"instanceType": "p4d.24xlarge"}))
    env.setdefault("JSII_SILENCE_WARNING_END_OF_LIFE_NODE_VERSION", "20")
    result = subprocess.run(
        [sys.executable, "app.py"],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 1
    assert "instanceType: a g4dn, g5, g6 or g6e instance type" in result.stderr
    assert "Traceback" not in result.stderr


def test_the_deploy_guide_documents_every_key() -> None:
    guide = (REPO_ROOT / "docs" / "deploy.md").read_text()
    missing = [key for key in default_context() if f"`{key}`" not in guide]
    assert not missing, f"docs/deploy.md does not describe {missing}"


def test_descriptions_exist_for_every_field() -> None:
    from dataclasses import fields

    for f in fields(DeploymentConfig):
        assert len(f.metadata.get("description", "")) > 10, f.name


def test_repo_root_is_the_checkout() -> None:
    assert (REPO_ROOT / "cdk.json").is_file() and Path(__file__).parent.parent == REPO_ROOT


@pytest.mark.parametrize(
    "source", ["bucket/../secret", "bucket/a/%2e%2e/b", "bucket/./x", "bucket/a\\b"]
)
def test_a_source_prefix_the_worker_would_refuse_is_a_config_error(source: str) -> None:
    # The worker refuses such a prefix at cold start: the deploy must not get that far.
    with pytest.raises(ConfigError, match="sourceBuckets"):
        config_of(sourceBuckets=[source])
