"""How a GPU host leaves the fleet without cutting requests in flight: the target group's
deregistration delay and the termination lifecycle hook, both sized from the response timeout.

Auto Scaling deregisters a terminating instance from the target group first (the load balancer
sends it nothing new and waits up to the delay for the requests in flight), then holds it in
Terminating:Wait until the host's drain watcher (``model_server/gpu_host_drain.sh``) completes
the hook. Figures and the order of events: docs/design.md, "Scale-in".
"""

from __future__ import annotations

import re
from pathlib import Path

from stacks.config import REPO_ROOT, DeploymentConfig

#: TorchServe's configuration on the hosts (its ``default_response_timeout``).
TORCHSERVE_CONFIG = REPO_ROOT / "model_server" / "config.properties"
#: Seconds the termination hook keeps beyond the host's drain: reading IMDS, the flush of the
#: drain log and CompleteLifecycleAction's retries.
HOOK_MARGIN_SECONDS = 60
#: Elastic Load Balancing's bounds of ``deregistration_delay.timeout_seconds``.
MAX_DEREGISTRATION_DELAY = 3600


def torchserve_response_timeout(path: Path = TORCHSERVE_CONFIG) -> int:
    """``default_response_timeout`` of TorchServe's config.properties (seconds)."""
    match = re.search(r"^default_response_timeout=(\d+)\s*$", path.read_text(), re.MULTILINE)
    if match is None:
        raise ValueError(f"{path} sets no default_response_timeout")
    return int(match[1])


def response_timeout_seconds(config: DeploymentConfig) -> int:
    """The longest a request to a host can last: the worker Lambda's timeout or TorchServe's
    response timeout, whichever is longer."""
    return max(config.lambda_timeout_seconds, torchserve_response_timeout())


def deregistration_delay_seconds(config: DeploymentConfig) -> int:
    """The target group's drain: at least the response timeout, so a request accepted just
    before deregistration finishes. The load balancer ends it early once nothing is in flight."""
    return min(response_timeout_seconds(config), MAX_DEREGISTRATION_DELAY)


def drain_timeout_seconds(config: DeploymentConfig) -> int:
    """How long the host's watcher waits for open connections on the inference port."""
    return response_timeout_seconds(config)


def termination_hook_timeout_seconds(config: DeploymentConfig) -> int:
    """Heartbeat timeout of the termination hook (default result CONTINUE): the host's drain
    plus a margin, within Auto Scaling's 30-7200 s."""
    return max(30, min(drain_timeout_seconds(config) + HOOK_MARGIN_SECONDS, 7200))
