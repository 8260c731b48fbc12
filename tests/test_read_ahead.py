"""Read-ahead: a worker reads pack k+1 while pack k is predicted, never more than one ahead,
in the local runner and within a Lambda batch; a read-ahead pack's failure is handled as a
serial read's was.

Overlap is proved by order, not by time: the recording predictor holds pack k's prediction
until pack k+1's read has started (a bounded wait, so a serial worker fails the test instead
of hanging), and the event log must then show read k+1 started inside predict k, and read
k+2 only after predict k ended.
"""

from __future__ import annotations

import threading
import uuid
from collections.abc import Callable, Sequence
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
from conftest import LambdaContext
from mercantile import Tile
from test_sqs_worker import lambda_env, load_handler  # noqa: F401  # the fixture

import chipscale.pipeline.process as process
from chipscale.errors import SourceError, SourceUnavailable
from chipscale.grid.packs import pack_tiles
from chipscale.models.predictors import Predictor, open_predictor
from chipscale.pipeline.messages import PackMessage
from chipscale.pipeline.runner import run_local
from chipscale.results import open_store
from chipscale.sources.footprint import cover
from chipscale.values import ModelInfo

ZOOM = 19
MAX_TILES = 16  # z19 over the aerial COG: 64 tiles, 4 packs
HOLD_S = 10.0  # the most a prediction waits for the next read to start


class Log:
    """Events in the order they happened, across threads: (what, pack index)."""

    def __init__(self, packs: Sequence[tuple[Tile, ...]]) -> None:
        self.index = {pack[0]: i for i, pack in enumerate(packs)}
        self.events: list[tuple[str, int]] = []
        self.read_started = [threading.Event() for _ in packs]
        self.lock = threading.Lock()

    def add(self, what: str, pack: int) -> None:
        with self.lock:
            self.events.append((what, pack))

    def at(self, what: str, pack: int) -> int:
        return self.events.index((what, pack))


class HoldingPredictor:
    """The demo model, recording each prediction and holding it until the next pack's read
    has started (at most HOLD_S): pack k is the k-th prediction (one worker, in order)."""

    def __init__(self, inner: Predictor, log: Log) -> None:
        self.inner, self.log, self.calls = inner, log, 0

    @property
    def info(self) -> ModelInfo:
        return self.inner.info

    def predict(self, batch: np.ndarray, *, deadline: float | None = None) -> np.ndarray:
        k, self.calls = self.calls, self.calls + 1
        self.log.add("predict start", k)
        if k + 1 < len(self.log.read_started):
            self.log.read_started[k + 1].wait(HOLD_S)
        scores = self.inner.predict(batch, deadline=deadline)
        self.log.add("predict end", k)
        return scores

    def close(self) -> None:
        self.inner.close()


def record_reads(
    monkeypatch: pytest.MonkeyPatch, log: Log, fail: Callable[[int, int], None] | None = None
) -> None:
    """Log every pack read; ``fail(pack, attempt)`` may raise to make a read fail."""
    real = process._read_images
    attempts: dict[int, int] = {}

    def read_images(reader: Any, tiles: Sequence[Tile]) -> Any:
        k = log.index[tiles[0]]
        attempts[k] = attempts.get(k, 0) + 1
        log.add("read start", k)
        log.read_started[k].set()
        if fail is not None:
            fail(k, attempts[k])
        result = real(reader, tiles)
        log.add("read end", k)
        return result

    monkeypatch.setattr(process, "_read_images", read_images)


def assert_one_pack_ahead(log: Log, packs: int) -> None:
    for k in range(packs - 1):
        # pack k+1 is read while pack k is predicted...
        assert log.at("predict start", k) < log.at("read start", k + 1) < log.at("predict end", k)
        # ...and pack k+2 not before pack k is done
        if k + 2 < packs:
            assert log.at("read start", k + 2) > log.at("predict end", k)


@pytest.fixture(scope="module")
def demo() -> Predictor:
    return open_predictor(None)


