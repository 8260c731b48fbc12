"""Request bodies (issue 17): the handler reads a ``.npy`` body in place (no copy of the
pixels), decodes zstd bodies (``Content-Encoding: zstd``) within bounds, the runtime moves
uint16 to the device as uint16; the client negotiates zstd with the server it talks to and
falls back to a plain ``.npy`` for a host that does not decode it.

The shared-batch answers through a real TorchServe are in tests/test_serving.py.
"""

from __future__ import annotations

import io
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from test_torchserve_client import METADATA, ScriptedServer, scores_of, tiles

from chipscale.errors import ChipscaleError
from chipscale.models import request_body
from chipscale.models.predictors import InProcessPredictor, open_predictor
from chipscale.models.request_body import zstd
from chipscale.models.torchserve_client import TorchServePredictor
from chipscale.sources import read_tiles
from chipscale.sources.footprint import cover
from model_server.chipscale_runtime import to_device

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "model_server"))
import chipscale_handler as handler  # flat, as TorchServe imports it


def npy(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=False)
    return buffer.getvalue()


# ----------------------------------------------------------------------------- the handler


@pytest.mark.parametrize(
    "array",
    [
        np.arange(2 * 3 * 8 * 8, dtype=np.uint8).reshape(2, 3, 8, 8),
        np.arange(2 * 4 * 8 * 8, dtype=np.uint16).reshape(2, 4, 8, 8) * 257,
        np.asfortranarray(np.arange(2 * 3 * 8 * 8, dtype=">f4").reshape(2, 3, 8, 8)),
        np.ones((3, 8, 8), np.float32),  # one tile, 3-D
    ],
    ids=["uint8", "uint16", "big_endian_fortran", "one_tile"],
)
def test_a_npy_body_is_read_in_place_as_np_load_reads_it(array: np.ndarray) -> None:
    body = bytearray(npy(array))  # TorchServe hands the handler a bytearray
    tiles = handler.decode_tiles(body)
    assert isinstance(tiles, np.ndarray)
    expected = np.load(io.BytesIO(bytes(body)), allow_pickle=False)
    np.testing.assert_array_equal(tiles, expected.reshape(tiles.shape))
    assert tiles.dtype == expected.dtype
    assert np.shares_memory(tiles, np.frombuffer(body, np.uint8)), "the pixels were copied"


@pytest.mark.parametrize(
    ("body", "error"),
    [
        (npy(np.zeros((2, 3, 8, 8), np.uint8))[:-10], "EOF: reading array data"),
        (npy(np.zeros((2, 3, 8, 8), np.uint8))[:40], "EOF: reading array header"),
        (b"\x93NUMPY\x01\x00\x10\x00{'descr': 1}   ", "the body is not a readable .npy array"),
        (b"not a npy file", "not a .npy file"),
    ],
    ids=["truncated_data", "truncated_header", "bad_header", "not_npy"],
)
def test_a_malformed_npy_body_is_refused_as_before(body: bytes, error: str) -> None:
    refusal = handler.decode_tiles(bytearray(body))
    assert isinstance(refusal, handler.HttpRefusal)
    assert refusal.status == 400 and error in refusal.message


def test_an_object_array_is_refused_without_unpickling() -> None:
    buffer = io.BytesIO()
    np.save(buffer, np.array([{"a": 1}], dtype=object), allow_pickle=True)
    refusal = handler.decode_tiles(buffer.getvalue())
    assert isinstance(refusal, handler.HttpRefusal) and refusal.status == 400
    assert "Object arrays cannot be loaded" in refusal.message


def test_zstd_bodies_decode_and_bad_ones_are_refused_with_their_reason() -> None:
    array = np.arange(2 * 3 * 8 * 8, dtype=np.uint8).reshape(2, 3, 8, 8)
    compressed = zstd.compress(npy(array), level=1)
    tiles = handler.decode_tiles(bytearray(compressed), "zstd")
    assert isinstance(tiles, np.ndarray)
    np.testing.assert_array_equal(tiles, array)
    assert isinstance(handler.decode_tiles(npy(array), "identity"), np.ndarray)
    cases = {
        "truncated": (compressed[:-5], "zstd", 400, "truncated"),
        "garbage": (b"garbage", "zstd", 400, "not a readable zstd stream"),
        "two_frames": (compressed + compressed, "zstd", 400, "after its zstd frame"),
        "gzip": (npy(array), "gzip", 415, "accepted: identity, zstd"),
        # A decompression bomb: 32 KiB declaring more than MAX_DECODED_BYTES.
        "bomb": (zstd.compress(bytes(handler.MAX_DECODED_BYTES + 1)), "zstd", 413, "expands"),
    }
    for name, (body, encoding, status, words) in cases.items():
        refusal = handler.decode_tiles(body, encoding)
        assert isinstance(refusal, handler.HttpRefusal), name
        assert (refusal.status, words in refusal.message) == (status, True), (name, refusal)


def test_the_metadata_answer_lists_the_encodings_the_host_decodes() -> None:
    assert handler.CONTENT_ENCODINGS == ("zstd",)


