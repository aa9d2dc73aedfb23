"""The `dsat` command against a running satellite, the way users run it: a subprocess."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from collections.abc import Callable

import pytest

import dsat
from conftest import RunningSatellite, wait_for

TOPOLOGY = """
[satellite.local]
runtime_dir = "RUNTIME"

[store]
url = "sqlite:///status.db"

[step.double]
call = "cli_steps:double"
entry = true
retries = 0

[step.keep]
kind = "sink"
call = "cli_steps:keep"

[[link]]
from = "double"
to = "keep"
"""

STEPS = """
import time

def double(p):
    time.sleep(p.get("sleep", 0))
    if p.get("fail"):
        raise RuntimeError("asked to fail")
    return {"n": p["n"] * 2}

def keep(p):
    return {"kept": p["n"]}
"""

TASK_ID = re.compile(r"[0-9a-f]{22}")


def dsat_cli(
    running: RunningSatellite, *args: str, timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    """`dsat ARGS -t TOPOLOGY`, in the satellite's directory."""
    return subprocess.run(
        [sys.executable, "-m", "dsat", *args, "-t", str(running.topology)],
        cwd=running.directory,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def ok(result: subprocess.CompletedProcess[str]) -> str:
    assert result.returncode == 0, f"exit {result.returncode}:\n{result.stdout}\n{result.stderr}"
    assert result.stderr == ""
    return result.stdout


def _state_when_known(client: dsat.Client, task_id: str) -> dsat.State | None:
    try:
        return client.state(task_id)
    except dsat.DsatError:  # its first events have not reached the tracker yet
        return None


@pytest.fixture
def running(satellite: Callable[..., RunningSatellite]) -> RunningSatellite:
    return satellite(TOPOLOGY, {"cli_steps": STEPS})


def test_submit_prints_the_task_id_of_a_task_the_satellite_runs(
    running: RunningSatellite,
) -> None:
    out = ok(dsat_cli(running, "submit", "double", '{"n": 21}'))
    assert TASK_ID.fullmatch(out.strip()), out
    task_id = out.strip()
    with running.client() as client:
        wait_for(lambda: _state_when_known(client, task_id), timeout=10)
        assert client.wait(task_id, timeout=30) == {"kept": 42}
        assert client.state(task_id).job_id == task_id  # no --job: its own family


def test_submit_with_wait_prints_the_task_id_then_the_result_as_json(
    running: RunningSatellite,
) -> None:
    out = ok(dsat_cli(running, "submit", "double", '{"n": 5}', "--wait", "10"))
    lines = out.splitlines()
    assert len(lines) == 2, out
    assert TASK_ID.fullmatch(lines[0])
    assert json.loads(lines[1]) == {"kept": 10}


def test_submit_with_wait_of_a_failing_task_exits_1_with_the_error(
    running: RunningSatellite,
) -> None:
    result = dsat_cli(running, "submit", "double", '{"n": 1, "fail": true}', "--wait", "10")
    assert result.returncode == 1
    (task_id,) = result.stdout.splitlines()
    assert TASK_ID.fullmatch(task_id)
    assert result.stderr == (
        f"dsat submit: task {task_id} failed at step double (branch 1) after 1 attempt(s): "
        "RuntimeError: asked to fail\n"
    )


def test_status_prints_the_state_the_result_and_the_whole_history(
    running: RunningSatellite,
) -> None:
    with running.client() as client:
        task_id = client.submit("double", {"n": 4}, job_id="job-s")
        assert client.wait(task_id, timeout=30) == {"kept": 8}
        state = client.state(task_id)

    out = ok(dsat_cli(running, "status", task_id))
    lines = out.splitlines()
    assert lines[0] == f"task     {task_id}  (job job-s)"
    assert lines[1] == "state    HAPPY_END"
    assert lines[2] == "step     keep  attempt 1"
    assert lines[3].startswith("created  ")
    assert lines[4] == 'result   {"kept": 8}'
    assert lines[5].split()[0] == "history"
    history = lines[6:]
    assert len(history) == len(state.history) == 10
    printed = [(int(line.split()[0].lstrip("#")), line.split()[2]) for line in history]
    # in the order things happened, each event with its number in the task's log
    assert printed == [(e.tseq, e.event) for e in state.timeline()]
    assert [event for _, event in printed] == [
        "INIT",
        *["SEND", "ACK", "START", "END"] * 2,
        "HAPPY_END",
    ]
    assert sorted(tseq for tseq, _ in printed) == list(range(1, 11))
    assert "error" not in out


def test_status_json_is_the_whole_state(running: RunningSatellite) -> None:
    with running.client() as client:
        good = client.submit("double", {"n": 3})
        bad = client.submit("double", {"n": 3, "fail": True})
        client.wait(good, timeout=30)
        with pytest.raises(dsat.TaskFailedError):
            client.wait(bad, timeout=30)
        good_state, bad_state = client.state(good), client.state(bad)

    data = json.loads(ok(dsat_cli(running, "status", good, "--json")))
    assert data["task_id"] == good
    assert data["state"] == "HAPPY_END"
    assert data["step"] == "keep"
    assert data["results"] == {"keep": {"kept": 6}}
    assert data["error"] == ""
    assert [(e["tseq"], e["event"], e["step"]) for e in data["history"]] == [
        (e.tseq, e.event, e.step) for e in good_state.history
    ]
    assert data["ended"] == good_state.ended

    data = json.loads(ok(dsat_cli(running, "status", bad, "--json")))
    assert data["state"] == "FAILURE"
    assert data["step"] == "double"
    assert data["error"] == "RuntimeError: asked to fail"
    assert data["results"] == {}
    assert [e["event"] for e in data["history"]] == [e.event for e in bad_state.history]


def test_watch_prints_every_event_until_the_task_ends_then_exits_0(
    running: RunningSatellite,
) -> None:
    task_id = ok(dsat_cli(running, "submit", "double", '{"n": 6, "sleep": 1.0}')).strip()
    started = time.monotonic()
    out = ok(dsat_cli(running, "watch", task_id, "--for", "30"))
    assert time.monotonic() - started < 20
    with running.client() as client:
        state = client.state(task_id)
    assert state.state == "HAPPY_END"
    lines = out.splitlines()
    printed = [(int(line.split()[0].lstrip("#")), line.split()[2]) for line in lines]
    assert [tseq for tseq, _ in printed] == list(range(1, len(state.history) + 1))
    assert printed == [(e.tseq, e.event) for e in state.arrivals]  # as they came
    assert [event for _, event in printed].count("HAPPY_END") == 1


def test_tasks_lists_tasks_by_state_and_by_job(running: RunningSatellite) -> None:
    with running.client() as client:
        first = client.submit_many("double", [{"n": n} for n in range(3)], job_id="J1")
        other = client.submit("double", {"n": 9}, job_id="J2")
        failed = client.submit("double", {"n": 9, "fail": True}, job_id="J1")
        for task_id in [*first, other]:
            client.wait(task_id, timeout=30)
        with pytest.raises(dsat.TaskFailedError):
            client.wait(failed, timeout=30)

    out = ok(dsat_cli(running, "tasks", "--state", "HAPPY_END"))
    lines = out.splitlines()
    assert lines[0].split() == ["task_id", "state", "step", "try", "updated", "error"]
    rows = [line.split() for line in lines[1:]]
    assert sorted(row[0] for row in rows) == sorted([*first, other])
    assert {(row[1], row[2], row[3]) for row in rows} == {("HAPPY_END", "keep", "1")}

    listed = json.loads(ok(dsat_cli(running, "tasks", "--job", "J1", "--json")))
    assert sorted(row["task_id"] for row in listed) == sorted([*first, failed])
    assert {row["job_id"] for row in listed} == {"J1"}
    by_id = {row["task_id"]: row for row in listed}
    assert by_id[failed]["state"] == "FAILURE"
    assert by_id[failed]["error"] == "RuntimeError: asked to fail"
    assert {by_id[t]["state"] for t in first} == {"HAPPY_END"}

    out = ok(dsat_cli(running, "tasks", "--job", "J1", "--state", "FAILURE"))
    assert [line.split()[0] for line in out.splitlines()[1:]] == [failed]
    assert "RuntimeError: asked to fail" in out


def test_an_unknown_task_is_exit_1_with_a_clear_message(running: RunningSatellite) -> None:
    missing = "0" * 22
    result = dsat_cli(running, "status", missing)
    assert result.returncode == 1
    assert result.stdout == ""
    assert result.stderr == f"dsat status: no task {missing} on satellite local\n"

    result = dsat_cli(running, "retry", missing)
    assert result.returncode == 1
    assert result.stdout == ""
    assert result.stderr == (
        f"dsat retry: task {missing} is not a dead letter (it did not fail, or is gone)\n"
    )


def test_submit_to_an_unknown_step_is_exit_1_naming_the_step(running: RunningSatellite) -> None:
    result = dsat_cli(running, "submit", "nowhere", '{"n": 1}')
    assert result.returncode == 1
    assert result.stdout == ""
    assert result.stderr.startswith("dsat submit: ")
    assert "'nowhere'" in result.stderr
    assert "no step" in result.stderr
    assert len(result.stderr.splitlines()) == 1  # a message, not a traceback


def test_a_payload_that_is_not_json_is_exit_1_before_anything_is_sent(
    running: RunningSatellite,
) -> None:
    result = dsat_cli(running, "submit", "double", "{n: 1}")
    assert result.returncode == 1
    assert result.stdout == ""
    assert result.stderr.startswith("dsat submit: payload is not JSON: ")
    with running.client() as client:
        assert client.tasks() == []


@pytest.mark.parametrize(
    "command",
    [
        ("status", "0" * 22),
        ("submit", "double", '{"n": 1}'),
        ("tasks",),
        ("watch", "0" * 22),
    ],
    ids=lambda command: command[0],
)
def test_a_command_with_no_satellite_running_says_so_within_its_timeout(
    satellite: Callable[..., RunningSatellite], command: tuple[str, ...]
) -> None:
    stopped = satellite(TOPOLOGY, {"cli_steps": STEPS}, start=False)
    started = time.monotonic()
    result = dsat_cli(stopped, *command, "--timeout", "1", timeout=30)
    elapsed = time.monotonic() - started
    assert result.returncode == 1
    assert result.stdout == ""
    assert result.stderr.startswith(f"dsat {command[0]}: no answer from the ")
    assert "of satellite local within 1s: is `dsat run` running?" in result.stderr
    assert len(result.stderr.splitlines()) == 1
    assert elapsed < 6  # the 1 s given, plus the interpreter's start
