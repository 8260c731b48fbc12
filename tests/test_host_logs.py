"""Every log file a GPU host writes reaches CloudWatch Logs, whole.

The files are found where they are declared, not listed by hand: log4j2.xml's appenders (under
the unit's ``LOG_LOCATION``), the systemd units' ``StandardOutput``/``StandardError`` files,
and every ``/var/log/...`` path the host scripts name. Each must have its own entry in the
CloudWatch agent's ``collect_list`` (a glob without ``publish_multi_logs`` tails only the
newest matching file) with ``from_beginning: true`` (otherwise the agent starts at the end of
a file that already holds TorchServe's start-up errors).
"""

from __future__ import annotations

import json
import re
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

import pytest
from conftest import ROOT

MODEL_SERVER = ROOT / "model_server"
CW_CONFIG = MODEL_SERVER / "cloudwatch-agent.json"
LOG4J = MODEL_SERVER / "log4j2.xml"
TORCHSERVE_UNIT = MODEL_SERVER / "chipscale-torchserve.service"
#: What log4j2.xml writes its files under: the unit's LOG_LOCATION replaces it on a host.
LOG_LOCATION_REF = re.compile(r"\$\{env:LOG_LOCATION(:-[^}]*)?\}")
VAR_LOG_PATH = re.compile(r"/var/log/[A-Za-z0-9_.\-/]+\.log\b")


def unit_settings(path: Path) -> dict[str, list[str]]:
    """``Key=Value`` lines of a unit file (continuations joined); keys may repeat."""
    settings: dict[str, list[str]] = {}
    for line in path.read_text().replace("\\\n", " ").splitlines():
        line = line.strip()
        if line and not line.startswith(("#", ";", "[")):
            key, _, value = line.partition("=")
            settings.setdefault(key, []).append(value.strip())
    return settings


def log_location() -> str:
    env = dict(v.partition("=")[::2] for v in unit_settings(TORCHSERVE_UNIT)["Environment"])
    return env["LOG_LOCATION"]


def log4j_files() -> set[str]:
    files = set()
    for element in ET.parse(LOG4J).getroot().iter():
        name = element.get("fileName")
        if name:
            files.add(LOG_LOCATION_REF.sub(log_location(), name))
    return files


def unit_files() -> set[str]:
    files = set()
    for unit in MODEL_SERVER.glob("*.service"):
        settings = unit_settings(unit)
        for key in ("StandardOutput", "StandardError"):
            for value in settings.get(key, []):
                kind, _, path = value.partition(":")
                if kind in {"file", "append", "truncate"}:
                    files.add(path)
    return files


def script_files() -> set[str]:
    files = set()
    for script in MODEL_SERVER.glob("*.sh"):
        files.update(VAR_LOG_PATH.findall(script.read_text()))
    return files


def host_log_files() -> set[str]:
    return log4j_files() | unit_files() | script_files()


def collect_list() -> list[dict[str, Any]]:
    config = json.loads(CW_CONFIG.read_text())
    return list(config["logs"]["logs_collected"]["files"]["collect_list"])


def test_the_host_writes_the_files_the_test_expects() -> None:
    """The discovery itself: TorchServe's two log4j files, the unit's console file (the
    launcher's own errors: a missing Java, a bad model store), the boot's cloud-init output."""
    files = host_log_files()
    location = log_location()
    assert {f"{location}/ts_log.log", f"{location}/model_log.log"} <= files
    assert "/var/log/cloud-init-output.log" in files
    assert any(path.startswith(location) for path in unit_files()), (
        "the TorchServe unit's stdout/stderr go to the journal only: the launcher's start-up "
        "errors never reach CloudWatch"
    )


@pytest.mark.parametrize("path", sorted(host_log_files()))
def test_every_host_log_file_is_collected_from_the_beginning(path: str) -> None:
    entries = [e for e in collect_list() if e["file_path"] == path]
    assert len(entries) == 1, f"{path} has no collect_list entry of its own"
    assert entries[0].get("from_beginning") is True, f"{path} is read from its end"


def test_no_entry_is_a_glob_that_tails_only_the_newest_file() -> None:
    for entry in collect_list():
        if any(c in entry["file_path"] for c in "*?["):
            assert entry.get("publish_multi_logs") is True, entry["file_path"]


def test_one_stream_per_instance_and_file() -> None:
    entries = collect_list()
    streams = [e["log_stream_name"] for e in entries]
    assert len(set(streams)) == len(streams)
    for entry in entries:
        assert entry["log_stream_name"] == "{instance_id}/" + Path(entry["file_path"]).name
        assert entry["log_group_name"] == "__CHIPSCALE_LOG_GROUP__"
