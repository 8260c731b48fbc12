"""``chipscale tune``: the per-GPU Lambda concurrency that keeps the GPUs fed, not flooded.

By Little's law from what the run measured: Lambdas per GPU = tiles/s of one GPU x seconds a
Lambda spends per tile x (1 + :data:`HEADROOM`), rounded up. With the GPUs saturated, X is
their measured tiles/s and W the Lambda duration per tile less TorchServe's queue wait;
before they are, the feed is modelled (:mod:`chipscale.ops.feed`): X = tiles per busy
GPU-second (the utilisation law) and W from ReadSeconds, PredictSeconds and WriteSeconds
per tile, with the worker's read-ahead. Both go through :mod:`chipscale.ops.system_model`,
the model ``chipscale plan`` solves, so the two agree. ``--apply`` writes the SSM parameter
the fleet controller reads and the mapping's MaximumConcurrency now. The derivation: docs/design.md.
"""

from __future__ import annotations

import statistics
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

from chipscale.errors import ChipscaleError
from chipscale.ops import diagnosis, feed, system_model
from chipscale.ops.aws import FleetConfigError, aws_reason
from chipscale.ops.fleet import (
    MAX_MAXIMUM_CONCURRENCY,
    MIN_MAXIMUM_CONCURRENCY,
    desired_mapping,
)
from chipscale.ops.monitor import Clients
from chipscale.ops.snapshot import Snapshot

if TYPE_CHECKING:
    from chipscale.ops.stack_outputs import StackOutputs

#: Extra Lambdas over the computed need (:data:`chipscale.ops.feed.HEADROOM`).
HEADROOM = feed.HEADROOM
#: Saturated minutes ``tune`` needs before it trusts the throughput of a GPU; with fewer it
#: models the feed.
MIN_SATURATED_MINUTES = 3
#: Below this mean GPU utilisation (%) a minute says too little about the GPU to model it.
MIN_MODEL_UTIL = 5.0


class NotEnoughData(ChipscaleError):
    """The window holds too little of what ``tune`` measures (saturated GPUs, invocations)."""


class TuneError(ChipscaleError):
    """The new concurrency could not be written."""


@dataclass(frozen=True, slots=True)
class Target:
    """What a per-GPU value means for the mapping now."""

    per_gpu: int
    gpus_in_service: int
    #: None when no GPU is in service (the controller keeps the mapping disabled).
    maximum_concurrency: int | None
    reserved_concurrency: int | None
    #: What held MaximumConcurrency below per-GPU x GPUs, or raised it (None: nothing).
    limited_by: str | None
    current_per_gpu: int | None
    current_maximum_concurrency: int | None


def target_for(per_gpu: int, snapshot: Snapshot) -> Target:
    """MaximumConcurrency for ``per_gpu`` with the snapshot's GPUs and reserved concurrency,
    by the fleet controller's own rule."""
    if per_gpu < 1:
        raise FleetConfigError(f"per-GPU concurrency must be 1 or more, got {per_gpu}")
    if not snapshot.fleet.known:
        reasons = "; ".join(w for w in snapshot.warnings if "GPU fleet" in w)
        raise TuneError(
            f"the GPUs in service of {snapshot.stack} are unknown, so MaximumConcurrency "
            f"cannot be computed: {reasons or 'the fleet could not be read'}"
        )
    gpus = snapshot.fleet.gpus_in_service
    reserved = snapshot.worker.reserved_concurrency
    reserved = reserved if reserved and reserved >= MIN_MAXIMUM_CONCURRENCY else None
    desired = desired_mapping(gpus, per_gpu, reserved)
    wanted = per_gpu * gpus
    limited_by = None
    if desired.maximum_concurrency is not None and desired.maximum_concurrency != wanted:
        if reserved is not None and desired.maximum_concurrency == reserved < wanted:
            limited_by = f"the worker's reserved concurrency {reserved}"
        elif wanted > MAX_MAXIMUM_CONCURRENCY:
            limited_by = f"the SQS event source's maximum {MAX_MAXIMUM_CONCURRENCY}"
        else:
            limited_by = f"the SQS event source's minimum {MIN_MAXIMUM_CONCURRENCY}"
    return Target(
        per_gpu=per_gpu,
        gpus_in_service=gpus,
        maximum_concurrency=desired.maximum_concurrency,
        reserved_concurrency=reserved,
        limited_by=limited_by,
        current_per_gpu=snapshot.worker.per_gpu_concurrency,
        current_maximum_concurrency=snapshot.worker.maximum_concurrency,
    )


