"""``chipscale tune``: the per-GPU concurrency from Little's law, and ``--apply``.

The arithmetic is checked on snapshots built by hand (every number of the computation known);
``tune --stack NAME [--apply]`` runs as a subprocess against the chipscale-shaped stack in a
real moto server, with a saturated run's metrics put into moto's CloudWatch, and must change
the SSM per-GPU parameter (the fleet controller's source of truth) and the event source
mapping's MaximumConcurrency (moto's Lambda creates and updates mappings without Docker).
moto never reports a mapping in a transition, so that answer is a recorded one (Stubber).
"""

from __future__ import annotations

import json
from dataclasses import replace
from typing import Any

import boto3
import pytest
from botocore.stub import Stubber
from hypothesis import given
from hypothesis import strategies as st
from test_monitor import Deployed, Load, aws, chipscale, deploy, monitor_json, put_load, snap

from chipscale.ops import diagnosis, tune
from chipscale.ops.fleet import MAX_MAXIMUM_CONCURRENCY, MIN_MAXIMUM_CONCURRENCY
from chipscale.ops.monitor import Clients
from chipscale.ops.snapshot import Minute, Queue, Snapshot
from chipscale.ops.tune import NotEnoughData, apply, recommend, target_for

__all__ = ["aws"]  # the fixture, shared with test_monitor


def saturated_run(
    *,
    minutes: int = 10,
    util: float = 95.0,
    gpus: int = 2,
    tiles: float = 12_000.0,
    predict_s: float = 144.0,
    invocations_per_minute: float = 60.0,
    p50_ms: float | None = 4_000.0,
    mean_ms: float | None = 5_000.0,
    **kwargs: Any,
) -> Snapshot:
    """A hand-made run: ``gpus`` GPUs at ``util`` for ``minutes`` minutes, each minute
    ``tiles`` tiles and ``predict_s`` seconds of PredictSeconds. Defaults: X = 100 tiles/s a
    GPU, 200 tiles an invocation, 0.012 s of predict per tile (GPU time 0.01)."""
    base = snap(util=util, gpus=gpus, p50_ms=p50_ms, **kwargs)
    keys = [gpu.key for gpu in base.gpus]
    starts = base.window.period_starts()[-minutes:]
    rows = tuple(
        Minute(
            start,
            {key: util for key in keys},
            tiles=tiles,
            packs=tiles / 100,
            predict_s=predict_s,
            invocations=invocations_per_minute,
        )
        for start in starts
    )
    return replace(
        base,
        minutes=rows,
        queue=replace(base.queue, tiles=tiles * minutes, packs=tiles * minutes / 100),
        worker=replace(
            base.worker,
            invocations=invocations_per_minute * minutes,
            duration_mean_ms=mean_ms,
        ),
    )


# ----------------------------------------------------------------------------- arithmetic


def test_littles_law_with_the_queue_wait_taken_out() -> None:
    recommendation = recommend(saturated_run())
    assert recommendation.tiles_per_s_per_gpu == pytest.approx(100.0)
    assert recommendation.tiles_per_invocation == pytest.approx(200.0)
    assert (recommendation.duration_s, recommendation.duration_stat) == (4.0, "p50")
    # 0.012 s of predict per tile, of which the GPU's own time 1/X = 0.010 s
    assert recommendation.queue_wait_s_per_tile == pytest.approx(0.002)
    assert recommendation.seconds_per_tile == pytest.approx(0.018)  # 4 / 200 - 0.002
    assert recommendation.lambdas_per_gpu == pytest.approx(100 * 0.018 * 1.2)  # 2.16
    target = recommendation.target
    assert (target.per_gpu, target.gpus_in_service, target.maximum_concurrency) == (3, 2, 6)
    assert (target.current_per_gpu, target.current_maximum_concurrency) == (4, 8)
    text = "\n".join(recommendation.lines())
    assert "= 100.0 x 0.0180 x 1.2 = 2.16 -> 3" in text
    assert "MaximumConcurrency     6 = 3 x 2 GPUs (now 8)" in text
    json.dumps(recommendation.to_dict())


