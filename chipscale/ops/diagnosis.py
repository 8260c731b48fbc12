"""Which regime a run is in, and what to do about it, from a
:class:`~chipscale.ops.snapshot.Snapshot`: idle, no-gpu, far-above, failing, slightly-above,
below or balanced, with the numbers that decided it.

Pure functions of the snapshot (no AWS call), so every rule is tested on hand-made snapshots
just below and just at each threshold. The table of rules and why each threshold has its
value: docs/design.md (and docs/operations.md for operators).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from enum import StrEnum
from typing import Any

from chipscale.ops.snapshot import Snapshot

SATURATED_GPU_UTIL = 85.0
UNDERUSED_GPU_UTIL = 40.0
FAR_ERROR_RATE = 0.02
FAR_RETRY_RATE = 0.10
DLQ_GROWTH_MESSAGES = 1.0
FAR_TIMEOUT_FRACTION = 0.80
SLIGHT_P95_P50_RATIO = 2.0
WAITING_MESSAGES = 1
AT_CAP_FRACTION = 0.90

#: The thresholds by name, for the JSON output and the docs.
THRESHOLD_NAMES = (
    "SATURATED_GPU_UTIL",
    "UNDERUSED_GPU_UTIL",
    "FAR_ERROR_RATE",
    "FAR_RETRY_RATE",
    "DLQ_GROWTH_MESSAGES",
    "FAR_TIMEOUT_FRACTION",
    "SLIGHT_P95_P50_RATIO",
    "WAITING_MESSAGES",
    "AT_CAP_FRACTION",
)


def thresholds() -> dict[str, float]:
    """The thresholds in force (read at call time, so a test may change one)."""
    return {name: globals()[name] for name in THRESHOLD_NAMES}


class Regime(StrEnum):
    """The situations a run can be in (the values are what ``--json`` prints)."""

    FAR_ABOVE = "far-above"
    SLIGHTLY_ABOVE = "slightly-above"
    BELOW = "below"
    BALANCED = "balanced"
    IDLE = "idle"
    NO_GPU = "no-gpu"
    FAILING = "failing"


TITLES = {
    Regime.FAR_ABOVE: "Lambda concurrency far above GPU capacity",
    Regime.SLIGHTLY_ABOVE: "Lambda concurrency slightly above GPU capacity",
    Regime.BELOW: "Lambda concurrency below GPU capacity",
    Regime.BALANCED: "balanced",
    Regime.IDLE: "idle: the queue is empty",
    Regime.NO_GPU: "no GPU in service",
    Regime.FAILING: "failing, not from GPU overload",
}


@dataclass(frozen=True, slots=True)
class Signals:
    """The figures the rules compare with the thresholds (None: not measured)."""

    gpu_utilization: float | None
    #: None when the fleet could not be read (then never "no GPU in service").
    gpus_in_service: int | None
    visible: int | None
    backlog: int | None
    oldest_age_s: float | None
    invocations: float
    error_rate: float | None
    retry_rate: float | None
    dlq_growth: float | None
    p95_s: float | None
    p50_s: float | None
    timeout_s: float | None
    p95_timeout_fraction: float | None
    p95_p50_ratio: float | None
    concurrency_max: float | None
    maximum_concurrency: int | None
    throttles: float

    @property
    def saturated(self) -> bool | None:
        if self.gpu_utilization is None:
            return None
        return self.gpu_utilization >= SATURATED_GPU_UTIL

    @property
    def at_cap(self) -> bool | None:
        if self.concurrency_max is None or not self.maximum_concurrency:
            return None
        return self.concurrency_max >= AT_CAP_FRACTION * self.maximum_concurrency


def signals(snapshot: Snapshot) -> Signals:
    """The rules' inputs, derived from the snapshot."""
    worker, queue = snapshot.worker, snapshot.queue
    error_rate = worker.errors / worker.invocations if worker.invocations > 0 else None
    retry_rate = None
    if queue.received and queue.deleted is not None:
        retry_rate = max(0.0, queue.received - queue.deleted) / queue.received
    p95 = worker.duration_p95_ms / 1000 if worker.duration_p95_ms is not None else None
    p50 = worker.duration_p50_ms / 1000 if worker.duration_p50_ms is not None else None
    timeout = float(worker.timeout_s) if worker.timeout_s else None
    return Signals(
        gpu_utilization=snapshot.gpu_utilization,
        gpus_in_service=snapshot.fleet.gpus_in_service if snapshot.fleet.known else None,
        visible=queue.visible,
        backlog=queue.backlog,
        oldest_age_s=queue.oldest_age_s,
        invocations=worker.invocations,
        error_rate=error_rate,
        retry_rate=retry_rate,
        dlq_growth=queue.dlq_growth,
        p95_s=p95,
        p50_s=p50,
        timeout_s=timeout,
        p95_timeout_fraction=p95 / timeout if p95 is not None and timeout else None,
        p95_p50_ratio=p95 / p50 if p95 is not None and p50 else None,
        concurrency_max=worker.concurrency_max,
        maximum_concurrency=worker.maximum_concurrency,
        throttles=worker.throttles,
    )


