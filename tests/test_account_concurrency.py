"""Issue 16, item 7: Lambda concurrency above the account's limit must not push messages to
the dead-letter queue.

The fleet controller reads ``GetAccountSettings`` and, with no concurrency reserved, caps
MaximumConcurrency at the account's unreserved executions less a margin; the default
``maxReceiveCount`` is AWS's advised 5; synth warns when the planned concurrency exceeds a new
account's 10. The controller runs against moto with one recorded answer: moto 5.2 does not
implement GetAccountSettings (404 "Not yet implemented"), so that call alone is answered from
a recorded response (tests/lambda_account.py), checked against botocore's service model.
"""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st
from lambda_account import RecordedAccount
from test_fleet import GPUS_PER_INSTANCE, PER_GPU_DEFAULT, Fleet, fleet  # noqa: F401
from test_launch_alarms import synth_warnings
from test_stack import as_list, of_type, statements, synth

from chipscale.ops.fleet import (
    MIN_MAXIMUM_CONCURRENCY,
    DesiredMapping,
    account_ceiling,
    desired_mapping,
)
from stacks.config import REPO_ROOT, DeploymentConfig, load_cdk_json_context
from stacks.fleet_controller_function import NEW_ACCOUNT_CONCURRENCY, concurrency_warnings

# ------------------------------------------------------------------------------- the rule


@pytest.mark.parametrize(
    ("gpus", "per_gpu", "unreserved", "expected"),
    [
        (3, 8, 10, 8),  # a new account: 10 less 2 for the other functions
        (1, 4, 10, 4),  # under the ceiling: per GPU x GPUs
        (3, 8, 1000, 24),  # an established account: no effect
        (200, 8, 1000, 990),  # 1000 less 10
        (1, 8, 3, MIN_MAXIMUM_CONCURRENCY),  # AWS's floor for an SQS event source
    ],
)
def test_unreserved_account_concurrency_caps_the_mapping(
    gpus: int, per_gpu: int, unreserved: int, expected: int
) -> None:
    assert desired_mapping(gpus, per_gpu, None, unreserved) == DesiredMapping(True, expected)


def test_a_reservation_is_the_ceiling_whatever_the_account() -> None:
    """Reserved executions are the worker's own, out of the unreserved pool."""
    assert desired_mapping(4, 8, 20, account_unreserved=5).maximum_concurrency == 20


@given(
    gpus=st.integers(1, 500),
    per_gpu=st.integers(1, 100),
    unreserved=st.integers(MIN_MAXIMUM_CONCURRENCY + 2, 20_000),
)
def test_enabled_concurrency_leaves_the_margin_free(
    gpus: int, per_gpu: int, unreserved: int
) -> None:
    concurrency = desired_mapping(gpus, per_gpu, None, unreserved).maximum_concurrency
    assert concurrency is not None
    assert concurrency <= max(MIN_MAXIMUM_CONCURRENCY, account_ceiling(unreserved))
    assert unreserved - account_ceiling(unreserved) in range(2, 11)


# ------------------------------------------------------------------------------- moto


def test_new_account_caps_the_mapping_and_says_what_to_request(fleet: Fleet) -> None:  # noqa: F811
    fleet.account.total = fleet.account.unreserved = 10
    fleet.scale(3)
    result = fleet.sync()
    wanted = 3 * GPUS_PER_INSTANCE * PER_GPU_DEFAULT  # 96
    assert result.account_unreserved == 10
    assert fleet.mapping() == ("Enabled", 8)
    (warning,) = [w for w in result.warnings if "unreserved concurrency" in w]
    assert f"caps the worker at 8 of the {wanted}" in warning
    assert "L-B99A9384" in warning

    # The quota increase lands: the next tick raises the mapping, no deploy needed.
    fleet.account.total = fleet.account.unreserved = 1000
    result = fleet.sync()
    assert result.changes == {"ScalingConfig": {"MaximumConcurrency": wanted}}
    assert fleet.mapping() == ("Enabled", wanted)
    assert not [w for w in result.warnings if "unreserved concurrency" in w]


