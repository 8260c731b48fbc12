"""Poison messages are rejected with their reason, never retried into the DLQ (issue 14,
item 11).

A body that no delivery can ever parse (nested too deep for the JSON decoder, an integer too
long for Python's int, a version given as ``true``, NaN, duplicated keys) must end in the
store's ``rejects`` table with a short reason while the other messages of its batch are
stored. Run as Lambda runs it: real ReceiveMessage output of moto's SQS, the handler module
of lambdas/, results and rejects in the machine's PostgreSQL.
"""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from test_redrive import fill, queues, sqs  # noqa: F401 (fixtures)
from test_redrive import run as run_cli
from test_sqs_worker import (  # noqa: F401 (fixtures)
    ZOOM,
    job_packs,
    lambda_env,
    load_handler,
    queue,
    receive_all,
    run_batches,
    send_packs,
)

from chipscale.errors import InvalidMessageError
from chipscale.pipeline.messages import parse_message
from chipscale.results import open_store
from chipscale.sources.footprint import cover

#: The longest reason a reject may carry: a reason quotes what was wrong, not the body.
MAX_REASON = 400


def poison_bodies(source: str) -> dict[str, tuple[str, str]]:
    """Label -> (body, a word its reason must hold): every way a body can fail to parse."""

    def v1(**fields: object) -> str:
        return json.dumps({"v": 1, "job": "poison", "source": source, **fields})

    return {
        "nested arrays": ("[" * 100_000 + "]" * 100_000, "nested"),
        "nested field": (v1(tiles=[[0, 0, 1]])[:-1] + ', "x": ' + "[" * 500 + "]" * 500 + "}", "x"),
        "5000 digits": (
            v1(tiles=[[0, 0, 1]]).replace("[[0, 0, 1]]", f"[[{'7' * 5000}, 0, 1]]"),
            "digits",
        ),
        "v true": (
            json.dumps({"v": True, "job": "p", "source": source, "tiles": [[0, 0, 1]]}),
            "version",
        ),
        "v 1.0": (
            json.dumps({"v": 1.0, "job": "p", "source": source, "tiles": [[0, 0, 1]]}),
            "version",
        ),
        "x 1.0": (v1(tiles=[[1.0, 0, 1]]), "not an integer"),
        "x 1e3": (v1(tiles=[[0, 0, 1]]).replace("[[0, 0, 1]]", "[[1e3, 0, 12]]"), "not an integer"),
        "x true": (v1(tiles=[[True, 0, 1]]), "not an integer"),
        "NaN": (v1(tiles=[[0, 0, 1]]).replace("[[0, 0, 1]]", "[[NaN, 0, 1]]"), "NaN"),
        "Infinity": (v1(tiles=[[0, 0, 1]]).replace('"v": 1', '"v": Infinity'), "Infinity"),
        "list body": ("[1, 2, 3]", "JSON object"),
        "null body": ("null", "JSON object"),
        "duplicated job": (v1(tiles=[[0, 0, 1]])[:-1] + ', "job": "other"}', "duplicated"),
        "20,000 unknown keys": (
            v1(tiles=[[0, 0, 1]])[:-1] + "".join(f', "k{i:05d}": 0' for i in range(20_000)) + "}",
            "unknown",
        ),
        "single tile 1.0": (json.dumps({"x": 1.0, "y": 0, "z": 1}), "not an integer"),
    }


def test_poison_messages_are_rejected_with_their_reason_and_the_batch_goes_on(
    lambda_env: SimpleNamespace,  # noqa: F811 (fixture)
    queue: SimpleNamespace,  # noqa: F811 (fixture)
    monkeypatch: pytest.MonkeyPatch,
    demo_model_file: Path,
    aerial: Path,
) -> None:
    module = load_handler(monkeypatch, str(demo_model_file))
    tiles = list(cover(ZOOM, source=str(aerial)))[:12]
    good = job_packs("kept", lambda_env.source, tiles, max_tiles=4)
    poison = poison_bodies(lambda_env.source)
    bodies = [body for body, _ in poison.values()]
    # each batch of ten mixes good and poison messages
    send_packs(queue, [good[0], *bodies[:8], good[1], *bodies[8:], good[2]])
    messages = receive_all(queue)
    assert len(messages) == len(good) + len(poison)

    failed = run_batches(module, queue, messages)
    assert failed == [], "a poison message was sent back for redelivery (it would reach the DLQ)"
    assert receive_all(queue) == []

    with open_store(lambda_env.db) as store:
        assert sorted((r.x, r.y, r.z) for r in store.iter_results("kept")) == sorted(tiles)
        reasons = {r.message_id: r.reason for r in store.rejects()}
    ids = {m["Body"]: m["MessageId"] for m in messages}
    by_label = {label: reasons.get(ids[sent]) for label, (sent, _) in poison.items()}
    missing = [label for label, reason in by_label.items() if reason is None]
    assert not missing, f"not in rejects: {missing}"
    for label, (_, word) in poison.items():
        reason = by_label[label]
        assert reason is not None
        assert word.lower() in reason.lower(), (label, reason)
        assert len(reason) <= MAX_REASON, (label, reason[:200])
        assert "\n" not in reason
    module.worker().close()


@pytest.mark.parametrize(
    ("body", "reason"),
    [
        ('{"v": true, "job": "j", "source": "s", "tiles": [[0, 0, 0]]}', "version True"),
        ('{"v": 1.0, "job": "j", "source": "s", "tiles": [[0, 0, 0]]}', "version 1.0"),
        ('{"v": 1, "job": "j", "source": "s", "tiles": [[0, 0, 0]], "v": 1}', "duplicated"),
        ('{"v": 1, "job": "j", "source": "s", "tiles": [[-Infinity, 0, 0]]}', "Infinity"),
        ("[" * 100_000, "nested"),
        ('{"v": 1, "job": "j", "source": "s", "tiles": [[' + "9" * 5000 + ", 0, 0]]}", "digits"),
        ('{"v": 1, "job": "j", "source": "s", "tiles": [[' + "9" * 25 + ", 0, 0]]}", "digits"),
    ],
)
def test_parse_message_refuses_what_json_lets_through(body: str, reason: str) -> None:
    with pytest.raises(InvalidMessageError, match=reason):
        parse_message(body)


def test_redrive_peek_shows_poison_bodies_left_in_a_dead_letter_queue(
    sqs: Any,  # noqa: F811 (fixture)
    queues: tuple[str, str],  # noqa: F811 (fixture)
) -> None:
    """Poison bodies that reached a DLQ before this fix are shown by `chipscale redrive
    --peek`, not a RecursionError."""
    dlq, work = queues
    nested = "[" * 100_000 + "]" * 100_000
    digits = '{"v": 1, "job": "p", "source": "s3://b/a.tif", "tiles": [[' + "7" * 5000 + ", 0, 1]]}"
    fill(sqs, dlq, [nested, digits])

    result = run_cli("redrive", "--dlq", dlq, "--queue", work, "--peek", "5")

    assert result.exit_code == 0, result.output
    lines = [json.loads(line) for line in result.stdout.splitlines()]
    assert sorted(m["body"] for m in lines) == sorted([nested, digits])
    assert {(m["job"], m["tiles"]) for m in lines} == {(None, None)}