@dataclass(frozen=True, slots=True)
class Diagnosis:
    """The regime, why (the numbers against their thresholds), and what to do."""

    regime: Regime
    title: str
    reason: str
    action: str
    signals: Signals
    notes: tuple[str, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["regime"] = str(self.regime)
        data["signals"] = {
            k: (None if isinstance(v, float) and not math.isfinite(v) else v)
            for k, v in asdict(self.signals).items()
        }
        data["thresholds"] = thresholds()
        return data


def overload_reasons(s: Signals) -> list[str]:
    """The far-above signs present, each with its number and threshold."""
    reasons = []
    if s.error_rate is not None and s.error_rate >= FAR_ERROR_RATE:
        reasons.append(
            f"invocation errors {s.error_rate:.1%} of {s.invocations:,.0f} "
            f"(>= {FAR_ERROR_RATE:.0%})"
        )
    if s.retry_rate is not None and s.retry_rate >= FAR_RETRY_RATE:
        reasons.append(
            f"{s.retry_rate:.1%} of received messages went back to the queue "
            f"(>= {FAR_RETRY_RATE:.0%})"
        )
    if s.dlq_growth is not None and s.dlq_growth >= DLQ_GROWTH_MESSAGES:
        reasons.append(f"dead-letter queue +{s.dlq_growth:,.0f} messages")
    if s.p95_timeout_fraction is not None and s.p95_timeout_fraction >= FAR_TIMEOUT_FRACTION:
        reasons.append(
            f"p95 duration {s.p95_s:.1f} s is {s.p95_timeout_fraction:.0%} of the "
            f"{s.timeout_s:.0f} s timeout (>= {FAR_TIMEOUT_FRACTION:.0%})"
        )
    return reasons


def diagnose(snapshot: Snapshot) -> Diagnosis:
    """The regime of ``snapshot`` by the rules of docs/design.md's table, first match wins."""
    s = signals(snapshot)
    notes = _notes(snapshot, s)
    util = _util(s)
    stack = snapshot.stack
    per_gpu = snapshot.worker.per_gpu_concurrency

    def result(regime: Regime, reason: str, action: str) -> Diagnosis:
        return Diagnosis(regime, TITLES[regime], reason, action, s, tuple(notes))

    if s.backlog == 0:
        busy = f"; {s.gpus_in_service} GPUs in service" if s.gpus_in_service else ""
        return result(
            Regime.IDLE,
            f"no message visible or in flight{busy}",
            "nothing to do: the fleet scales in on its own",
        )
    if s.gpus_in_service == 0:
        return result(Regime.NO_GPU, _waiting(s), _no_gpu_action(snapshot))
    reasons = overload_reasons(s)
    if reasons:
        if s.saturated is False:
            return result(
                Regime.FAILING,
                f"{'; '.join(reasons)}, while the GPUs are at {util} (< {SATURATED_GPU_UTIL:g}%)",
                "find the cause before tuning: the worker's log group, one dead letter "
                "(`aws sqs receive-message` on the dead-letter queue); more or fewer Lambdas "
                "will not cure it",
            )
        return result(
            Regime.FAR_ABOVE,
            f"{'; '.join(reasons)}; GPUs at {util} (>= {SATURATED_GPU_UTIL:g}%)",
            f"lower the per-GPU concurrency{_now(per_gpu, snapshot)}: "
            f"`chipscale tune --stack {stack} --apply` computes it from the measured "
            f"throughput; or add GPUs{_max_instances(snapshot)}",
        )
    if s.saturated and s.p95_p50_ratio is not None and s.p95_p50_ratio >= SLIGHT_P95_P50_RATIO:
        return result(
            Regime.SLIGHTLY_ABOVE,
            f"GPUs at {util} (>= {SATURATED_GPU_UTIL:g}%) and p95 duration {s.p95_s:.1f} s = "
            f"{s.p95_p50_ratio:.1f} x p50 {s.p50_s:.1f} s (>= {SLIGHT_P95_P50_RATIO:g} x): "
            "Lambdas wait for a GPU; no errors, no dead letters",
            f"lower the per-GPU concurrency a step{_now(per_gpu, snapshot)}, "
            f"e.g. `chipscale tune --stack {stack} --apply`: the waiting Lambdas are billed; "
            "to go faster, add GPUs",
        )
    if (
        s.gpu_utilization is not None
        and s.gpu_utilization < UNDERUSED_GPU_UTIL
        and s.visible is not None
        and s.visible >= WAITING_MESSAGES
    ):
        return result(
            Regime.BELOW,
            f"GPUs at {util} (< {UNDERUSED_GPU_UTIL:g}%) while {_waiting(s)}",
            _below_action(snapshot, s),
        )
    reason = f"GPUs at {util}"
    if s.p95_p50_ratio is not None:
        reason += f", p95/p50 duration {s.p95_p50_ratio:.1f}"
    reason += ", no overload sign"
    return result(Regime.BALANCED, reason, "nothing to change")


def _util(s: Signals) -> str:
    return "unknown utilisation" if s.gpu_utilization is None else f"{s.gpu_utilization:.0f}%"


def _waiting(s: Signals) -> str:
    text = f"{s.visible or 0:,} messages wait"
    if s.oldest_age_s is not None:
        text += f" (oldest {s.oldest_age_s:,.0f} s)"
    return text


def _now(per_gpu: int | None, snapshot: Snapshot) -> str:
    parts = []
    if per_gpu is not None:
        parts.append(f"now {per_gpu}")
    if snapshot.worker.maximum_concurrency is not None:
        parts.append(
            f"MaximumConcurrency {snapshot.worker.maximum_concurrency} for "
            f"{snapshot.fleet.gpus_in_service} GPUs"
        )
    return f" ({', '.join(parts)})" if parts else ""


def _max_instances(snapshot: Snapshot) -> str:
    fleet = snapshot.fleet
    if fleet.max_size is None:
        return ""
    return f" (maxInstances now {fleet.max_size}, {len(fleet.instances)} running)"


def _no_gpu_action(snapshot: Snapshot) -> str:
    fleet = snapshot.fleet
    if fleet.pending:
        return (
            f"wait: {fleet.pending} instances are booting (held in Pending:Wait until "
            "TorchServe's workers are READY); the fleet controller then enables the Lambdas"
        )
    if fleet.desired == 0:
        return (
            "the group wants 0 instances: check its scaling on the queue's backlog "
            "(`aws autoscaling describe-policies`), or set its desired capacity"
        )
    return (
        f"the group wants {fleet.desired} instances but none is in service: see its "
        "activity (`aws autoscaling describe-scaling-activity`) and the hosts' boot log"
    )


def _below_action(snapshot: Snapshot, s: Signals) -> str:
    worker, fleet = snapshot.worker, snapshot.fleet
    stack = snapshot.stack
    if s.at_cap is False:
        return (
            f"the Lambdas run below their cap ({s.concurrency_max:.0f} of MaximumConcurrency "
            f"{s.maximum_concurrency}, < {AT_CAP_FRACTION:.0%}): there are more GPUs than the "
            f"work brought to them: remove GPUs (maxInstances, now {fleet.max_size}), or "
            "give the event source a few minutes to ramp up (+300 Lambdas a minute)"
        )
    if (
        worker.reserved_concurrency is not None
        and worker.maximum_concurrency is not None
        and worker.maximum_concurrency >= worker.reserved_concurrency
    ):
        return (
            f"MaximumConcurrency is held at the worker's reserved concurrency "
            f"({worker.reserved_concurrency}): raise reservedConcurrency, or remove GPUs"
        )
    cap = (
        f"{s.concurrency_max:.0f} Lambdas at MaximumConcurrency {s.maximum_concurrency}"
        if s.at_cap
        else "Lambdas at their cap"
    )
    suggestion = ""
    if worker.per_gpu_concurrency and s.gpu_utilization:
        target = math.ceil(worker.per_gpu_concurrency * SATURATED_GPU_UTIL / s.gpu_utilization)
        suggestion = (
            f"; utilisation grows about in proportion, so try {target}: "
            f"`chipscale tune --stack {stack} --per-gpu {target} --apply`"
        )
    return f"raise the per-GPU concurrency (now {worker.per_gpu_concurrency}; {cap}){suggestion}"


def _notes(snapshot: Snapshot, s: Signals) -> list[str]:
    notes = []
    if s.gpu_utilization is None and s.gpus_in_service:
        notes.append(
            "no GPU utilisation reported (CloudWatch agent, TorchServe metrics): "
            "saturation unknown, taken as saturated for the overload rule"
        )
    if s.p95_p50_ratio is None and snapshot.worker.invocations > 0:
        notes.append("no duration percentiles: the slightly-above rule was not checked")
    if s.throttles > 0:
        reserved = snapshot.worker.reserved_concurrency
        notes.append(
            f"{s.throttles:,.0f} throttles: the event source asks more than the function may "
            f"run (reserved concurrency {reserved}, or the account's limit); each throttled "
            "batch goes back to the queue with a receive spent"
        )
    state = snapshot.worker.mapping_state
    if state == "Disabled" and s.gpus_in_service:
        notes.append(
            f"the event source mapping is Disabled while {s.gpus_in_service} GPUs are in "
            "service: is the fleet controller running?"
        )
    if state == "Enabled" and s.gpus_in_service == 0 and snapshot.fleet.asg_name:
        notes.append(
            "the event source mapping is Enabled with no GPU in service: messages fail into "
            "the dead-letter queue (is the fleet controller running?)"
        )
    return notes