def test_overloaded_run_is_not_told_to_keep_its_concurrency() -> None:
    """Far above: Lambdas spend most of their time queued in TorchServe. Little's law on the
    raw duration would reproduce today's concurrency; with the wait taken out it drops."""
    # 16 s a 200-tile invocation, 0.07 s of predict per tile of which 0.01 is the GPU's
    congested = saturated_run(p50_ms=16_000, predict_s=12_000 * 0.07)
    recommendation = recommend(congested)
    assert recommendation.queue_wait_s_per_tile == pytest.approx(0.06)
    assert recommendation.seconds_per_tile == pytest.approx(0.08 - 0.06)
    assert recommendation.target.per_gpu == 3  # 100 x 0.02 x 1.2 = 2.4
    raw = 100 * (16 / 200) * 1.2
    assert raw > 9  # what the identity L = X x W would have kept


def test_without_predict_seconds_the_raw_duration_is_used() -> None:
    recommendation = recommend(saturated_run(predict_s=0.0))
    assert recommendation.queue_wait_s_per_tile is None
    assert recommendation.seconds_per_tile == pytest.approx(0.02)
    assert recommendation.target.per_gpu == 3  # 100 x 0.02 x 1.2 = 2.4
    assert any("PredictSeconds" in note for note in recommendation.notes)


def test_mean_duration_when_no_percentile() -> None:
    recommendation = recommend(saturated_run(p50_ms=None, mean_ms=6_000.0))
    assert (recommendation.duration_s, recommendation.duration_stat) == (6.0, "mean")


def test_seconds_per_tile_never_below_the_gpu_time() -> None:
    recommendation = recommend(saturated_run(p50_ms=1_000, predict_s=12_000 * 0.5))
    assert recommendation.seconds_per_tile == pytest.approx(1 / 100)
    assert recommendation.target.per_gpu == 2  # 100 x 0.01 x 1.2 = 1.2


# Issue 17: tune no longer refuses before saturation; with fewer saturated minutes than it
# measures from, it models the feed (these two tests asserted the refusal before).
@pytest.mark.parametrize(("saturated", "method"), [(-1, "feed model"), (0, "saturated")])
def test_min_saturated_minutes_flips_to_the_feed_model(saturated: int, method: str) -> None:
    run = saturated_run(minutes=tune.MIN_SATURATED_MINUTES + saturated)
    recommendation = recommend(run)
    assert recommendation.method == method
    assert recommendation.saturated_minutes == tune.MIN_SATURATED_MINUTES + saturated


def test_minutes_below_saturation_do_not_count() -> None:
    just_below = diagnosis.SATURATED_GPU_UTIL * (1 - 1e-6)
    below = recommend(saturated_run(util=just_below))
    assert (below.method, below.saturated_minutes) == ("feed model", 0)
    assert recommend(saturated_run(util=diagnosis.SATURATED_GPU_UTIL)).saturated_minutes == 10


def feeding_run(util: float = 50.0, read: float = 0.015, write: float = 0.001) -> Snapshot:
    """Two GPUs at ``util`` doing 100 tiles/s each; per tile 0.012 s of PredictSeconds and
    ``read`` / ``write`` seconds of ReadSeconds / WriteSeconds."""
    run = saturated_run(util=util)
    return replace(
        run,
        minutes=tuple(
            replace(m, read_s=m.tiles * read, write_s=m.tiles * write) for m in run.minutes
        ),
    )


