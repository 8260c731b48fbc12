"""The first deploy of a stack can roll back, and no physical name is shared between stacks.

Two synths serve the module: the default config (a first deploy) and a second stack,
``chipscale-dev``, with deletion protection on (the guide's second step). A protected DB
instance cannot be deleted, so a failed create would end in ROLLBACK_FAILED; a retained
resource that carries a name would make the retry fail on "already exists"; a fixed name
(the RDS Proxy's, once "Proxy") would make a second stack in the account fail.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st
from test_stack import synth

from chipscale.names import db_proxy_name
from stacks.config import REPO_ROOT, DeploymentConfig, load_cdk_json_context

DEV = "chipscale-dev"
REGION = "us-east-1"

#: Top-level ``*Name`` properties that do not name the resource in the account: each is
#: scoped to its parent or is not an identifier at all.
NOT_A_PHYSICAL_NAME = {
    "PolicyName": "an inline policy, named within its role",
    "DBName": "a database inside the instance",
    "TargetGroupName": "an RDS Proxy's target group, always 'default', within its proxy",
    "ServiceName": "the AWS service a VPC endpoint reaches",
    "DisplayName": "an SNS topic's label on its messages",
    "MetricName": "the metric an alarm reads",
}
#: Rollback of a create keeps Retain resources (only RetainExceptOnCreate deletes them), and
#: deleting a non-empty bucket fails the rollback: buckets may be Retain (the model archive
#: and access logs may already be in them), nothing else.
RETAIN_ALLOWED = {"AWS::S3::Bucket"}
SNAPSHOT_TYPES = {"AWS::RDS::DBInstance"}
PROTECTION_KEY = re.compile(r"deletion.?protection|termination.?protection|disableapi", re.I)
REFERENCES = {"Ref", "Fn::GetAtt", "Fn::ImportValue"}


@pytest.fixture(scope="module")
def synths(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[dict[str, Any], Path]]:
    out: dict[str, tuple[dict[str, Any], Path]] = {}
    first = tmp_path_factory.mktemp("first")
    out["chipscale"] = (synth(first)[0], first)
    dev = tmp_path_factory.mktemp("dev")
    out[DEV] = (synth(dev, stackName=DEV, dbDeletionProtection="true")[0], dev)
    return out


@pytest.fixture(scope="module")
def first(synths: dict[str, tuple[dict[str, Any], Path]]) -> dict[str, Any]:
    return synths["chipscale"][0]


@pytest.fixture(scope="module")
def dev(synths: dict[str, tuple[dict[str, Any], Path]]) -> dict[str, Any]:
    return synths[DEV][0]


def _db(template: dict[str, Any]) -> dict[str, Any]:
    (db,) = [r for r in template["Resources"].values() if r["Type"] == "AWS::RDS::DBInstance"]
    return db


def _is_reference(value: Any) -> bool:
    return isinstance(value, dict) and len(value) == 1 and next(iter(value)) in REFERENCES


def physical_names(template: dict[str, Any]) -> dict[str, str]:
    """``logical id/property -> name`` of every name the template gives a resource itself
    (a literal or a join; a Ref to another resource names that one, not this)."""
    names: dict[str, str] = {}
    for logical, resource in template["Resources"].items():
        for key, value in resource.get("Properties", {}).items():
            if not key.endswith("Name") or key in NOT_A_PHYSICAL_NAME or _is_reference(value):
                continue
            names[f"{logical}/{key}"] = value if isinstance(value, str) else json.dumps(value)
    return names


def _protections(value: Any, path: str = "") -> list[str]:
    """Paths of every deletion or termination protection switched on under ``value``."""
    found: list[str] = []
    if isinstance(value, dict):
        key, val = value.get("Key"), value.get("Value")
        if isinstance(key, str) and PROTECTION_KEY.search(key) and str(val).lower() != "false":
            found.append(f"{path}[{key}]")
        for k, v in value.items():
            if PROTECTION_KEY.search(k) and not isinstance(v, dict | list):
                if str(v).lower() != "false":
                    found.append(f"{path}/{k}")
            else:
                found.extend(_protections(v, f"{path}/{k}"))
    elif isinstance(value, list):
        for item in value:
            found.extend(_protections(item, path))
    return found


# ---------------------------------------------------------------------------- item 1: rollback


def test_the_first_deploy_is_not_protected_by_default() -> None:
    context = load_cdk_json_context(REPO_ROOT / "cdk.json")
    assert context["dbDeletionProtection"] is False
    assert DeploymentConfig().db_deletion_protection is False


def test_nothing_in_a_first_deploy_refuses_deletion(first: dict[str, Any]) -> None:
    on = [
        f"{logical}{path}"
        for logical, resource in first["Resources"].items()
        for path in _protections(resource.get("Properties", {}))
    ]
    assert not on, f"a failed first deploy could not roll back past {on}"
    assert _db(first)["Properties"]["DeletionProtection"] is False


def test_deletion_policies_let_a_rollback_finish_and_a_retry_succeed(
    first: dict[str, Any],
) -> None:
    names = physical_names(first)
    for logical, resource in first["Resources"].items():
        policy = resource.get("DeletionPolicy", "Delete")
        kind = resource["Type"]
        if policy == "Retain":
            assert kind in RETAIN_ALLOWED, f"{logical} ({kind}) outlives a failed create"
            named = [k for k in names if k.startswith(f"{logical}/")]
            assert not named, f"{named} would be left behind and clash with the retry"
        elif policy == "Snapshot":
            assert kind in SNAPSHOT_TYPES, f"{logical} ({kind}) cannot take a snapshot"
        else:
            assert policy in {"Delete", "RetainExceptOnCreate"}, (logical, policy)
    # The instance leaves a final snapshot whenever it is deleted, rollback or destroy.
    assert _db(first)["DeletionPolicy"] == "Snapshot"


def test_the_second_step_turns_protection_on(dev: dict[str, Any]) -> None:
    db = _db(dev)
    assert db["Properties"]["DeletionProtection"] is True
    assert db["DeletionPolicy"] == "Snapshot"


def _warnings(outdir: Path) -> list[str]:
    """Synth warnings, from the manifest and the stacks' metadata files beside it."""
    manifest = json.loads((outdir / "manifest.json").read_text())
    found: list[str] = []
    for artifact in manifest["artifacts"].values():
        metadata = dict(artifact.get("metadata", {}))
        if "additionalMetadataFile" in artifact:
            metadata.update(json.loads((outdir / artifact["additionalMetadataFile"]).read_text()))
        found.extend(
            json.dumps(entry["data"])
            for entries in metadata.values()
            for entry in entries
            if entry["type"] == "aws:cdk:warning"
        )
    return found