@dataclass(frozen=True, slots=True)
class Recommendation:
    """The computed per-GPU concurrency and every number that went into it."""

    target: Target
    minutes: int
    saturated_minutes: int
    tiles_per_s_per_gpu: float
    tiles_per_invocation: float
    duration_s: float
    duration_stat: str
    #: TorchServe queue wait taken out, per tile (None: no PredictSeconds to measure it).
    queue_wait_s_per_tile: float | None
    seconds_per_tile: float
    lambdas_per_gpu: float
    headroom: float
    notes: tuple[str, ...] = field(default=())
    #: "saturated" (X measured at saturation) or "feed model" (the GPUs were not saturated).
    method: str = "saturated"
    #: The feed model's inputs, per tile (None when saturated).
    read_s_per_tile: float | None = None
    predict_s_per_tile: float | None = None
    write_s_per_tile: float | None = None
    mean_gpu_utilization: float | None = None

    def lines(self) -> list[str]:
        """The computation, one step a line, for the terminal."""
        if self.method != "saturated":
            return self._model_lines()
        x, w = self.tiles_per_s_per_gpu, self.seconds_per_tile
        t = self.target
        raw = self.duration_s / self.tiles_per_invocation
        out = [
            f"saturated minutes      {self.saturated_minutes} of {self.minutes} "
            f"(mean GPU utilisation >= {diagnosis.SATURATED_GPU_UTIL:g}%)",
            f"X  tiles/s per GPU     {x:,.1f}  (median of the saturated minutes)",
            f"tiles per invocation   {self.tiles_per_invocation:,.1f}",
            f"Lambda duration        {self.duration_s:,.2f} s ({self.duration_stat}) "
            f"= {raw:.4f} s per tile",
        ]
        if self.queue_wait_s_per_tile is not None:
            out.append(
                f"queue wait taken out   {self.queue_wait_s_per_tile:.4f} s per tile "
                f"(PredictSeconds per tile - GPU time 1/X {1 / x:.4f} s)"
            )
        out += [
            f"W  seconds per tile    {w:.4f}",
            f"Lambdas per GPU        X x W x (1 + {self.headroom:.0%}) = {x:,.1f} x {w:.4f} x "
            f"{1 + self.headroom:g} = {self.lambdas_per_gpu:.2f} -> {t.per_gpu}",
            *target_lines(t),
            *self.notes,
        ]
        return out

    def _model_lines(self) -> list[str]:
        x, w, t = self.tiles_per_s_per_gpu, self.seconds_per_tile, self.target
        r, p = self.read_s_per_tile or 0.0, self.predict_s_per_tile or 0.0
        return [
            f"GPUs not saturated     {self.saturated_minutes} of {self.minutes} minutes: "
            "the feed is modelled",
            f"X  tiles/s per GPU     {x:,.1f}  (tiles per busy GPU-second, mean utilisation "
            f"{self.mean_gpu_utilization or 0.0:.0f}%)",
            f"read / predict / write {r:.4f} / {p:.4f} / {self.write_s_per_tile or 0.0:.4f} "
            "s per tile",
            f"W  seconds per tile    max(read, predict) + write = {w:.4f} (read-ahead)",
            f"Lambdas per GPU        X x W x (1 + {self.headroom:.0%}) = {x:,.1f} x {w:.4f} x "
            f"{1 + self.headroom:g} = {self.lambdas_per_gpu:.2f} -> {t.per_gpu}",
            *target_lines(t),
            *self.notes,
        ]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def target_lines(t: Target) -> list[str]:
    """The per-GPU value, then and now, and the MaximumConcurrency it gives."""
    now = f"now {t.current_per_gpu}" if t.current_per_gpu is not None else "now unknown"
    lines = [f"per-GPU concurrency    {t.per_gpu} ({now})"]
    if t.maximum_concurrency is None:
        lines.append(
            "MaximumConcurrency     - (no GPU in service: the mapping stays disabled until "
            "one is, then the controller sets it from the parameter)"
        )
    else:
        limit = f", held by {t.limited_by}" if t.limited_by else ""
        lines.append(
            f"MaximumConcurrency     {t.maximum_concurrency} = {t.per_gpu} x "
            f"{t.gpus_in_service} GPUs{limit} (now {t.current_maximum_concurrency})"
        )
    return lines