def test_unsaturated_gpus_are_tuned_from_the_feed_model() -> None:
    """Half-busy GPUs: X = tiles per busy GPU-second = 100 / 0.5 = 200 tiles/s; with
    read-ahead a Lambda spends max(read 0.015, predict 0.012) + write 0.001 = 0.016 s a
    tile, so 200 x 0.016 x 1.2 = 3.84 -> 4 Lambdas a GPU."""
    recommendation = recommend(feeding_run())
    assert recommendation.method == "feed model"
    assert recommendation.tiles_per_s_per_gpu == pytest.approx(200.0)
    assert recommendation.seconds_per_tile == pytest.approx(0.016)
    assert recommendation.lambdas_per_gpu == pytest.approx(3.84)
    assert (recommendation.target.per_gpu, recommendation.target.maximum_concurrency) == (4, 8)
    text = "\n".join(recommendation.lines())
    assert "the feed is modelled" in text
    assert "= 200.0 x 0.0160 x 1.2 = 3.84 -> 4" in text
    json.dumps(recommendation.to_dict())


def test_a_slower_read_raises_the_modelled_concurrency() -> None:
    """Read-bound Lambdas: each delivers a tile per 0.030 + 0.001 s, so more are needed."""
    assert recommend(feeding_run(read=0.030)).target.per_gpu == 8  # 200 x 0.031 x 1.2 = 7.44


def test_idle_gpus_leave_nothing_to_model() -> None:
    with pytest.raises(NotEnoughData, match="at least 5% busy"):
        recommend(feeding_run(util=tune.MIN_MODEL_UTIL / 2))
    with pytest.raises(NotEnoughData, match="no PredictSeconds"):
        recommend(saturated_run(util=50.0, predict_s=0.0))


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"invocations_per_minute": 0.0}, "no worker invocations"),
        ({"p50_ms": None, "mean_ms": None}, "no Lambda duration"),
    ],
)
def test_refuses_without_what_it_measures(change: dict[str, Any], message: str) -> None:
    with pytest.raises(NotEnoughData, match=message):
        recommend(saturated_run(**change))


def test_refuses_without_tiles() -> None:
    run = saturated_run()
    with pytest.raises(NotEnoughData, match="saturated"):  # no tiles: no saturated minute
        recommend(replace(run, minutes=tuple(replace(m, tiles=0.0) for m in run.minutes)))
    with pytest.raises(NotEnoughData, match="no tiles"):
        recommend(replace(run, queue=Queue()))


@pytest.mark.parametrize(
    ("per_gpu", "gpus", "reserved", "expected", "limited"),
    [
        (3, 2, None, 6, None),
        (8, 4, 20, 20, "reserved concurrency 20"),
        (40, 30, None, MAX_MAXIMUM_CONCURRENCY, "maximum 1000"),
        (1, 1, None, MIN_MAXIMUM_CONCURRENCY, "minimum 2"),
        (5, 0, None, None, None),  # no GPU in service: the mapping stays disabled
    ],
)
def test_target_follows_the_fleet_controllers_rule(
    per_gpu: int, gpus: int, reserved: int | None, expected: int | None, limited: str | None
) -> None:
    target = target_for(per_gpu, snap(gpus=gpus, reserved=reserved))
    assert target.maximum_concurrency == expected
    if limited is None:
        assert target.limited_by is None
    else:
        assert limited in (target.limited_by or "")


@given(
    tiles=st.floats(60, 1e6),
    predict=st.floats(0, 1e4),
    p50=st.floats(10, 900_000),
    per_minute=st.floats(1, 1e4),
    gpus=st.integers(1, 50),
    reserved=st.none() | st.integers(2, 3000),
)
def test_recommendation_stays_within_what_aws_accepts(
    tiles: float, predict: float, p50: float, per_minute: float, gpus: int, reserved: int | None
) -> None:
    run = saturated_run(
        tiles=tiles,
        predict_s=predict,
        p50_ms=p50,
        invocations_per_minute=per_minute,
        gpus=gpus,
        reserved=reserved,
    )
    target = recommend(run).target
    assert target.per_gpu >= 1
    assert target.maximum_concurrency is not None
    ceiling = min(MAX_MAXIMUM_CONCURRENCY, reserved or MAX_MAXIMUM_CONCURRENCY)
    assert MIN_MAXIMUM_CONCURRENCY <= target.maximum_concurrency <= max(ceiling, 2)