def test_synth_reminds_to_turn_protection_on_after_the_first_deploy(
    synths: dict[str, tuple[dict[str, Any], Path]],
) -> None:
    assert any("dbDeletionProtection=true" in w for w in _warnings(synths["chipscale"][1]))
    assert not any("dbDeletionProtection" in w for w in _warnings(synths[DEV][1]))


def test_the_guide_writes_the_two_step() -> None:
    guide = (REPO_ROOT / "docs" / "deploy.md").read_text()
    assert "Deletion protection: the two-step" in guide
    assert "-c dbDeletionProtection=true" in guide
    assert "ROLLBACK_FAILED" in guide


# ---------------------------------------------------------------------------- item 2: names


def test_the_proxy_is_named_after_the_stack(first: dict[str, Any], dev: dict[str, Any]) -> None:
    for stack, template in (("chipscale", first), (DEV, dev)):
        (proxy,) = [r for r in template["Resources"].values() if r["Type"] == "AWS::RDS::DBProxy"]
        assert proxy["Properties"]["DBProxyName"] == f"{stack}-proxy"


@pytest.mark.parametrize("stack", ["chipscale", DEV])
def test_every_physical_name_derives_from_the_stack_name(
    stack: str, synths: dict[str, tuple[dict[str, Any], Path]]
) -> None:
    names = physical_names(synths[stack][0])
    assert names, "the template names nothing itself: this test would be vacuous"
    token = re.compile(rf"(^|[\"/-]){re.escape(stack)}([\"/-]|$)")
    foreign = {k: v for k, v in names.items() if not token.search(v)}
    assert not foreign, f"names not derived from the stack name {stack!r}: {foreign}"


def test_two_stacks_share_no_physical_name(first: dict[str, Any], dev: dict[str, Any]) -> None:
    shared = set(physical_names(first).values()) & set(physical_names(dev).values())
    assert not shared, shared


def test_the_dashboard_name_carries_the_region(first: dict[str, Any]) -> None:
    # CloudWatch dashboards are global to the account, not regional.
    (board,) = [r for r in first["Resources"].values() if r["Type"] == "AWS::CloudWatch::Dashboard"]
    assert board["Properties"]["DashboardName"] == f"chipscale-{REGION}"


@given(st.from_regex(r"[A-Za-z][A-Za-z0-9-]{0,100}", fullmatch=True))
def test_every_valid_stack_name_gives_a_valid_proxy_name(stack: str) -> None:
    # RDS: 1-63 characters, a letter first, letters, digits and single hyphens, no final one.
    name = db_proxy_name(stack)
    assert re.fullmatch(r"[a-z](-?[a-z0-9])*", name) and len(name) <= 63, (stack, name)
    assert name.endswith("-proxy")


@given(
    st.lists(
        st.from_regex(r"[A-Za-z][A-Za-z0-9-]{0,100}", fullmatch=True),
        min_size=2,
        max_size=2,
        unique=True,
    )
)
def test_distinct_stack_names_give_distinct_proxy_names(pair: list[str]) -> None:
    # RDS identifiers ignore case: a proxy name folded to lower case must not meet another's.
    assert db_proxy_name(pair[0]) != db_proxy_name(pair[1]), pair
