"""A job's source and model are fixed when it is created (issue 14, item 5).

Every writer (the stores' ``start_job``, ``chipscale run``, ``chipscale push --db``, the SQS
worker Lambda) refuses a job whose recorded source or model differs, atomically: two writers
racing to create one job on different sources leave exactly one winner. What runs for real:
SQLite files, the machine's PostgreSQL, ``chipscale`` in subprocesses on the aerial COG,
moto's SQS and S3, the worker Lambda's handler.
"""

from __future__ import annotations

import json
import sqlite3
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import boto3
import pytest
from click.testing import CliRunner
from mercantile import Tile
from test_sqs_worker import (  # noqa: F401 (fixtures)
    job_packs,
    lambda_env,
    load_handler,
    queue,
    receive_all,
    run_batches,
    send_packs,
)

from chipscale.cli import cli
from chipscale.cloud.job_record import WORKER_DEFAULT_SOURCE
from chipscale.errors import ChipscaleError
from chipscale.results import open_store
from chipscale.sources.footprint import cover
from chipscale.values import JobInfo, TileResult

EXE = [sys.executable, "-m", "chipscale.cli"]


@pytest.fixture(params=["sqlite", "postgres"])
def store_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'results.db'}"
    return str(request.getfixturevalue("results_db"))


def job(name: str, source: str, model: str | None = "m", version: str | None = "1", **kw: Any):
    return JobInfo(name, source, model_name=model, model_version=version, **kw)


def write_tiles(tiles: list[Tile], path: Path) -> None:
    path.write_text("".join(f"{t.x}-{t.y}-{t.z}\n" for t in tiles))


def assert_names_both(message: str, name: str, first: str, second: str) -> None:
    assert "\n" not in message
    assert repr(name) in message and first in message and second in message, message


# ----------------------------------------------------------------------------- the stores


def test_a_job_keeps_its_source_and_model(store_url: str) -> None:
    with open_store(store_url) as store:
        store.start_job(job("j", "a.tif", zoom=18, tiles_total=4, classes=("x", "y")))
        with pytest.raises(ChipscaleError) as error:
            store.start_job(job("j", "b.tif", zoom=18, tiles_total=4))
        assert_names_both(str(error.value), "j", "a.tif", "b.tif")
        with pytest.raises(ChipscaleError, match="m v1"):
            store.start_job(job("j", "a.tif", model="other", version="1"))
        with pytest.raises(ChipscaleError, match="v2"):
            store.start_job(job("j", "a.tif", version="2"))
        recorded = store.get_job("j")
        assert recorded is not None
        assert (recorded.source, recorded.model_name, recorded.model_version) == ("a.tif", "m", "1")
        # Same job, source and model: a resume, which may update the rest.
        store.start_job(job("j", "a.tif", zoom=18, tiles_total=9, classes=("x", "y")))
        # A writer naming no model (push) keeps the recorded one and its classes.
        store.start_job(job("j", "a.tif", model=None, version=None, tiles_total=7))
        recorded = store.get_job("j")
        assert recorded is not None
        assert (recorded.model_name, recorded.model_version, recorded.classes) == (
            "m",
            "1",
            ("x", "y"),
        )
        assert recorded.tiles_total == 7
        # A job recorded without a model (pushed) takes the first model that scores it.
        store.start_job(job("p", "a.tif", model=None, version=None))
        store.start_job(job("p", "a.tif", model="m", version="2"))
        with pytest.raises(ChipscaleError, match="'p'"):
            store.start_job(job("p", "a.tif", model="m", version="3"))


