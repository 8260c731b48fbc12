"""The model archive at deploy: the upload's /tmp sized from the archive, hosts only after it,
and the hosts' permission to tell a missing archive (404) from a forbidden one (403).

One synth for the module, with a large sparse archive (no disk blocks, real size); the cap is
checked by an app that stops while it is built.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from test_stack import as_list, one, statements, synth

from stacks.config import ConfigError, load_cdk_json_context
from stacks.stack import create_app, upload_storage_mib

MIB = 1 << 20
ARCHIVE_MIB = 300  # 2 x 300 + 256 = 856 MiB of /tmp, above Lambda's default 512


def sparse_archive(folder: Path, mib: int) -> Path:
    archive = folder / "big-model.mar"
    with archive.open("wb") as stream:
        stream.truncate(mib * MIB)
    return archive


@pytest.fixture(scope="module")
def raw(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    archive = sparse_archive(tmp_path_factory.mktemp("model"), ARCHIVE_MIB)
    outdir = tmp_path_factory.mktemp("cdk.out.archive")
    template, _ = synth(outdir, modelArchive=str(archive))
    yield template


def upload_function(raw: dict[str, Any]) -> dict[str, Any]:
    (custom_key, custom) = one(raw, "Custom::CDKBucketDeployment")
    token = custom["Properties"]["ServiceToken"]["Fn::GetAtt"][0]
    function: dict[str, Any] = raw["Resources"][token]
    assert function["Type"] == "AWS::Lambda::Function", custom_key
    return function


def test_upload_storage_is_sized_from_the_archive(raw: dict[str, Any]) -> None:
    props = upload_function(raw)["Properties"]
    assert props["EphemeralStorage"] == {"Size": 2 * ARCHIVE_MIB + 256}
    assert props["MemorySize"] == 1024  # zip and S3 stream: memory does not grow with it


def test_upload_storage_bounds() -> None:
    assert upload_storage_mib(100) == 512  # a small archive keeps Lambda's default
    assert upload_storage_mib(128 * MIB) == 512
    assert upload_storage_mib(129 * MIB) == 514
    assert upload_storage_mib(4992 * MIB) == 10240  # the largest archive the upload takes


def test_an_archive_too_large_for_lambda_stops_synth(tmp_path: Path) -> None:
    archive = sparse_archive(tmp_path, 4993)
    context = load_cdk_json_context(Path(__file__).resolve().parents[1] / "cdk.json")
    context.update({"modelArchive": str(archive), "aws:cdk:bundling-stacks": []})
    with pytest.raises(ConfigError, match=r"modelArchive: .*10,242 MiB.*10,240 MiB") as caught:
        create_app(context, outdir=str(tmp_path / "cdk.out"))
    assert "upload it yourself" in str(caught.value)
    assert not list(tmp_path.glob("cdk.out/asset.*"))  # it stopped before staging anything


def test_no_host_boots_before_its_archive_is_uploaded(raw: dict[str, Any]) -> None:
    """The launch template (hence the group and every host) waits for the upload, on create
    and on every update that brings a new archive."""
    (upload, _) = one(raw, "Custom::CDKBucketDeployment")
    (_, template) = one(raw, "AWS::EC2::LaunchTemplate")
    assert upload in as_list(template.get("DependsOn", []))
    (_, group) = one(raw, "AWS::AutoScaling::AutoScalingGroup")
    assert "LaunchTemplate" in str(group["Properties"]["LaunchTemplate"])


def test_hosts_may_list_the_model_prefix_only(raw: dict[str, Any]) -> None:
    """With s3:ListBucket a missing archive answers 404 (403 without): only under models/."""
    lists = [s for s in statements(raw, "GpuFleetInstanceRole") if s["Action"] == "s3:ListBucket"]
    models = [s for s in lists if "models/*" in as_list(s["Condition"]["StringLike"]["s3:prefix"])]
    assert len(models) == 1, lists
    (resource,) = as_list(models[0]["Resource"])
    assert "StorageModels" in str(resource) and "/" not in str(resource)
    assert all(
        p.endswith("/*") for s in lists for p in as_list(s["Condition"]["StringLike"]["s3:prefix"])
    )
