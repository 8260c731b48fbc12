"""Launch alarms: the GPU group's failed launches and abandoned boots, mailed as they happen.

Two EventBridge rules on the group's "EC2 Instance Launch Unsuccessful" events publish to the
alarm topic with the event's own reason: EC2 refused the instance (the G and VT vCPU quota,
capacity, the launch template), or the launch lifecycle action was abandoned (the boot script
gave up, or the hook timed out). Auto Scaling reports an abandoned launch as an unsuccessful
launch, status ``Cancelled``, whose message names the lifecycle action; a refused one as
``Failed``. Should an abandoned launch ever come as ``Failed``, both rules match: two mails,
never none. Why and what to do: docs/deploy.md, "Alarms about the account".
"""

from __future__ import annotations

from typing import Any

from aws_cdk import aws_events as events
from aws_cdk import aws_events_targets as targets
from aws_cdk import aws_sns as sns
from constructs import Construct

LAUNCH_UNSUCCESSFUL = "EC2 Instance Launch Unsuccessful"

#: What Auto Scaling's status message holds when a launch lifecycle action was abandoned.
ABANDONED_MESSAGE = "*Lifecycle Action*"


def add_launch_alarms(
    scope: Construct, *, topic: sns.ITopic, asg_name: str, stack_name: str
) -> dict[str, events.Rule]:
    """The two rules, by construct id (``LaunchRefused``, ``BootAbandoned``)."""
    status = events.EventField.from_path("$.detail.StatusMessage")
    instance = events.EventField.from_path("$.detail.EC2InstanceId")
    group = events.EventField.from_path("$.detail.AutoScalingGroupName")
    plans: dict[str, tuple[dict[str, Any], str, str]] = {
        "LaunchRefused": (
            {"StatusCode": events.Match.anything_but("Cancelled")},
            "chipscale GPU launch refused by EC2 (quota, capacity or launch template)",
            f"chipscale {stack_name}: EC2 refused a GPU host for {group}: {status} "
            f"Messages wait in the queue until a host launches. A quota of 0 is usual on a new "
            f"account: `chipscale verify --stack {stack_name}` names the G and VT vCPU quota "
            "and the number to request.",
        ),
        "BootAbandoned": (
            {"StatusMessage": events.Match.wildcard(ABANDONED_MESSAGE)},
            "chipscale GPU host boot abandoned (lifecycle action)",
            f"chipscale {stack_name}: GPU host {instance} of {group} was abandoned before it "
            f"served: {status} The boot log of that instance is in the host log group; Auto "
            "Scaling launches another, which will fail the same way until the cause is fixed.",
        ),
    }
    rules = {}
    for construct_id, (status_match, description, text) in plans.items():
        rules[construct_id] = events.Rule(
            scope,
            construct_id,
            description=description,
            event_pattern=events.EventPattern(
                source=["aws.autoscaling"],
                detail_type=[LAUNCH_UNSUCCESSFUL],
                detail={"AutoScalingGroupName": [asg_name], **status_match},
            ),
            targets=[
                targets.SnsTopic(topic, message=events.RuleTargetInput.from_text(text)),
            ],
        )
    return rules