def recommend(snapshot: Snapshot, *, headroom: float = HEADROOM) -> Recommendation:
    """The per-GPU concurrency for the run in ``snapshot`` (derivation in docs/design.md):
    measured at saturation, else modelled from the feed (:func:`model_feed`).

    Raises :class:`NotEnoughData` naming what is missing: no invocations, no tiles, no
    duration, or (unsaturated) no GPU busy enough to model.
    """
    minutes = snapshot.minutes
    saturated = [
        m
        for m in minutes
        if m.gpus_reporting
        and m.tiles > 0
        and (m.mean_gpu_utilization or 0.0) >= diagnosis.SATURATED_GPU_UTIL
    ]
    span = f"{snapshot.window.seconds / 60:.0f} minutes of {snapshot.stack}"
    if len(saturated) < MIN_SATURATED_MINUTES:
        return model_feed(snapshot, saturated=len(saturated), headroom=headroom)
    worker, queue = snapshot.worker, snapshot.queue
    if worker.invocations <= 0:
        raise NotEnoughData(f"no worker invocations in the last {span}: nothing to measure")
    if queue.tiles <= 0:
        raise NotEnoughData(f"no tiles done in the last {span}: nothing to measure")
    if worker.duration_p50_ms is not None:
        duration_s, stat = worker.duration_p50_ms / 1000, "p50"
    elif worker.duration_mean_ms is not None:
        duration_s, stat = worker.duration_mean_ms / 1000, "mean"
    else:
        raise NotEnoughData(f"no Lambda duration in the last {span}: nothing to measure")
    period = snapshot.window.period_s
    x = statistics.median(m.tiles / period / m.gpus_reporting for m in saturated)
    tiles_per_invocation = queue.tiles / worker.invocations
    gpu_time = 1.0 / x
    per_tile = duration_s / tiles_per_invocation
    wait = None
    predict = sum(m.predict_s for m in saturated)
    saturated_tiles = sum(m.tiles for m in saturated)
    notes: list[str] = []
    if predict > 0:
        wait = max(0.0, predict / saturated_tiles - gpu_time)
    else:
        notes.append("no PredictSeconds from the worker: TorchServe's queue wait not taken out")
    seconds_per_tile = max(per_tile - (wait or 0.0), gpu_time)
    # Little's law with W measured: the system model's rule (read 0, predict W, write 0).
    lambdas = system_model.lambdas_per_gpu(x, 0.0, seconds_per_tile, 0.0, headroom=headroom)
    return Recommendation(
        target=target_for(system_model.per_gpu(lambdas), snapshot),
        minutes=snapshot.window.periods,
        saturated_minutes=len(saturated),
        tiles_per_s_per_gpu=x,
        tiles_per_invocation=tiles_per_invocation,
        duration_s=duration_s,
        duration_stat=stat,
        queue_wait_s_per_tile=wait,
        seconds_per_tile=seconds_per_tile,
        lambdas_per_gpu=lambdas,
        headroom=headroom,
        notes=tuple(notes),
    )


def model_feed(
    snapshot: Snapshot, *, saturated: int = 0, headroom: float = HEADROOM
) -> Recommendation:
    """The per-GPU concurrency before the GPUs saturate: X = tiles per busy GPU-second over
    the minutes with tiles done and GPU utilisation >= :data:`MIN_MODEL_UTIL`, W from the
    worker's ReadSeconds, PredictSeconds and WriteSeconds per tile
    (:func:`chipscale.ops.feed.lambdas_per_gpu`)."""
    span = f"{snapshot.window.seconds / 60:.0f} minutes of {snapshot.stack}"
    period = snapshot.window.period_s
    active = [
        m
        for m in snapshot.minutes
        if m.gpus_reporting and m.tiles > 0 and (m.mean_gpu_utilization or 0.0) >= MIN_MODEL_UTIL
    ]
    if not active:
        raise NotEnoughData(
            f"none of the last {span} had tiles done with the GPUs at least "
            f"{MIN_MODEL_UTIL:g}% busy (saturated minutes: {saturated} of the "
            f"{MIN_SATURATED_MINUTES} tune measures from), so there is no feed to model: "
            "raise the per-GPU concurrency by hand (--per-gpu N --apply), or widen --since"
        )
    tiles = sum(m.tiles for m in active)
    busy_gpu_s = sum(
        (m.mean_gpu_utilization or 0.0) / 100 * m.gpus_reporting * period for m in active
    )
    x = tiles / busy_gpu_s
    read, predict, write = (
        sum(m.read_s for m in active) / tiles,
        sum(m.predict_s for m in active) / tiles,
        sum(m.write_s for m in active) / tiles,
    )
    if predict <= 0:
        raise NotEnoughData(
            f"the GPUs were not saturated in the last {span} and the worker reported no "
            "PredictSeconds, so the feed cannot be modelled: raise the per-GPU concurrency "
            "by hand (--per-gpu N --apply), or widen --since"
        )
    utilization = sum((m.mean_gpu_utilization or 0.0) for m in active) / len(active)
    predict = max(predict, 1.0 / x)
    lambdas = system_model.lambdas_per_gpu(x, read, predict, write, headroom=headroom)
    worker, queue = snapshot.worker, snapshot.queue
    duration_s = (worker.duration_p50_ms or worker.duration_mean_ms or 0.0) / 1000
    return Recommendation(
        target=target_for(system_model.per_gpu(lambdas), snapshot),
        minutes=snapshot.window.periods,
        saturated_minutes=saturated,
        tiles_per_s_per_gpu=x,
        tiles_per_invocation=queue.tiles / worker.invocations if worker.invocations else 0.0,
        duration_s=duration_s,
        duration_stat="p50" if worker.duration_p50_ms is not None else "mean",
        queue_wait_s_per_tile=None,
        seconds_per_tile=feed.seconds_per_tile(read, predict, write),
        lambdas_per_gpu=lambdas,
        headroom=headroom,
        method="feed model",
        read_s_per_tile=read,
        predict_s_per_tile=predict,
        write_s_per_tile=write,
        mean_gpu_utilization=utilization,
    )


