"""Missing extras, as a user meets them: the CLI run in a subprocess where an optional module
cannot be imported answers one line naming the extra and the exact pip command (exit 1, no
traceback); and the README's table of which command needs which extra agrees with
pyproject.toml, with those messages and with what `make demo` installs."""

from __future__ import annotations

import contextlib
import importlib.metadata
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
from conftest import ROOT

from chipscale.extras import EXTRA_OF_MODULE, install_command

BIN = Path(sys.executable).parent

#: Imported first by Python (PYTHONPATH), it makes the modules named in CHIPSCALE_BLOCK
#: unimportable, as if not installed.
SITECUSTOMIZE = """\
import os, sys
from importlib.abc import MetaPathFinder

BLOCKED = set(os.environ.get("CHIPSCALE_BLOCK", "").split(","))


class NotInstalled(MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED:
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return None


sys.meta_path.insert(0, NotInstalled())
"""


@pytest.fixture(scope="module")
def blocker(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("blocker")
    (folder / "sitecustomize.py").write_text(SITECUSTOMIZE)
    return folder


def without(
    blocker: Path, modules: str, *argv: str, cwd: Path = ROOT, exe: str = "chipscale"
) -> tuple[subprocess.CompletedProcess[str], Path]:
    """``exe *argv`` (this venv's console script) with ``modules`` unimportable."""
    env = {
        "PATH": f"{BIN}:/usr/bin:/bin",
        "HOME": str(Path.home()),
        "PYTHONPATH": str(blocker),
        "CHIPSCALE_BLOCK": modules,
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_ENDPOINT_URL": "http://127.0.0.1:9",  # nothing is reached: the import fails first
    }
    done = subprocess.run(
        [str(BIN / exe), *argv], cwd=cwd, env=env, capture_output=True, text=True, timeout=300
    )
    return done, cwd


def assert_names_the_extra(ran: tuple[subprocess.CompletedProcess[str], Path], extra: str) -> None:
    """One line on stderr, exit 1: the extra and the exact pip command (as seen from the
    command's cwd: relative paths from the checkout's root, absolute elsewhere)."""
    result, cwd = ran
    with contextlib.chdir(cwd):
        expected = install_command(extra)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    assert len(lines) == 1 and lines[0].startswith("Error: "), result.stderr
    assert f"the '{extra}' extra: " in lines[0], lines[0]
    assert lines[0].endswith(expected), lines[0]


BOTO = "boto3,botocore"
XYZ = "https://tiles.example.com/{z}/{x}/{y}.png"  # a COG source is read before the stack

STACK_COMMANDS = [
    ["push", "--stack", "s", "--bbox", "0,0,0.001,0.001", "--zoom", "18", "--source", XYZ],
    ["status", "--stack", "s"],
    ["download", "--stack", "s", "-o", "results.csv"],
    ["monitor", "--stack", "s"],
    ["tune", "--stack", "s"],
    ["redrive", "--stack", "s"],
    ["verify", "--stack", "s"],
    ["db-setup", "--stack", "s"],
]


@pytest.mark.parametrize("argv", STACK_COMMANDS, ids=[a[0] for a in STACK_COMMANDS])
def test_stack_commands_without_boto3(blocker: Path, argv: list[str], tmp_path: Path) -> None:
    assert_names_the_extra(without(blocker, BOTO, *argv, cwd=tmp_path), "worker")


def test_push_to_a_queue_url_and_sqs_push_without_boto3(blocker: Path, tmp_path: Path) -> None:
    tiles = tmp_path / "tiles.txt"
    tiles.write_text("1-2-3\n")
    queue = "https://sqs.us-east-1.amazonaws.com/123456789012/q"
    push = without(blocker, BOTO, "push", str(tiles), queue, "--source", XYZ)
    assert_names_the_extra(push, "worker")
    assert_names_the_extra(without(blocker, BOTO, str(tiles), queue, exe="sqs-push"), "worker")


def test_run_without_torch(blocker: Path, aerial: Path, tmp_path: Path) -> None:
    result = without(
        blocker, "torch", "run", "--source", str(aerial), "--zoom", "18", "--out", str(tmp_path)
    )
    assert_names_the_extra(result, "local")
    assert not (tmp_path / "results.csv").exists()


def test_run_without_matplotlib_says_so_before_the_work(
    blocker: Path, aerial: Path, tmp_path: Path
) -> None:
    argv = ["run", "--source", str(aerial), "--zoom", "18", "--out", str(tmp_path)]
    result = without(blocker, "matplotlib", *argv)
    assert_names_the_extra(result, "local")
    assert "--no-preview" in result[0].stderr
    assert not (tmp_path / "results.db").exists()


def test_db_setup_without_psycopg(blocker: Path) -> None:
    result = without(blocker, "psycopg", "db-setup", "--db", "postgresql://u@127.0.0.1:9/x")
    assert_names_the_extra(result, "worker")


def test_parquet_download_without_pyarrow(blocker: Path, tmp_path: Path) -> None:
    db = f"sqlite:///{tmp_path / 'r.db'}"
    setup = without(blocker, "", "db-setup", "--db", db)
    assert setup[0].returncode == 0, setup[0].stderr
    out = tmp_path / "r.parquet"
    assert_names_the_extra(
        without(blocker, "pyarrow", "download", "--db", db, "-o", str(out)), "parquet"
    )
    assert not out.exists()


@pytest.mark.parametrize("module", ["model_archiver", "torch"])
def test_model_package_without_the_model_extra(
    blocker: Path, demo_model_file: Path, tmp_path: Path, module: str
) -> None:
    result = without(blocker, module, "model", "package", str(demo_model_file), "-o", str(tmp_path))
    assert_names_the_extra(result, "model")


def test_serve_without_torchserve(blocker: Path, demo_model_file: Path, tmp_path: Path) -> None:
    result = without(blocker, "ts", "serve", str(demo_model_file), "--port", "9", cwd=tmp_path)
    assert_names_the_extra(result, "model")


# ----------------------------------------------------------------------------- README table


def pyproject_extras() -> dict[str, list[str]]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    return project["optional-dependencies"]


def readme_extras_table() -> list[tuple[str, str, str]]:
    """(command, extra, install line) rows of the README's table of extras."""
    text = (ROOT / "README.md").read_text()
    rows = re.findall(r"^\| (.+?) \| `(\w+)` \| `(.+?)` \|$", text, flags=re.M)
    assert rows, "the README has a table: command | extra | install line"
    return rows


def test_the_readme_table_matches_pyproject_and_the_messages(monkeypatch) -> None:
    monkeypatch.chdir(ROOT)  # the README's lines are run from the checkout's root
    extras = pyproject_extras()
    table = readme_extras_table()
    for _command, extra, line in table:
        assert extra in extras, extra
        assert line == install_command(extra) == f".venv/bin/pip install -e '.[{extra}]'"
    assert {extra for _, extra, _ in table} == set(EXTRA_OF_MODULE.values())


def test_every_optional_module_comes_with_its_extra() -> None:
    """EXTRA_OF_MODULE's modules are what pyproject's extras install (directly or as the
    dependency of one)."""
    extras = pyproject_extras()
    distributions = importlib.metadata.packages_distributions()
    for module, extra in EXTRA_OF_MODULE.items():
        names = {_name(r) for r in extras[extra]}
        names |= {_name(r) for n in list(names) for r in importlib.metadata.requires(n) or ()}
        assert {_name(d) for d in distributions[module]} & names, (module, extra)


def test_make_demo_installs_what_the_readme_commands_need() -> None:
    extras = pyproject_extras()
    needed = {extra for _, extra, _ in readme_extras_table()}
    assert {f"chipscale[{','.join(sorted(needed))}]"} == set(extras["cli"]), extras["cli"]
    makefile = (ROOT / "Makefile").read_text()
    demo = re.search(r"^demo: (\S+)", makefile, flags=re.M)
    assert demo and demo.group(1) == "$(VENV)/.installed-cli"
    assert "$(BIN)/pip install --quiet -e '.[cli]'" in makefile
    assert "make installs it" not in (ROOT / "README.md").read_text()


def _name(requirement: str) -> str:
    return re.split(r"[\s\[<>=!~;]", requirement, maxsplit=1)[0].lower().replace("_", "-")
