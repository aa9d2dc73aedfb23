"""`dsat check`, `dsat graph`, `dsat version` and the help texts, run as users run them."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import dsat
from dsat.message import PROTOCOL

ROOT = Path(__file__).resolve().parents[2]
MONITOR = ROOT / "examples" / "monitor" / "topology.toml"

FIVE_MISTAKES = """
[step.clock]
kind = "source"
call = "cli_fns:tick"
every = "soon"

[step.cpu]
call = "cli_fns:work"
workers = { min = 3, max = 2 }

[step.fan]
kind = "router"
call = "cli_fns:work"

[step.csv]
kind = "sink"
call = "cli_fns:work"
wrokers = 2

[[link]]
from = "clock"
to = "cpux"

[[link]]
from = "cpu"
to = "fan"

[[link]]
from = "fan"
to = "csv"
"""

TWO_SATELLITES = """
[satellite.a]
insecure = true
host = "127.0.0.1"
runtime_dir = "rt/a"

[satellite.b]
insecure = true
host = "127.0.0.2"
runtime_dir = "rt/b"

[step.s1]
call = "cli_fns:work"
entry = true
satellite = "a"
workers = { min = 1, max = 3 }

[step.s2]
kind = "sink"
call = "cli_fns:work"
satellite = "b"

[[link]]
from = "s1"
to = "s2"
"""


def dsat_command(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "dsat", *args],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=cwd,
        check=False,
    )


def write_topology(directory: Path, text: str, name: str = "topology.toml") -> Path:
    (directory / "cli_fns.py").write_text(
        "def tick(n):\n    return n\n\n\ndef work(x):\n    return x\n"
    )
    path = directory / name
    path.write_text(text)
    return path


def test_check_says_ok_for_the_monitor_example(tmp_path: Path) -> None:
    result = dsat_command("check", str(MONITOR), cwd=tmp_path)

    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("ok")
    assert "6 steps" in result.stdout
    assert "satellites: local" in result.stdout
    assert result.stderr == ""


def test_check_lists_each_of_five_mistakes_and_exits_1(tmp_path: Path) -> None:
    path = write_topology(tmp_path, FIVE_MISTAKES)
    result = dsat_command("check", str(path), cwd=tmp_path)

    assert result.returncode == 1
    assert result.stdout == ""
    lines = result.stderr.splitlines()
    assert lines[-1] == "5 problems found"
    problems = lines[:-1]
    assert len(problems) == 5, result.stderr
    for line in problems:
        assert line.startswith(f"{path}: "), line
    places = sorted(line.removeprefix(f"{path}: ").split(": ", 1)[0] for line in problems)
    assert places == sorted(
        ["step.clock", "step.cpu", "step.fan", "step.csv", "link clock -> cpux"]
    )
    text = result.stderr
    assert "every: bad duration 'soon'" in text
    assert "workers: need 1 <= min <= max, got 3..2" in text
    assert "a router forwards tasks and runs no function" in text
    assert "unknown field 'wrokers' (did you mean 'workers'?)" in text
    assert "unknown step 'cpux' (did you mean 'cpu'?)" in text


def test_check_reports_a_function_that_does_not_import(tmp_path: Path) -> None:
    text = FIVE_MISTAKES.replace('every = "soon"', 'every = "1s"').replace(
        "workers = { min = 3, max = 2 }", ""
    )
    text = text.replace('kind = "router"\ncall = "cli_fns:work"', 'kind = "router"')
    text = text.replace("wrokers = 2", "").replace('"cpux"', '"cpu"')
    path = write_topology(tmp_path, text.replace("cli_fns:work", "cli_fns:nope", 1))
    result = dsat_command("check", str(path), cwd=tmp_path)

    assert result.returncode == 1
    assert f"{path}: step.cpu: call 'cli_fns:nope': " in result.stderr
    assert "has no attribute nope" in result.stderr
    assert result.stderr.splitlines()[-1] == "1 problem found"


def test_check_of_a_missing_file_exits_1_and_names_the_file(tmp_path: Path) -> None:
    path = tmp_path / "nowhere.toml"
    result = dsat_command("check", str(path), cwd=tmp_path)

    assert result.returncode == 1
    assert result.stderr.startswith(f"{path}: file: cannot read")


def test_graph_prints_a_dot_digraph_with_the_implicit_queue(tmp_path: Path) -> None:
    result = dsat_command("graph", str(MONITOR), cwd=tmp_path)

    assert result.returncode == 0, result.stderr
    dot = result.stdout
    assert dot.startswith("digraph dsat {")
    assert dot.rstrip().endswith("}")
    assert 'subgraph "cluster_local"' in dot
    assert '"local/cpu.queue"' in dot
    assert '"local/cpu.queue" -> "local/cpu"' in dot  # the queue feeds its pool
    assert '"local/clock" -> "local/cpu.queue"' in dot  # links go to the queue
    assert "when rules:cpu_busy" in dot


def test_graph_draws_a_cluster_per_satellite(tmp_path: Path) -> None:
    path = write_topology(tmp_path, TWO_SATELLITES)
    result = dsat_command("graph", str(path), cwd=tmp_path)

    assert result.returncode == 0, result.stderr
    dot = result.stdout
    assert 'subgraph "cluster_a"' in dot
    assert 'subgraph "cluster_b"' in dot
    assert '"a/s1.queue"' in dot
    assert '"a/s1" -> "b/s2"' in dot  # across satellites


def test_graph_of_a_bad_topology_exits_1_with_its_problems(tmp_path: Path) -> None:
    path = write_topology(tmp_path, FIVE_MISTAKES)
    result = dsat_command("graph", str(path), cwd=tmp_path)

    assert result.returncode == 1
    assert result.stdout == ""
    assert f"{path}: link clock -> cpux:" in result.stderr


def test_graph_svg_writes_an_svg_or_says_graphviz_is_missing(tmp_path: Path) -> None:
    out = tmp_path / "out.svg"
    result = dsat_command("graph", str(MONITOR), "--svg", str(out), cwd=tmp_path)

    if shutil.which("dot"):
        assert result.returncode == 0, result.stderr
        assert "<svg" in out.read_text()
    else:
        assert result.returncode != 0
        assert "Graphviz" in result.stderr
        assert "Traceback" not in result.stderr
        assert not out.exists()


@pytest.mark.parametrize(
    ("args", "words"),
    [
        (["--help"], ["check", "graph", "version", "usage: dsat"]),
        (["check", "--help"], ["usage: dsat check", "topology", "every problem"]),
        (["graph", "--help"], ["usage: dsat graph", "DOT", "--svg", "queue"]),
        (["version", "--help"], ["usage: dsat version", "protocol"]),
    ],
    ids=["dsat", "check", "graph", "version"],
)
def test_help_exits_0_and_describes_the_command(args: list[str], words: list[str]) -> None:
    result = dsat_command(*args)

    assert result.returncode == 0, result.stderr
    for word in words:
        assert word in result.stdout


def test_no_command_is_a_usage_error() -> None:
    result = dsat_command()

    assert result.returncode == 2
    assert "usage: dsat" in result.stderr


def test_version_prints_the_package_and_protocol_versions() -> None:
    result = dsat_command("version")

    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == [f"dsat {dsat.__version__}", f"protocol {PROTOCOL}"]
