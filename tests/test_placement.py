"""Placement (issue 17, item 5): on a GPU host a worker without a GPU refuses to start, the
metadata answer reports each worker's device, and `verify` fails a stack endpoint whose
workers are not on a GPU. No GPU here: a "GPU host" is the environment its unit sets."""

from __future__ import annotations

import importlib
import json
from pathlib import Path
from types import ModuleType, SimpleNamespace
from typing import Any

import pytest
import torch

from chipscale.models.serving import MODEL_SERVER_DIR, ServingError, TorchServe
from chipscale.ops.checks import CHECK_ENDPOINT, CheckFailed
from chipscale.ops.private_checks import check_endpoint, check_placement, verify_action

UNIT = MODEL_SERVER_DIR / "chipscale-torchserve.service"


@pytest.fixture
def handler(monkeypatch: pytest.MonkeyPatch) -> ModuleType:
    """The handler module as TorchServe imports it (flat, from the .mar directory)."""
    monkeypatch.syspath_prepend(str(MODEL_SERVER_DIR))
    monkeypatch.delenv("CHIPSCALE_GPU_HOST", raising=False)
    return importlib.import_module("chipscale_handler")


class Context:
    """What TorchServe hands ``initialize`` and ``handle``."""

    def __init__(self, model_file: Path, gpu_id: int | None) -> None:
        props = {"model_dir": str(model_file.parent)}
        if gpu_id is not None:
            props["gpu_id"] = str(gpu_id)
        self.system_properties = props
        self.manifest = {"model": {"serializedFile": model_file.name}}
        self.model_yaml_config: dict[str, Any] = {}

    def set_response_content_type(self, i: int, kind: str) -> None:
        pass

    def set_response_status(self, code: int, phrase: str, idx: int = 0) -> None:
        pass


def test_the_gpu_hosts_unit_declares_a_gpu_host() -> None:
    assert "Environment=CHIPSCALE_GPU_HOST=1" in UNIT.read_text().splitlines()


def test_a_worker_without_a_gpu_on_a_gpu_host_refuses_to_start(
    handler: ModuleType, demo_model_file: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    service = handler.ChipscaleHandler()
    service.initialize(Context(demo_model_file, gpu_id=None))  # not a GPU host: the CPU
    assert service.runtime.device == torch.device("cpu")
    monkeypatch.setenv("CHIPSCALE_GPU_HOST", "1")
    with pytest.raises(handler.rt.ModelRuntimeError, match=r"no gpu_id.*refusing to serve"):
        handler.ChipscaleHandler().initialize(Context(demo_model_file, gpu_id=None))
    if not torch.cuda.is_available():  # TorchServe saw a GPU torch cannot use
        with pytest.raises(handler.rt.ModelRuntimeError, match="gpu_id 0 but torch sees no"):
            handler.ChipscaleHandler().initialize(Context(demo_model_file, gpu_id=0))


def test_the_metadata_answer_reports_the_workers_device(
    handler: ModuleType, demo_model_file: Path
) -> None:
    service = handler.ChipscaleHandler()
    context = Context(demo_model_file, gpu_id=None)
    service.initialize(context)
    [answer] = service.handle([{"body": b""}], context)
    worker = json.loads(answer)["worker"]
    assert worker["device"] == "cpu" and worker["gpu_host"] is False
    assert worker["precision"] == "fp32" and worker["pid"] > 0


# A GPU worker on its GPU (set_device, the device it reports) is measured by
# bench/gpu_serving.py's placement section on a lent GPU: no test here skips for want of one.


def test_torchserve_on_a_gpu_host_without_gpus_never_gets_ready(
    demo_mar: Path, tmp_path: Path
) -> None:
    # No GPU visible to the workers, on any machine: the flag alone must stop them.
    hidden = {"CHIPSCALE_GPU_HOST": "1", "CUDA_VISIBLE_DEVICES": ""}
    server = TorchServe.on_free_ports(demo_mar, tmp_path, extra_env=hidden)
    with pytest.raises(ServingError, match="not READY"):
        server.start(timeout=25)
    logs = "".join(p.read_text(errors="replace") for p in (tmp_path / "logs").glob("*.log"))
    assert "refusing to serve on the CPU" in logs


def test_verify_fails_a_stack_endpoint_whose_workers_are_not_on_a_gpu(torchserve: Any) -> None:
    url = torchserve.predictions_url
    # `chipscale verify --endpoint URL` alone (a local serve): the devices are reported
    direct = check_endpoint(url, probes=4)
    assert direct.ok and "1 worker seen on cpu, precision fp32" in direct.detail
    # a stack's endpoint is its GPU fleet (what the operations Lambda answers)
    [endpoint, _] = verify_action(url, None)
    assert endpoint["name"] == CHECK_ENDPOINT and not endpoint["ok"]
    assert "1 worker seen on cpu; not on a GPU:" in endpoint["detail"]


def test_verify_names_a_handler_that_does_not_report_its_device() -> None:
    old = {"model": "m", "version": "1", "metadata": {}}  # a handler before issue 17
    predictor = SimpleNamespace(worker={}, read_metadata=lambda: old)
    with pytest.raises(CheckFailed, match="older than issue 17 does not report its device"):
        check_placement(predictor, "http://fleet", require_gpu=True, probes=2)
    assert check_placement(predictor, "http://fleet", require_gpu=False, probes=2) == (
        "1 worker seen on unknown"
    )