# ----------------------------------------------------------------------------- the runtime


def test_uint16_goes_to_the_device_as_uint16_and_in_place_on_the_cpu() -> None:
    """Widening to float happens on the device (in ``preprocess``), not in numpy first."""
    batch = np.frombuffer(bytearray(2 * 4 * 8 * 8 * 2), np.uint16).reshape(2, 4, 8, 8)
    x = to_device(batch, torch.device("cpu"))
    assert x.dtype == torch.uint16
    assert np.shares_memory(x.numpy(), batch)
    swapped = to_device(batch.astype(">u2"), torch.device("cpu"))
    assert swapped.dtype == torch.uint16


# ----------------------------------------------------------------------------- the client


class ZstdServer(ScriptedServer):
    """A scripted server advertising zstd; ``decodes`` False answers as a handler older than
    zstd bodies does (400 "not a .npy file"). Records each request's encoding."""

    def __init__(self, decodes: bool) -> None:
        super().__init__(scores_of)
        self.decodes = decodes
        self.encodings: list[str] = []

    def answer(self, body: bytes) -> Any:
        if body.startswith(b"\x28\xb5\x2f\xfd"):  # the zstd frame magic
            self.encodings.append("zstd")
            if not self.decodes:
                return 400, {"error": "the body is not a .npy file (numpy.save...)", "status": 400}
            body = zstd.decompress(body)
        elif body:
            self.encodings.append("identity")
        else:
            return 200, {**METADATA, "content_encodings": ["zstd"]}
        return super().answer(body)


@pytest.fixture
def zstd_server() -> Any:
    servers: list[ZstdServer] = []

    def start(decodes: bool = True) -> ZstdServer:
        servers.append(ZstdServer(decodes))
        return servers[-1]

    yield start
    for server in servers:
        server.stop()


def test_the_client_sends_zstd_only_to_a_server_that_decodes_it(zstd_server) -> None:
    server = zstd_server()
    with TorchServePredictor(server.url, tiles_per_request=2) as predictor:
        assert predictor.content_encoding == "zstd"
        np.testing.assert_array_equal(predictor.predict(tiles(4))[:, 0], np.arange(4))
    assert server.encodings == ["zstd", "zstd"]
    with TorchServePredictor(server.url, content_encoding="identity") as predictor:
        predictor.predict(tiles(1))
    assert server.encodings[-1] == "identity"


def test_a_host_that_does_not_decode_zstd_gets_the_tiles_again_as_npy(zstd_server) -> None:
    """A mixed fleet in a rollout: no tile is refused for its encoding."""
    server = zstd_server(decodes=False)
    with TorchServePredictor(server.url, tiles_per_request=2) as predictor:
        np.testing.assert_array_equal(predictor.predict(tiles(4))[:, 0], np.arange(4))
    assert sorted(server.encodings) == ["identity"] * 2 + ["zstd"] * 2


def test_zstd_asked_of_a_server_that_does_not_offer_it_is_refused_at_start() -> None:
    server = ScriptedServer(scores_of)  # METADATA without content_encodings: an older handler
    try:
        with TorchServePredictor(server.url) as predictor:
            assert predictor.content_encoding == "identity"
        with pytest.raises(ChipscaleError, match="does not decode zstd"):
            TorchServePredictor(server.url, content_encoding="zstd")
        with pytest.raises(ChipscaleError, match="content_encoding must be one of"):
            TorchServePredictor(server.url, content_encoding="br")
    finally:
        server.stop()


def test_negotiation_without_zstd_here_falls_back_or_says_what_to_install(monkeypatch) -> None:
    monkeypatch.setattr(request_body, "zstd", None)
    assert request_body.negotiate("auto", ["zstd"], "http://h") == "identity"
    with pytest.raises(ChipscaleError, match=r"backports\.zstd"):
        request_body.negotiate("zstd", ["zstd"], "http://h")


# ----------------------------------------------------------------------------- real TorchServe


def test_zstd_through_torchserve_scores_as_npy_and_in_process(
    torchserve, aerial, demo_model_file
) -> None:
    """The production client against the real TorchServe and handler: zstd negotiated by
    default, the same scores as plain ``.npy`` bodies and as the model in-process."""
    images = read_tiles(str(aerial), cover(19, source=str(aerial)))
    batch = np.stack([image.data for _, image in images if not image.is_empty])
    compressed = open_predictor(torchserve.predictions_url)
    plain = open_predictor(torchserve.predictions_url, content_encoding="identity")
    assert isinstance(compressed, TorchServePredictor) and isinstance(plain, TorchServePredictor)
    with compressed, plain, InProcessPredictor(demo_model_file) as local:
        assert (compressed.content_encoding, plain.content_encoding) == ("zstd", "identity")
        scores = compressed.predict(batch)
        np.testing.assert_array_equal(scores, plain.predict(batch))
        np.testing.assert_allclose(scores, local.predict(batch), atol=1e-5, rtol=0)