# ----------------------------------------------------------------------------- moto, end to end

#: A saturated run of 2 single-GPU instances: 6,000 tiles a minute (X = 50 tiles/s a GPU),
#: 30 invocations a minute of 8 s (200 tiles each: 0.04 s a tile), 0.03 s of predict per tile
#: (GPU time 1/X = 0.02, so 0.01 s of queue wait): W = 0.03, 50 x 0.03 x 1.2 = 1.8 -> 2.
SATURATED = Load(
    gpu_util=95.0,
    tiles=6000.0,
    packs=60.0,
    predict_s=6000 * 0.03,
    invocations=30.0,
    duration_ms=8000.0,
    concurrency=8.0,
    visible=40,
)


def parameter(deployed: Deployed) -> str:
    name = deployed.outputs.per_gpu_parameter
    return boto3.client("ssm").get_parameter(Name=name)["Parameter"]["Value"]


def mapping_concurrency(deployed: Deployed) -> int:
    uuid = deployed.outputs.event_source_mapping_id
    mapping = boto3.client("lambda").get_event_source_mapping(UUID=uuid)
    return int(mapping["ScalingConfig"]["MaximumConcurrency"])


def test_apply_writes_the_parameter_and_the_mapping(aws: str) -> None:
    deployed = deploy(per_gpu=4)
    put_load(deployed, SATURATED)
    assert (parameter(deployed), mapping_concurrency(deployed)) == ("4", 8)
    # What monitor shows is what tune computes.
    assert monitor_json(deployed.name, aws)["tune"]["target"]["per_gpu"] == 2

    done = chipscale("tune", "--stack", deployed.name, "--apply", "--json", moto=aws)
    assert done.returncode == 0, done.stderr
    document = json.loads(done.stdout)
    recommendation = document["recommendation"]
    assert recommendation["tiles_per_s_per_gpu"] == pytest.approx(50.0)
    assert recommendation["tiles_per_invocation"] == pytest.approx(200.0)
    assert recommendation["duration_stat"] == "mean"  # moto has no percentiles
    assert recommendation["queue_wait_s_per_tile"] == pytest.approx(0.01)
    assert document["target"]["per_gpu"] == 2
    assert document["applied"]["maximum_concurrency"] == 4
    assert (parameter(deployed), mapping_concurrency(deployed)) == ("2", 4)


def test_without_apply_nothing_is_written(aws: str) -> None:
    deployed = deploy(per_gpu=4)
    put_load(deployed, SATURATED)
    done = chipscale("tune", "--stack", deployed.name, moto=aws)
    assert done.returncode == 0, done.stderr
    assert "Lambdas per GPU        X x W x (1 + 20%) = 50.0 x 0.0300 x 1.2 = 1.80 -> 2" in (
        done.stdout
    )
    assert "MaximumConcurrency     4 = 2 x 2 GPUs (now 8)" in done.stdout
    assert "nothing written" in done.stderr
    assert (parameter(deployed), mapping_concurrency(deployed)) == ("4", 8)


def test_reserved_concurrency_caps_the_mapping(aws: str) -> None:
    deployed = deploy(per_gpu=4, reserved=3)
    put_load(deployed, SATURATED)
    done = chipscale("tune", "--stack", deployed.name, "--apply", "--json", moto=aws)
    assert done.returncode == 0, done.stderr
    target = json.loads(done.stdout)["target"]
    assert target["maximum_concurrency"] == 3
    assert "reserved concurrency 3" in target["limited_by"]
    assert (parameter(deployed), mapping_concurrency(deployed)) == ("2", 3)


def test_per_gpu_given_by_hand(aws: str) -> None:
    deployed = deploy(per_gpu=4)
    put_load(deployed, Load(gpu_util=20.0))  # nothing saturated: a value by hand still goes
    done = chipscale("tune", "--stack", deployed.name, "--per-gpu", "6", "--apply", moto=aws)
    assert done.returncode == 0, done.stderr
    assert "per-GPU concurrency    6 (now 4)" in done.stdout
    assert "set MaximumConcurrency of mapping" in done.stdout
    assert (parameter(deployed), mapping_concurrency(deployed)) == ("6", 12)