def test_reserved_worker_skips_the_account_read(fleet: Fleet) -> None:  # noqa: F811
    fleet.account.total = fleet.account.unreserved = 10  # would cap at 8 if it were read
    fleet.scale(1)
    result = fleet.sync(reserved=20)
    assert fleet.account.calls == 0 and result.account_unreserved is None
    assert fleet.mapping() == ("Enabled", 20)


def test_unreadable_account_settings_warn_and_leave_the_fleet_rule(fleet: Fleet) -> None:  # noqa: F811
    """A role without lambda:GetAccountSettings: the mapping still follows the GPUs."""
    fleet.account.error = "AccessDeniedException"
    fleet.scale(1)
    result = fleet.sync()
    assert fleet.account.calls == 1 and result.account_unreserved is None
    assert fleet.mapping() == ("Enabled", GPUS_PER_INSTANCE * PER_GPU_DEFAULT)
    (warning,) = [w for w in result.warnings if "GetAccountSettings" in w]
    assert "AccessDeniedException" in warning


def test_moto_lacks_get_account_settings(moto_server: str) -> None:
    """Why the answer is recorded: moto 404s the call (if it learns it, drop the recording)."""
    import boto3
    from botocore.exceptions import ClientError

    client = boto3.client("lambda", endpoint_url=moto_server, region_name="us-east-1")
    with pytest.raises(ClientError, match=r"\(404\)"):  # "Not yet implemented" in-process
        client.get_account_settings()
    assert RecordedAccount().install(client).calls == 0


# ------------------------------------------------------------------------------- the stack


def test_default_max_receive_count_is_aws_advice() -> None:
    context = load_cdk_json_context(REPO_ROOT / "cdk.json")
    assert context["maxReceiveCount"] >= 5
    assert DeploymentConfig().max_receive_count >= 5


@pytest.fixture(scope="module")
def big_fleet(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[str, Any], list[str]]:
    """4 g5.xlarge at 4 per GPU (pinned: the default follows the feed model): 16 Lambdas
    planned, above a new account's 10; someone subscribed to the alarms."""
    outdir = tmp_path_factory.mktemp("cdk.out")
    template, _ = synth(
        outdir, maxInstances="4", perGpuConcurrency="4", alarmEmail="ops@example.com"
    )
    return template, synth_warnings(outdir)


def test_synth_warns_when_planned_concurrency_exceeds_a_new_account(
    big_fleet: tuple[dict[str, Any], list[str]],
) -> None:
    _, warnings = big_fleet
    (warning,) = [w for w in warnings if "concurrent executions" in w]
    assert "may run 16 Lambdas at once" in warning
    assert f"above the {NEW_ACCOUNT_CONCURRENCY}" in warning
    assert "L-B99A9384) of at least 26" in warning  # 16 + verify's headroom of 10
    assert not [w for w in warnings if "alarmEmail is empty" in w]


def test_stack_wiring(big_fleet: tuple[dict[str, Any], list[str]]) -> None:
    raw, _ = big_fleet
    (queue,) = [
        q["Properties"]
        for q in of_type(raw, "AWS::SQS::Queue").values()
        if "RedrivePolicy" in q["Properties"]
    ]
    assert queue["RedrivePolicy"]["maxReceiveCount"] == 5
    controller = statements(raw, "FleetController")
    (account,) = [s for s in controller if "lambda:GetAccountSettings" in as_list(s["Action"])]
    assert account["Resource"] == "*"  # no resource-level permission exists for it
    (subscription,) = of_type(raw, "AWS::SNS::Subscription").values()
    assert subscription["Properties"]["Endpoint"] == "ops@example.com"


def test_reserved_concurrency_warns_that_a_new_account_cannot_deploy() -> None:
    config = DeploymentConfig(reserved_concurrency=40, max_concurrency=10)
    (warning,) = concurrency_warnings(config)
    assert "at least 140" in warning and "the deploy fails" in warning
    default = DeploymentConfig()
    assert concurrency_warnings(default) == []  # the default fleet fits a new account
    assert default.planned_concurrency == default.per_gpu_concurrency * default.max_instances
    assert default.planned_concurrency <= NEW_ACCOUNT_CONCURRENCY