def race(url: str, name: str, sources: tuple[str, ...]) -> dict[str, BaseException | None]:
    """Each of ``sources`` creates job ``name`` on its own connection, all at once."""
    stores = [open_store(url) for _ in sources]
    barrier = threading.Barrier(len(sources))
    outcomes: dict[str, BaseException | None] = {}

    def create(store: Any, source: str) -> None:
        barrier.wait()
        try:
            store.start_job(job(name, source))
            outcomes[source] = None
        except BaseException as exc:
            outcomes[source] = exc

    threads = [
        threading.Thread(target=create, args=(store, source))
        for store, source in zip(stores, sources, strict=True)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for store in stores:
        store.close()
    return outcomes


def test_two_writers_racing_to_create_a_job_leave_one_winner(store_url: str) -> None:
    """Each round: two connections create the same new job on different sources at once."""
    open_store(store_url).close()  # the schema first: the race is about the job
    for round_ in range(8):
        name = f"race-{round_}"
        sources = (f"a-{round_}.tif", f"b-{round_}.tif")
        outcomes = race(store_url, name, sources)
        winners = [source for source, exc in outcomes.items() if exc is None]
        assert len(winners) == 1, (round_, outcomes)
        (loser,) = set(sources) - set(winners)
        error = outcomes[loser]
        assert isinstance(error, ChipscaleError), error
        assert_names_both(str(error), name, winners[0], loser)
        with open_store(store_url) as store:
            recorded = store.get_job(name)
        assert recorded is not None and recorded.source == winners[0]


# ----------------------------------------------------------------------------- chipscale run


def test_two_runs_started_at_once_on_different_sources_never_mix(
    aerial: Path, tmp_path: Path
) -> None:
    """Both runs read the job before either records it (the database's write lock is held
    by another process until both are waiting on it): exactly one may write rows."""
    other = tmp_path / "other-image.tif"
    other.symlink_to(aerial)
    tiles = sorted(cover(18, source=str(aerial)))
    halves = {str(aerial): tiles[:8], str(other): tiles[8:]}
    db = tmp_path / "results.db"
    open_store(f"sqlite:///{db}").close()
    blocker = sqlite3.connect(db, isolation_level=None)
    blocker.execute("BEGIN IMMEDIATE")  # writers queue behind it; readers do not
    runs = {}
    for i, (source, half) in enumerate(halves.items()):
        tile_list = tmp_path / f"tiles-{i}.txt"
        write_tiles(half, tile_list)
        log = tmp_path / f"run-{i}.log"
        args = ["run", "--source", source, "--zoom", "18", "--tiles", str(tile_list)]
        args += ["--job", "J", "--db", f"sqlite:///{db}", "--out", str(tmp_path / f"out-{i}")]
        args += ["--no-preview", "--workers", "1", "--threads", "1"]
        with log.open("w") as handle:
            runs[source] = (subprocess.Popen([*EXE, *args], stderr=handle, text=True), log)
    try:
        deadline = time.monotonic() + 120
        while not all("tiles at zoom 18" in log.read_text() for _, log in runs.values()):
            assert time.monotonic() < deadline, [log.read_text() for _, log in runs.values()]
            assert all(p.poll() is None for p, _ in runs.values()), "a run ended early"
            time.sleep(0.2)
        time.sleep(2.0)  # both are past their reads, waiting to record the job
    finally:
        blocker.execute("COMMIT")
        blocker.close()
    codes = {source: process.wait(timeout=120) for source, (process, _) in runs.items()}
    winners = [source for source, code in codes.items() if code == 0]
    assert len(winners) == 1, {s: log.read_text() for s, (_, log) in runs.items()}
    (loser,) = set(halves) - set(winners)
    assert codes[loser] == 1
    error = runs[loser][1].read_text().strip().splitlines()[-1]
    assert error.startswith("Error: ")
    assert_names_both(error, "J", winners[0], loser)
    with open_store(f"sqlite:///{db}") as store:
        recorded = store.get_job("J")
        rows = list(store.iter_results("J"))
    assert recorded is not None and recorded.source == winners[0]
    assert sorted(Tile(r.x, r.y, r.z) for r in rows) == sorted(halves[winners[0]])


# ----------------------------------------------------------------------------- chipscale push


@pytest.fixture
def push_queue(moto_server: str, monkeypatch: pytest.MonkeyPatch) -> SimpleNamespace:
    monkeypatch.setenv("AWS_ENDPOINT_URL", moto_server)
    sqs = boto3.client("sqs")
    url = sqs.create_queue(QueueName=f"tiles-{uuid.uuid4().hex[:10]}")["QueueUrl"]
    return SimpleNamespace(sqs=sqs, url=url)


def queued_sources(where: SimpleNamespace) -> list[str | None]:
    found = []
    while True:
        got = where.sqs.receive_message(QueueUrl=where.url, MaxNumberOfMessages=10).get(
            "Messages", []
        )
        if not got:
            return found
        found += [json.loads(m["Body"]).get("source") for m in got]
        where.sqs.delete_message_batch(
            QueueUrl=where.url,
            Entries=[
                {"Id": str(i), "ReceiptHandle": m["ReceiptHandle"]} for i, m in enumerate(got)
            ],
        )


def test_push_refuses_a_job_recorded_with_another_source(
    push_queue: SimpleNamespace, tmp_path: Path
) -> None:
    tiles = tmp_path / "tiles.txt"
    write_tiles([Tile(x, 10, 12) for x in range(8)], tiles)
    db = f"sqlite:///{tmp_path / 'results.db'}"

    def push(*args: str) -> Any:
        argv = ["push", str(tiles), push_queue.url, "--job", "PJ", "--db", db, *args]
        return CliRunner().invoke(cli, argv)

    first = push("--source", "s3://imagery/a.tif")
    assert first.exit_code == 0, first.output
    assert set(queued_sources(push_queue)) == {"s3://imagery/a.tif"}
    others = {"s3://imagery/b.tif": ["--source", "s3://imagery/b.tif"]}
    others[WORKER_DEFAULT_SOURCE] = ["--worker-source"]  # the worker's own: not the job's
    for named, args in others.items():
        again = push(*args)
        assert again.exit_code == 1, again.output
        line = again.stderr.strip().splitlines()[-1]
        assert_names_both(line, "PJ", "s3://imagery/a.tif", named)
        assert queued_sources(push_queue) == []  # nothing sent
    resumed = push("--source", "s3://imagery/a.tif")  # the same source resumes
    assert resumed.exit_code == 0, resumed.output
    with open_store(db) as store:
        recorded = store.get_job("PJ")
    assert recorded is not None and recorded.source == "s3://imagery/a.tif"


# ----------------------------------------------------------------------------- the worker


def test_worker_rejects_a_message_for_a_job_of_another_source(
    lambda_env: SimpleNamespace,  # noqa: F811
    queue: SimpleNamespace,  # noqa: F811
    monkeypatch: pytest.MonkeyPatch,
    demo_model_file: Path,
    aerial: Path,
) -> None:
    module = load_handler(monkeypatch, str(demo_model_file))
    tiles = sorted(cover(18, source=str(aerial)))
    elsewhere = f"s3://{lambda_env.bucket}/elsewhere.tif"
    with open_store(lambda_env.db) as store:
        store.start_job(JobInfo("taken", elsewhere))
        store.start_job(JobInfo("mine", lambda_env.source))
    send_packs(
        queue,
        job_packs("taken", lambda_env.source, tiles) + job_packs("mine", lambda_env.source, tiles),
    )
    assert run_batches(module, queue, receive_all(queue)) == []
    with open_store(lambda_env.db) as store:
        assert store.counts("taken")["total"] == 0  # no row in the other source's job
        assert store.counts("mine")["total"] == len(tiles)
        (rejected,) = store.rejects("taken")
    assert_names_both(rejected.reason, "taken", elsewhere, lambda_env.source)


def test_worker_rejects_a_message_for_a_job_of_another_model(
    lambda_env: SimpleNamespace,  # noqa: F811
    queue: SimpleNamespace,  # noqa: F811
    monkeypatch: pytest.MonkeyPatch,
    demo_model_file: Path,
    aerial: Path,
) -> None:
    """A job already scored by another model refuses the worker's rows too."""
    module = load_handler(monkeypatch, str(demo_model_file))
    tiles = sorted(cover(18, source=str(aerial)))
    with open_store(lambda_env.db) as store:
        store.start_job(
            JobInfo("scored", lambda_env.source, model_name="another", model_version="9")
        )
        store.write([TileResult("scored", tiles[0], "ok", {"a": 1.0}, model_name="another")])
    send_packs(queue, job_packs("scored", lambda_env.source, tiles))
    assert run_batches(module, queue, receive_all(queue)) == []
    with open_store(lambda_env.db) as store:
        assert store.counts("scored")["total"] == 1
        (rejected,) = store.rejects("scored")
    assert "'scored'" in rejected.reason and "another v9" in rejected.reason