def test_an_unsaturated_run_is_tuned_from_the_feed_model(aws: str) -> None:
    """GPUs half busy: tune --apply models the feed instead of asking for saturation."""
    deployed = deploy(per_gpu=4)
    put_load(deployed, Load(gpu_util=50.0, predict_s=600 * 0.05))
    done = chipscale("tune", "--stack", deployed.name, "--apply", "--json", moto=aws)
    assert done.returncode == 0, done.stderr
    recommendation = json.loads(done.stdout)["recommendation"]
    assert recommendation["method"] == "feed model"
    per_gpu = recommendation["target"]["per_gpu"]
    assert per_gpu != 4
    assert parameter(deployed) == str(per_gpu)


def test_refusal_is_one_line(aws: str) -> None:
    deployed = deploy(per_gpu=4)
    put_load(deployed, Load(gpu_util=50.0))  # no PredictSeconds: nothing to model
    done = chipscale("tune", "--stack", deployed.name, "--apply", moto=aws)
    assert done.returncode == 1
    assert done.stderr.count("\n") == 1, done.stderr
    assert done.stderr.startswith("Error: the GPUs were not saturated in the last 15 minutes")
    assert "--per-gpu N --apply" in done.stderr
    assert (parameter(deployed), mapping_concurrency(deployed)) == ("4", 8)


def test_apply_with_no_gpu_in_service_writes_only_the_parameter(aws: str) -> None:
    deployed = deploy(instances=0, per_gpu=4)
    done = chipscale("tune", "--stack", deployed.name, "--per-gpu", "5", "--apply", moto=aws)
    assert done.returncode == 0, done.stderr
    assert "no GPU in service" in done.stdout
    assert (parameter(deployed), mapping_concurrency(deployed)) == ("5", 2)  # template's


def test_mapping_in_transition_leaves_it_to_the_controller(aws: str) -> None:
    """AWS refuses updates while a mapping is changing state (ResourceInUseException, never
    seen in moto): the parameter is written and the controller applies it next run."""
    deployed = deploy(per_gpu=4)
    clients = Clients.from_session(boto3.session.Session(region_name="us-east-1"))
    recorded = boto3.client(
        "lambda", region_name="us-east-1", aws_access_key_id="x", aws_secret_access_key="x"
    )
    target = target_for(7, snap(gpus=2))
    with Stubber(recorded) as stub:
        stub.add_client_error(
            "update_event_source_mapping",
            service_error_code="ResourceInUseException",
            service_message="Cannot update the event source mapping because it is in use.",
            http_status_code=400,
            expected_params={
                "UUID": deployed.outputs.event_source_mapping_id,
                "ScalingConfig": {"MaximumConcurrency": 14},
            },
        )
        applied = apply(target, deployed.outputs, replace(clients, lambda_client=recorded))
        stub.assert_no_pending_responses()
    assert applied.maximum_concurrency is None
    assert "fleet controller applies the new value" in (applied.note or "")
    assert parameter(deployed) == "7"


def test_the_window_is_the_one_asked(aws: str) -> None:
    """--since widens the window: five saturated minutes are not enough in the last 3."""
    deployed = deploy(per_gpu=4)
    put_load(deployed, SATURATED, minutes=5)
    narrow = chipscale("tune", "--stack", deployed.name, "--since", "3", moto=aws)
    wide = chipscale("tune", "--stack", deployed.name, "--since", "15", moto=aws)
    assert wide.returncode == 0, wide.stderr
    assert "saturated minutes      5 of 15" in wide.stdout
    # The last 3 minutes hold 2 or 3 of the data's minutes, depending on when the command
    # starts; never the 5.
    assert narrow.returncode in (0, 1)
    assert "5 of" not in narrow.stdout + narrow.stderr
