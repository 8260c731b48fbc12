"""The monitor's view: a stack's snapshot, diagnosis and tune line as rich tables, or as
one JSON document."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from rich.console import Group, RenderableType

    from chipscale.ops.diagnosis import Diagnosis
    from chipscale.ops.snapshot import Snapshot
    from chipscale.ops.tune import Recommendation


def _fmt(value: float | None, spec: str = ",.0f", suffix: str = "") -> str:
    return "-" if value is None else f"{value:{spec}}{suffix}"


def _duration(seconds: float | None) -> str:
    """12 s, 14 min, 3 h 05 min, 2 d 4 h."""
    if seconds is None:
        return "-"
    seconds = max(0.0, seconds)
    if seconds < 90:
        return f"{seconds:.0f} s"
    minutes = seconds / 60
    if minutes < 90:
        return f"{minutes:.0f} min"
    hours, rest = divmod(int(minutes), 60)
    return f"{hours} h {rest:02d} min" if hours < 48 else f"{hours // 24} d {hours % 24} h"


_REGIME_STYLE = {
    "far-above": "bold red",
    "failing": "bold red",
    "slightly-above": "bold yellow",
    "below": "bold yellow",
    "no-gpu": "bold yellow",
    "balanced": "bold green",
    "idle": "bold cyan",
}


def render_monitor(
    snapshot: Snapshot, diagnosis: Diagnosis, recommendation: Recommendation | None = None
) -> Group:
    """The monitor's view as one rich renderable: per-GPU rows, queue, Lambda, TorchServe
    (when read), the diagnosis with its numbers and action, the tune line and warnings."""
    from rich.console import Group
    from rich.panel import Panel
    from rich.table import Table
    from rich.text import Text

    window = snapshot.window
    span = f"{window.start:%H:%M}-{window.end:%H:%M} UTC, {window.seconds / 60:.0f} min"
    fleet = snapshot.fleet
    gpus = Table(
        title=(
            f"GPUs: {fleet.gpus_in_service} in service on {fleet.instances_in_service} of "
            f"{len(fleet.instances)} instances (group {fleet.min_size}-{fleet.max_size}, "
            f"desired {fleet.desired})"
        ),
        title_justify="left",
    )
    for column in ("instance", "gpu", "type", "state", "util %", "last %", "mem %", "mem MiB"):
        gpus.add_column(
            column,
            justify="left" if column in ("instance", "type", "state") else "right",
            no_wrap=True,
        )
    gpus.add_column("source")
    for gpu in snapshot.gpus:
        state = gpu.state or "-"
        if not gpu.in_service:
            state = f"[dim]{state}[/dim]"
        memory = _fmt(gpu.memory_used_mb)
        if gpu.memory_total_mb:
            memory += f" / {gpu.memory_total_mb:,.0f}"
        gpus.add_row(
            gpu.instance_id,
            str(gpu.index),
            gpu.instance_type or "-",
            state,
            _fmt(gpu.utilization, ".0f"),
            _fmt(gpu.utilization_last, ".0f"),
            _fmt(gpu.memory_utilization, ".0f"),
            memory,
            gpu.source or "-",
        )
    queue, worker = snapshot.queue, snapshot.worker
    figures = Table(title="queue and worker Lambda", title_justify="left", show_header=False)
    figures.add_column("queue", style="bold")
    figures.add_column("", justify="right")
    figures.add_column("Lambda", style="bold")
    figures.add_column("", justify="right")
    remaining = _fmt(queue.remaining_tiles)
    if queue.remaining_source:
        remaining += f" ({queue.remaining_source})"
    dlq = _fmt(queue.dlq_depth)
    if queue.dlq_growth:
        dlq += f" ({queue.dlq_growth:+,.0f})"
    limit = _fmt(worker.maximum_concurrency)
    if worker.reserved_concurrency:
        limit += f" (reserved {worker.reserved_concurrency})"
    errors = f"{worker.errors:,.0f} / {worker.throttles:,.0f}"
    p50, p95 = _seconds(worker.duration_p50_ms), _seconds(worker.duration_p95_ms)
    mean = _seconds(worker.duration_mean_ms)
    percentiles = f"{_fmt(p50, '.1f')} / {_fmt(p95, '.1f')} s"
    timing = f"{_fmt(mean, '.1f')} / {_fmt(worker.timeout_s)} s"
    concurrency = f"{_fmt(worker.concurrency_max)} / {_fmt(worker.concurrency_mean)}"
    per_gpu = _fmt(worker.per_gpu_concurrency)
    rows = [
        ("visible", _fmt(queue.visible), "mapping", worker.mapping_state or "-"),
        ("in flight", _fmt(queue.in_flight), "MaximumConcurrency", limit),
        ("oldest message", _duration(queue.oldest_age_s), "per-GPU", per_gpu),
        ("dead letters", dlq, "concurrency max / mean", concurrency),
        ("tiles/s", _fmt(queue.tiles_per_s, ",.1f"), "invocations", _fmt(worker.invocations)),
        ("tiles/message", _fmt(queue.tiles_per_message, ",.1f"), "errors / throttles", errors),
        ("remaining tiles", remaining, "duration p50 / p95", percentiles),
        ("ETA", _duration(queue.eta_s), "duration mean / timeout", timing),
    ]
    for row in rows:
        figures.add_row(*row)
    parts: list[RenderableType] = [
        Text(f"chipscale monitor: stack {snapshot.stack} ({snapshot.region}), {span}"),
        gpus,
        figures,
    ]
    if snapshot.torchserve:
        served = Table(title="TorchServe (Prometheus)", title_justify="left")
        for column in (
            "target",
            "instance",
            "requests",
            "inference ms",
            "queue ms",
            "5xx",
            "error",
        ):
            served.add_column(column)
        for m in snapshot.torchserve:
            served.add_row(
                m.target,
                m.instance_id or "-",
                _fmt(m.requests),
                _fmt(m.mean_inference_ms, ",.1f"),
                _fmt(m.mean_queue_ms, ",.1f"),
                _fmt(m.responses.get("5xx")),
                m.error or "",
            )
        parts.append(served)
    regime = str(diagnosis.regime)
    body = Text()
    body.append(f"{diagnosis.title}\n", style=_REGIME_STYLE.get(regime, "bold"))
    body.append(f"why:    {diagnosis.reason}\n")
    body.append(f"action: {diagnosis.action}")
    for note in diagnosis.notes:
        body.append(f"\nnote:   {note}", style="dim")
    if recommendation is not None:
        target = recommendation.target
        body.append(
            f"\ntune:   per-GPU {target.per_gpu} (now {target.current_per_gpu}), "
            f"MaximumConcurrency {_fmt(target.maximum_concurrency)} "
            f"(now {_fmt(target.current_maximum_concurrency)})"
        )
    parts.append(Panel(body, title=f"diagnosis: {regime}", title_align="left"))
    for warning in snapshot.warnings:
        parts.append(Text(f"warning: {warning}", style="yellow"))
    return Group(*parts)


def _seconds(ms: float | None) -> float | None:
    return None if ms is None else ms / 1000


def monitor_document(
    snapshot: Snapshot, diagnosis: Diagnosis, recommendation: Recommendation | None
) -> dict[str, Any]:
    """What ``monitor --json`` prints: the snapshot, its diagnosis and the tune, if any."""
    return {
        "snapshot": snapshot.to_dict(),
        "diagnosis": diagnosis.to_dict(),
        "tune": recommendation.to_dict() if recommendation is not None else None,
    }