def aerial_packs(source: Path) -> list[tuple[Tile, ...]]:
    tiles = list(cover(ZOOM, source=str(source)))
    return list(pack_tiles(tiles, MAX_TILES, presorted=False))


# ----------------------------------------------------------------------------- local runner


def run(
    aerial: Path, tmp_path: Path, predictor: Any, packs: list[tuple[Tile, ...]], ahead: bool = True
) -> Any:
    with open_store(f"sqlite:///{tmp_path}/r.db") as store:
        summary = run_local(
            job="j",
            source=str(aerial),
            tiles=[t for pack in packs for t in pack],
            predictor=predictor,
            store=store,
            zoom=ZOOM,
            workers=1,
            max_tiles=MAX_TILES,
            ahead=ahead,
        )
        return summary, store.counts("j")


def test_runner_reads_the_next_pack_while_predicting(
    aerial: Path, demo: Predictor, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    packs = aerial_packs(aerial)
    assert len(packs) >= 3
    log = Log(packs)
    record_reads(monkeypatch, log)
    summary, counts = run(aerial, tmp_path, HoldingPredictor(demo, log), packs)
    assert summary.processed == counts["total"] == sum(map(len, packs))
    assert_one_pack_ahead(log, len(packs))


def test_runner_without_read_ahead_reads_after_predicting(
    aerial: Path, demo: Predictor, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The serial worker (``ahead=False``, the bench's baseline) fails the overlap check."""
    packs = aerial_packs(aerial)[:2]
    log = Log(packs)
    record_reads(monkeypatch, log)
    log.read_started[1].set()  # nothing to wait for: the serial worker reads after
    run(aerial, tmp_path, HoldingPredictor(demo, log), packs, ahead=False)
    assert log.at("read start", 1) > log.at("predict end", 0)


def test_runner_retries_a_read_ahead_pack_that_failed_transiently(
    aerial: Path,
    demo: Predictor,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    packs = aerial_packs(aerial)
    log = Log(packs)

    def fail(pack: int, attempt: int) -> None:
        if pack == 2 and attempt == 1:  # read ahead, while pack 1 was predicted
            raise SourceUnavailable("S3 slow down")

    record_reads(monkeypatch, log, fail)
    summary, counts = run(aerial, tmp_path, HoldingPredictor(demo, log), packs)
    assert "retry 1" in caplog.text and "S3 slow down" in caplog.text
    assert summary.processed == counts["total"] == sum(map(len, packs))
    assert counts["error"] == 0


def test_runner_stores_error_rows_for_a_read_ahead_pack_that_failed_for_good(
    aerial: Path, demo: Predictor, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    packs = aerial_packs(aerial)
    log = Log(packs)

    def fail(pack: int, attempt: int) -> None:
        if pack == 1:
            raise SourceError("damaged file")

    record_reads(monkeypatch, log, fail)
    summary, counts = run(aerial, tmp_path, HoldingPredictor(demo, log), packs)
    assert summary.error == counts["error"] == len(packs[1])
    assert counts["total"] == sum(map(len, packs))


# ----------------------------------------------------------------------------- Lambda batch


def event(bodies: list[str]) -> tuple[dict[str, Any], list[str]]:
    ids = [str(uuid.uuid4()) for _ in bodies]
    records = [
        {
            "messageId": i,
            "receiptHandle": f"handle-{i}",
            "body": body,
            "attributes": {"ApproximateReceiveCount": "1"},
            "messageAttributes": {},
            "md5OfBody": "0" * 32,
            "eventSource": "aws:sqs",
            "eventSourceARN": "arn:aws:sqs:us-east-1:123456789012:work",
            "awsRegion": "us-east-1",
        }
        for i, body in zip(ids, bodies, strict=True)
    ]
    return {"Records": records}, ids


def lambda_batch(
    monkeypatch: pytest.MonkeyPatch,
    env: SimpleNamespace,
    model: Path,
    aerial: Path,
    fail: Callable[[int, int], None] | None = None,
) -> tuple[Log, list[str], list[str], Any]:
    """One batch of the aerial's packs through lambdas/sqs_worker.py; the log, the message
    ids, the ids reported failed, and the module."""
    module = load_handler(monkeypatch, str(model))
    packs = aerial_packs(aerial)
    log = Log(packs)
    record_reads(monkeypatch, log, fail)
    real_open = module.open_predictor
    monkeypatch.setattr(module, "open_predictor", lambda url: HoldingPredictor(real_open(url), log))
    bodies = [PackMessage("lam", env.source, pack).to_json() for pack in packs]
    batch, ids = event(bodies)
    response = module.handler(batch, LambdaContext("chipscale-worker"))
    failed = [item["itemIdentifier"] for item in response["batchItemFailures"]]
    return log, ids, failed, module


def stored(module: Any) -> dict[str, int]:
    counts: dict[str, int] = module.worker().store.counts("lam")
    module.worker().close()
    return counts


def test_lambda_batch_reads_the_next_pack_while_predicting(
    lambda_env: SimpleNamespace,  # noqa: F811
    monkeypatch: pytest.MonkeyPatch,
    demo_model_file: Path,
    aerial: Path,
) -> None:
    log, _, failed, module = lambda_batch(monkeypatch, lambda_env, demo_model_file, aerial)
    packs = len(log.read_started)
    assert failed == []
    assert_one_pack_ahead(log, packs)
    assert stored(module)["total"] == stored_tiles(aerial)


def stored_tiles(aerial: Path) -> int:
    return sum(map(len, aerial_packs(aerial)))


def test_lambda_read_ahead_failing_transiently_fails_only_its_message(
    lambda_env: SimpleNamespace,  # noqa: F811
    monkeypatch: pytest.MonkeyPatch,
    demo_model_file: Path,
    aerial: Path,
) -> None:
    def fail(pack: int, attempt: int) -> None:
        if pack == 2:
            raise SourceUnavailable("S3 slow down")

    _, ids, failed, module = lambda_batch(monkeypatch, lambda_env, demo_model_file, aerial, fail)
    assert failed == [ids[2]]  # read ahead during pack 1, raised as pack 2's own failure
    packs = aerial_packs(aerial)
    assert stored(module)["total"] == stored_tiles(aerial) - len(packs[2])


def test_lambda_read_ahead_failing_for_good_stores_error_rows(
    lambda_env: SimpleNamespace,  # noqa: F811
    monkeypatch: pytest.MonkeyPatch,
    demo_model_file: Path,
    aerial: Path,
) -> None:
    def fail(pack: int, attempt: int) -> None:
        if pack == 1:
            raise SourceError("damaged file")

    _, _, failed, module = lambda_batch(monkeypatch, lambda_env, demo_model_file, aerial, fail)
    assert failed == []
    counts = stored(module)
    assert counts["total"] == stored_tiles(aerial)
    assert counts["error"] == len(aerial_packs(aerial)[1])


def test_a_refused_source_is_never_read_ahead(
    lambda_env: SimpleNamespace,  # noqa: F811
    monkeypatch: pytest.MonkeyPatch,
    demo_model_file: Path,
    aerial: Path,
) -> None:
    """The allow-list is checked before a read-ahead opens anything."""
    module = load_handler(monkeypatch, str(demo_model_file))
    packs = aerial_packs(aerial)[:2]
    opened: list[str] = []
    real = process.cached_reader
    monkeypatch.setattr(
        process, "cached_reader", lambda source, **kw: opened.append(source) or real(source, **kw)
    )
    bodies = [
        PackMessage("lam", lambda_env.source, packs[0]).to_json(),
        PackMessage("lam", str(aerial), packs[1]).to_json(),  # a local path: not allowed
    ]
    batch, _ = event(bodies)
    response = module.handler(batch, LambdaContext("chipscale-worker"))
    assert response["batchItemFailures"] == []  # the second is rejected for good
    assert opened == [lambda_env.source]
    module.worker().close()