# ----------------------------------------------------------------------------- apply


@dataclass(frozen=True, slots=True)
class Applied:
    """What ``--apply`` wrote."""

    parameter: str
    per_gpu_before: int | None
    per_gpu: int
    mapping_uuid: str | None
    maximum_concurrency_before: int | None
    #: None when the mapping was left alone (no GPU in service, or already right).
    maximum_concurrency: int | None
    note: str | None = None

    def lines(self) -> list[str]:
        out = [f"wrote {self.parameter} = {self.per_gpu} (was {self.per_gpu_before})"]
        if self.maximum_concurrency is not None:
            out.append(
                f"set MaximumConcurrency of mapping {self.mapping_uuid} to "
                f"{self.maximum_concurrency} (was {self.maximum_concurrency_before})"
            )
        if self.note:
            out.append(self.note)
        return out

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def apply(target: Target, outputs: StackOutputs, clients: Clients) -> Applied:
    """Write ``target``: the per-GPU SSM parameter first (so the fleet controller, which
    overwrites any direct edit of the mapping, keeps the value), then the mapping's
    MaximumConcurrency, so it takes effect now rather than at the controller's next run."""
    from botocore.exceptions import BotoCoreError, ClientError

    parameter = outputs.require("per_gpu_parameter")
    try:
        clients.ssm.put_parameter(
            Name=parameter, Value=str(target.per_gpu), Type="String", Overwrite=True
        )
    except (ClientError, BotoCoreError) as exc:
        raise TuneError(f"cannot write SSM parameter {parameter}: {aws_reason(exc)}") from exc
    uuid = outputs.event_source_mapping_id
    after, note = None, None
    if target.maximum_concurrency is None:
        note = "no GPU in service: the fleet controller sets the mapping when one is"
    elif uuid is None:
        note = "the stack names no event source mapping: the fleet controller applies it"
    elif target.maximum_concurrency == target.current_maximum_concurrency:
        note = "MaximumConcurrency already right"
    else:
        lam = clients.lambda_client
        try:
            lam.update_event_source_mapping(
                UUID=uuid, ScalingConfig={"MaximumConcurrency": target.maximum_concurrency}
            )
            after = target.maximum_concurrency
        except lam.exceptions.ResourceInUseException:
            note = (
                f"mapping {uuid} is changing state: the fleet controller applies the new "
                "value on its next run (within a minute)"
            )
        except (ClientError, BotoCoreError) as exc:
            raise TuneError(
                f"wrote {parameter} = {target.per_gpu}, but cannot update mapping {uuid}: "
                f"{aws_reason(exc)} (the fleet controller applies it on its next run)"
            ) from exc
    return Applied(
        parameter=parameter,
        per_gpu_before=target.current_per_gpu,
        per_gpu=target.per_gpu,
        mapping_uuid=uuid,
        maximum_concurrency_before=target.current_maximum_concurrency,
        maximum_concurrency=after,
        note=note,
    )
