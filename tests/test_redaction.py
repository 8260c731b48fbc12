"""No database password on screen: every spelling of a database URL, given by --db or by
DATABASE_URL, to every command that opens a results store (status, download, db-setup, run,
push), with and without -v (debug logs and tracebacks). Issue 14, item 2."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from chipscale.cli import cli
from chipscale.redaction import redact, secrets_of
from chipscale.sources.footprint import cover

#: Nothing listens on port 1: every connection is refused at once.
DEAD = "127.0.0.1:1"

#: (spelling, the pieces of its password that must never be printed, accepted as PostgreSQL)
SPELLINGS = {
    "sqlalchemy-psycopg2": (f"postgresql+psycopg2://u:Kq7SecretPw@{DEAD}/x", ["Kq7SecretPw"], 1),
    "postgres+psycopg": (f"postgres+psycopg://u:Kq7SecretPw@{DEAD}/x", ["Kq7SecretPw"], 1),
    "libpq-keywords": (
        "host=127.0.0.1 port=1 user=u password=Kq7SecretPw dbname=x",
        ["Kq7SecretPw"],
        1,
    ),
    "libpq-quoted": (
        "host=127.0.0.1 port=1 password='Qx7word Zp9word' dbname=x",
        ["Qx7word", "Zp9word"],
        1,
    ),
    "at-in-password": (f"postgresql://u:Wq8head@Vr5tail@{DEAD}/x", ["Wq8head", "Vr5tail"], 0),
    "percent-encoded": (f"postgresql://u:Wq8head%40Vr5tail@{DEAD}/x", ["Wq8head", "Vr5tail"], 1),
    "query-password": (f"postgresql://u@{DEAD}/x?password=Kq7SecretPw", ["Kq7SecretPw"], 1),
    "slash-in-password": (f"postgresql://u:Ab1head/Cd2tail@{DEAD}/x", ["Ab1head", "Cd2tail"], 0),
}
COMMANDS = ("status", "download", "db-setup", "run", "push")


@pytest.fixture(scope="module")
def tiles_file(aerial: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One real tile of the aerial COG, as a tile list."""
    tile = next(iter(cover(18, source=str(aerial))))
    path = tmp_path_factory.mktemp("tiles") / "tiles.txt"
    path.write_text(f"{tile.z}/{tile.x}/{tile.y}\n")
    return path


def command_args(command: str, aerial: Path, tiles: Path, out: Path) -> list[str]:
    """The command line that makes ``command`` open its results store."""
    return {
        "status": ["status"],
        "download": ["download", "-o", str(out / "out.csv")],
        "db-setup": ["db-setup"],
        "run": [
            "run",
            "--source",
            str(aerial),
            "--zoom",
            "18",
            "--tiles",
            str(tiles),
            "--out",
            str(out / "run"),
            "--no-preview",
        ],
        "push": ["push", str(tiles), "--worker-source", "--dry-run", "--resume"],
    }[command]


def assert_hidden(output: str, pieces: list[str]) -> None:
    for piece in pieces:
        assert piece not in output, output


@pytest.mark.parametrize("source", ["--db", "DATABASE_URL"])
@pytest.mark.parametrize("command", COMMANDS)
@pytest.mark.parametrize("spelling", list(SPELLINGS))
def test_no_command_prints_the_password(
    spelling: str, command: str, source: str, aerial: Path, tiles_file: Path, tmp_path: Path
) -> None:
    url, pieces, accepted = SPELLINGS[spelling]
    args = command_args(command, aerial, tiles_file, tmp_path)
    env = {"DATABASE_URL": url} if source == "DATABASE_URL" else {}
    if source == "--db":
        args += ["--db", url]
    result = CliRunner(env=env).invoke(cli, args)
    assert result.exit_code == 1, result.output
    assert "Error:" in result.output
    assert_hidden(result.output, pieces)
    if accepted:  # read as PostgreSQL, and tried: nothing listens there
        assert "Unknown results store URL" not in result.output
        assert "unavailable" in result.output, result.output
    else:  # ambiguous: refused before libpq could read a piece of it as the host
        assert "percent-encode" in result.output, result.output


@pytest.mark.parametrize("command", COMMANDS)
@pytest.mark.parametrize("spelling", ["sqlalchemy-psycopg2", "at-in-password"])
def test_no_password_in_debug_logs_or_tracebacks(
    spelling: str, command: str, aerial: Path, tiles_file: Path, tmp_path: Path
) -> None:
    url, pieces, _ = SPELLINGS[spelling]
    args = ["-v", *command_args(command, aerial, tiles_file, tmp_path)]
    env = {**os.environ, "DATABASE_URL": url}
    done = subprocess.run(
        [sys.executable, "-m", "chipscale.cli", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert done.returncode == 1, done.stderr
    assert "Traceback" in done.stderr  # -v did show the traceback...
    assert_hidden(done.stdout + done.stderr, pieces)  # ...without the password


def test_unknown_scheme_is_refused_without_its_password() -> None:
    result = CliRunner().invoke(cli, ["status", "--db", "mysql://u:Kq7SecretPw@db/x"])
    assert result.exit_code == 1
    assert "Unknown results store URL 'mysql://u:***@db/x'" in result.output
    assert "Kq7SecretPw" not in result.output


@pytest.mark.parametrize(
    "spelling",
    [
        "postgresql+psycopg2://postgres@127.0.0.1:5432/{name}",
        "postgres+psycopg://postgres@127.0.0.1:5432/{name}",
        "host=127.0.0.1 port=5432 user=postgres dbname={name}",
    ],
)
def test_the_common_spellings_open_the_store(spelling: str, results_db: str) -> None:
    url = spelling.format(name=results_db.rsplit("/", 1)[1])
    result = CliRunner().invoke(cli, ["status", "--db", url])
    assert result.exit_code == 0, result.output
    assert "jobs in" in result.output


def test_one_redaction_for_urls_and_dsns() -> None:
    assert redact("postgresql://u:p%40ss@h/db?sslmode=require&password=x") == (
        "postgresql://u:***@h/db?sslmode=require&password=***"
    )
    assert redact("postgres+psycopg://u:a@b@h/db") == "postgres+psycopg://u:***@h/db"
    assert redact("host=h password='a b\\' c' user=u") == "host=h password=*** user=u"
    assert redact("https://u:p@h:81/2/3/1.png?key=SECRET") == "https://h:81/2/3/1.png?..."
    assert redact("sqlite:///out/results.db") == "sqlite:///out/results.db"
    assert {"a b' c"} <= secrets_of("host=h password='a b\\' c'")
    assert {"p@ss", "p%40ss"} <= secrets_of("postgresql://u:p%40ss@h/db")
