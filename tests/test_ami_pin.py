"""The GPU hosts' AMI does not change behind a deploy (issue 16, item 6).

CloudFormation re-resolved the DLAMI's SSM parameter at every deploy, so a new AMI release made
a new launch template version and the rolling update replaced running hosts. Now the image is
either a pinned ``amiId`` or ``resolve:ssm:`` in the launch template, which EC2 reads at each
launch: synthesizing twice with nothing changed gives the same ImageId, and no template
parameter can move it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from test_stack import one

from stacks.config import REPO_ROOT, load_cdk_json_context
from stacks.stack import create_app

PINNED = "ami-0123456789abcdef0"


def synth(outdir: Path, **overrides: Any) -> tuple[dict[str, Any], list[str]]:
    """The template and the stack's warnings, as ``cdk synth`` would make them (no bundling)."""
    context = load_cdk_json_context(REPO_ROOT / "cdk.json") | overrides
    context["aws:cdk:bundling-stacks"] = []
    assembly = create_app(context, outdir=str(outdir)).synth()
    (stack,) = assembly.stacks
    warnings = [str(m.entry.data) for m in stack.messages if m.level.value == "WARNING"]
    return json.loads(Path(stack.template_full_path).read_text()), warnings


@pytest.fixture(scope="module")
def synths(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[dict[str, Any], list[str]]]:
    return {
        "default": synth(tmp_path_factory.mktemp("a")),
        "again": synth(tmp_path_factory.mktemp("b")),
        "pinned": synth(tmp_path_factory.mktemp("c"), amiId=PINNED),
    }


def image_id(template: dict[str, Any]) -> Any:
    (_, lt) = one(template, "AWS::EC2::LaunchTemplate")
    return lt["Properties"]["LaunchTemplateData"]["ImageId"]


def image_parameters(template: dict[str, Any]) -> list[str]:
    params = template.get("Parameters", {}).items()
    return [k for k, p in params if p["Type"].endswith("<AWS::EC2::Image::Id>")]


def test_default_resolves_at_launch_not_at_deploy(synths: dict[str, Any]) -> None:
    template, warnings = synths["default"]
    assert image_parameters(template) == []  # nothing CloudFormation re-reads at deploy
    assert image_id(template) == (
        "resolve:ssm:/aws/service/deeplearning/ami/x86_64/"
        "base-oss-nvidia-driver-gpu-amazon-linux-2023/latest/ami-id"
    )
    assert image_id(template) == image_id(synths["again"][0])  # nothing changed: same image
    (warning,) = [w for w in warnings if "amiId is empty" in w]
    assert "aws ssm get-parameter --name /aws/service/deeplearning/" in warning


def test_a_pinned_ami_is_the_image_and_silences_the_warning(synths: dict[str, Any]) -> None:
    template, warnings = synths["pinned"]
    assert image_parameters(template) == []
    assert image_id(template) == PINNED
    assert not [w for w in warnings if "amiId" in w]


def test_the_ami_id_is_validated() -> None:
    from stacks.config import ConfigError, DeploymentConfig

    with pytest.raises(ConfigError, match="amiId: empty or an AMI id"):
        DeploymentConfig.from_context({"amiId": "ami-XYZ"}.get)
