"""The topology: loading, whole-file validation, the model and the socket plan."""

from __future__ import annotations

import importlib
import itertools
import json
import math
import os
import re
import shutil
import stat
import sys
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dsat.errors import Problem, TopologyError
from dsat.topology import (
    IPC_PATH_LIMIT,
    LOCAL,
    Kind,
    Link,
    Pattern,
    Plan,
    Role,
    Topology,
    Workers,
    ensure_private_dir,
    get_connection,
    load_topology,
    parse_duration,
)

USER_PREFIX = "dsat_user_"  # every module a test writes starts with this, so it can be unloaded
_serial = itertools.count()

Write = Callable[..., str]
MakeModule = Callable[[str], str]

FNS_SOURCE = """
def tick(n):
    return {"tick": n}

def work(x):
    return x

def keep(x):
    return True

NOT_CALLABLE = 3
"""

# a valid pipeline: clock (source) -> cpu (pool) -> csv (sink); FNS is the user module
PIPELINE = """
[step.clock]
kind = "source"
call = "FNS:tick"
every = "2s"

[step.cpu]
call = "FNS:work"

[step.csv]
kind = "sink"
call = "FNS:work"

[[link]]
from = "clock"
to = "cpu"

[[link]]
from = "cpu"
to = "csv"
"""


@pytest.fixture(autouse=True)
def _isolate_imports() -> Iterator[None]:
    """load_topology puts the topology's directory on sys.path and imports user code: undo both."""
    path = list(sys.path)
    modules = set(sys.modules)
    yield
    sys.path[:] = path
    for name in set(sys.modules) - modules:
        if name.startswith(USER_PREFIX):
            del sys.modules[name]


@pytest.fixture
def make_module(tmp_path: Path, request: pytest.FixtureRequest) -> MakeModule:
    """Write a user module next to the topology; return its (unique) name."""

    def make(source: str) -> str:
        test = re.sub(r"[^A-Za-z0-9_]", "_", request.node.name)[:40]
        name = f"{USER_PREFIX}{test}_{next(_serial)}"
        (tmp_path / f"{name}.py").write_text(source)
        importlib.invalidate_caches()  # the directory may already be scanned
        return name

    return make


@pytest.fixture
def fns(make_module: MakeModule) -> str:
    """A user module with tick, work and keep functions, and NOT_CALLABLE."""
    return make_module(FNS_SOURCE)


@pytest.fixture
def write(tmp_path: Path, fns: str) -> Write:
    """Write a topology file into tmp_path (FNS stands for the user module); return its path."""

    def write(text: str, name: str = "topology.toml") -> str:
        path = tmp_path / name
        path.write_text(text.replace("FNS", fns))
        return str(path)

    return write


@pytest.fixture
def short_dir() -> Iterator[str]:
    """A short directory under /tmp for runtime dirs: ipc paths are limited to ~100 bytes."""
    path = tempfile.mkdtemp(prefix="dst-", dir="/tmp")
    yield path
    shutil.rmtree(path, ignore_errors=True)


def problems_of(path: str, **options: Any) -> list[Problem]:
    with pytest.raises(TopologyError) as caught:
        load_topology(path, **options)
    found = list(caught.value.problems)
    assert found, "a TopologyError must list at least one problem"
    assert str(caught.value) == "\n".join(str(p) for p in found)
    for problem in found:
        assert problem.file == path
    return found


def has(found: list[Problem], where: str, *fragments: str) -> bool:
    return any(p.where == where and all(f in p.reason for f in fragments) for p in found)


def show(found: list[Problem]) -> str:
    return "\n".join(str(p) for p in found)


# ---------------------------------------------------------------------------
# loading


def test_toml_and_json_with_the_same_content_load_to_equal_topologies(
    write: Write, fns: str, short_dir: str
) -> None:
    toml_path = write(
        f"""
[satellite.local]
runtime_dir = "{short_dir}"

[defaults]
timeout = "5s"

[step.clock]
kind = "source"
call = "FNS:tick"
every = "250ms"

[step.cpu]
call = "FNS:work"
workers = {{ min = 1, max = 4 }}
options = {{ host = "a" }}

[step.csv]
kind = "sink"
call = "FNS:work"

[[link]]
from = "clock"
to = "cpu"

[[link]]
from = "cpu"
to = "csv"
pattern = "pub"
when = "FNS:keep"
"""
    )
    document = {
        "satellite": {"local": {"runtime_dir": short_dir}},
        "defaults": {"timeout": "5s"},
        "step": {
            "clock": {"kind": "source", "call": f"{fns}:tick", "every": "250ms"},
            "cpu": {
                "call": f"{fns}:work",
                "workers": {"min": 1, "max": 4},
                "options": {"host": "a"},
            },
            "csv": {"kind": "sink", "call": f"{fns}:work"},
        },
        "link": [
            {"from": "clock", "to": "cpu"},
            {"from": "cpu", "to": "csv", "pattern": "pub", "when": f"{fns}:keep"},
        ],
    }
    json_path = write(json.dumps(document), name="topology.json")

    from_toml = load_topology(toml_path)
    from_json = load_topology(json_path)

    assert from_toml.path == toml_path
    assert from_json.path == json_path
    assert from_toml.satellites == from_json.satellites
    assert from_toml.steps == from_json.steps
    assert from_toml.links == from_json.links
    assert from_toml.store == from_json.store
    assert from_toml.defaults == from_json.defaults
    assert from_toml.python_path == from_json.python_path
    assert from_toml.links[1] == Link("cpu", "csv", Pattern.PUB, f"{fns}:keep")
    assert from_toml.steps["cpu"].options == {"host": "a"}


def test_a_topology_without_satellites_runs_on_an_implicit_local_satellite(write: Write) -> None:
    topology = load_topology(write(PIPELINE))

    assert list(topology.satellites) == [LOCAL]
    local = topology.satellites[LOCAL]
    assert local.name == LOCAL
    assert local.runtime_dir  # a default, short, private directory
    assert all(step.satellites == (LOCAL,) for step in topology.steps.values())


def test_a_step_without_satellite_runs_on_the_first_satellite_defined(write: Write) -> None:
    path = write(
        """
[satellite.alpha]
insecure = true
[satellite.beta]
insecure = true
host = "127.0.0.2"

[step.cpu]
call = "FNS:work"
entry = true

[step.csv]
kind = "sink"
call = "FNS:work"
satellite = "beta"

[[link]]
from = "cpu"
to = "csv"
"""
    )
    topology = load_topology(path)

    assert topology.steps["cpu"].satellites == ("alpha",)
    assert topology.steps["csv"].satellites == ("beta",)
    assert [s.name for s in topology.hosted("beta")] == ["csv"]


def test_defaults_apply_to_every_step_and_a_steps_own_field_wins(write: Write) -> None:
    text = PIPELINE.replace("[step.csv]\n", '[step.csv]\ntimeout = "1m"\nretries = 0\n')
    defaults = """
[defaults]
timeout = "5s"
retries = 7
backoff = "100ms"
serialization = "json"
max_queue = 50
"""
    path = write(text + defaults)
    topology = load_topology(path)

    cpu = topology.steps["cpu"]
    assert (cpu.timeout, cpu.retries, cpu.backoff) == (5.0, 7, 0.1)
    assert (cpu.serialization, cpu.max_queue) == ("json", 50)
    csv = topology.steps["csv"]
    assert (csv.timeout, csv.retries, csv.backoff) == (60.0, 0, 0.1)
    assert topology.defaults.timeout == 5.0


def test_max_live_defaults_to_ten_thousand_and_must_be_positive(write: Write) -> None:
    assert load_topology(write(PIPELINE)).defaults.max_live == 10_000
    assert load_topology(write(PIPELINE + "[defaults]\nmax_live = 50\n")).defaults.max_live == 50

    found = problems_of(write(PIPELINE + "[defaults]\nmax_live = 0\n"))

    assert has(found, "defaults", "max_live: need 1 <= max_live <= 100000000, got 0"), show(found)


def test_steps_without_defaults_get_the_documented_ones(write: Write) -> None:
    cpu = load_topology(write(PIPELINE)).steps["cpu"]

    assert cpu.kind is Kind.POOL
    assert cpu.workers == Workers(1, 1)
    assert (cpu.timeout, cpu.retries, cpu.backoff) == (30.0, 2, 0.5)
    assert cpu.serialization == "msgpack"
    assert cpu.entry is False


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("250ms", 0.25), ("2s", 2.0), ("1.5m", 90.0), (3, 3.0), ("1h", 3600.0), ("1d", 86400.0)],
)
def test_durations_are_parsed_to_float_seconds_once_at_load(
    write: Write, text: str | int, seconds: float
) -> None:
    value = json.dumps(text)
    path = write(PIPELINE.replace('every = "2s"', f"every = {value}\ntimeout = {value}"))
    clock = load_topology(path).steps["clock"]

    assert clock.every == seconds
    assert clock.timeout == seconds
    assert type(clock.every) is float
    assert type(clock.timeout) is float
    assert parse_duration(text) == seconds


@pytest.mark.parametrize(
    "value",
    ["fast", "", "2 weeks", "-1s", -1, True, "1e3s", math.inf, math.nan, [1], 10**400],
    ids=lambda value: repr(value)[:12],
)
def test_a_bad_duration_raises_value_error(value: object) -> None:
    with pytest.raises(ValueError, match="bad duration"):
        parse_duration(value)


@pytest.mark.parametrize(
    ("workers", "expected"),
    [
        ("3", Workers(3, 3)),
        ("{ min = 1, max = 4 }", Workers(1, 4)),
        ("{ min = 2 }", Workers(2, 2)),
        ("{ max = 5 }", Workers(1, 5)),
    ],
)
def test_workers_is_a_number_or_a_min_max_table(
    write: Write, workers: str, expected: Workers
) -> None:
    path = write(
        PIPELINE.replace('call = "FNS:work"\n', f'call = "FNS:work"\nworkers = {workers}\n', 1)
    )

    assert load_topology(path).steps["cpu"].workers == expected


def test_a_step_with_every_and_no_kind_is_a_source(write: Write) -> None:
    path = write(PIPELINE.replace('kind = "source"\n', ""))

    clock = load_topology(path).steps["clock"]
    assert clock.kind is Kind.SOURCE
    assert clock.every == 2.0


def test_relative_store_and_state_paths_are_relative_to_the_topology_file(
    write: Write, tmp_path: Path
) -> None:
    path = write(PIPELINE + '\n[store]\nurl = "sqlite:///data/status.db"\n')
    topology = load_topology(path)

    assert topology.store.url == f"sqlite:///{tmp_path}/data/status.db"
    assert topology.state_dir(LOCAL) == str(tmp_path / ".dsat" / LOCAL)
    assert topology.store_url(LOCAL) == f"sqlite:///{tmp_path}/data/status.db"


def test_the_store_url_defaults_to_sqlite_in_each_satellites_state_dir(write: Write) -> None:
    topology = load_topology(write(PIPELINE))

    assert topology.store_url(LOCAL) == "sqlite:///" + os.path.join(
        topology.state_dir(LOCAL), "status.db"
    )


def test_a_topology_is_frozen(write: Write) -> None:
    topology = load_topology(write(PIPELINE))

    with pytest.raises(AttributeError):
        topology.path = "elsewhere"  # type: ignore[misc]
    with pytest.raises(AttributeError):
        topology.steps["cpu"].call = "x:y"  # type: ignore[misc]


def test_the_default_runtime_dir_fits_ipc_paths_for_an_ordinary_user(
    write: Write, monkeypatch: pytest.MonkeyPatch
) -> None:
    # a desktop session: uid 1000 and XDG_RUNTIME_DIR=/run/user/1000
    monkeypatch.setattr(os, "getuid", lambda: 1000)
    monkeypatch.setenv("XDG_RUNTIME_DIR", "/run/user/1000")
    topology = load_topology(write(PIPELINE))

    runtime = topology.runtime_dir(LOCAL)
    assert runtime.startswith("/run/user/1000/")
    plans = [get_connection(topology, node.name) for node in topology.nodes(LOCAL)]
    for address in _addresses(plans):
        assert len(address.removeprefix("ipc://").encode()) <= IPC_PATH_LIMIT


def test_the_default_runtime_dir_fits_ipc_paths_without_xdg_runtime_dir(
    write: Write, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(os, "getuid", lambda: 1000)
    monkeypatch.delenv("XDG_RUNTIME_DIR", raising=False)

    topology = load_topology(write(PIPELINE))
    assert topology.runtime_dir(LOCAL).startswith("/tmp/")


def test_the_default_runtime_dir_differs_per_topology_file_and_satellite(
    write: Write,
) -> None:
    first = load_topology(write(PIPELINE, name="one.toml"))
    second = load_topology(write(PIPELINE, name="two.toml"))

    assert first.runtime_dir(LOCAL) != second.runtime_dir(LOCAL)


# ---------------------------------------------------------------------------
# validation: every problem, with its place


def test_every_bad_field_is_reported_at_once(write: Write) -> None:
    path = write(
        """
[step.clock]
kind = "source"
call = "FNS:tick"

[step.cpu]
call = "FNS:work"
workers = "x"
timeout = "fast"
wrokers = 2

[step.big]
call = "FNS:work"
workers = { min = 3, max = 2 }

[step.fan]
kind = "router"
call = "FNS:work"

[step.csv]
kind = "sink"
call = "FNS:work"
retries = "2"

[[link]]
from = "clock"
to = "cpux"

[[link]]
from = "cpu"
to = "csv"
"""
    )
    found = problems_of(path)

    expected = [
        ("step.clock", "every: a source needs a period"),
        ("step.cpu", "workers: need a number or {min, max}"),
        ("step.cpu", "timeout: bad duration 'fast'"),
        ("step.cpu", "unknown field 'wrokers' (did you mean 'workers'?)"),
        ("step.big", "workers: need 1 <= min <= max, got 3..2"),
        ("step.fan", "call: a router forwards tasks and runs no function"),
        ("step.csv", "retries: need int, got str '2'"),
        ("link clock -> cpux", "to: unknown step 'cpux' (did you mean 'cpu'?)"),
        # the graph is checked too, on what did load: these two have no link at all
        ("step.big", "pool with no input"),
        ("step.fan", "router with no input"),
    ]
    for where, reason in expected:
        assert has(found, where, reason), f"{where}: {reason} not in\n{show(found)}"
    assert len(found) == len(expected), show(found)


def test_an_unknown_step_in_a_link_is_reported_with_a_suggestion(write: Write) -> None:
    path = write(PIPELINE.replace('from = "cpu"', 'from = "cpux"'))
    found = problems_of(path)

    assert has(found, "link cpux -> csv", "from: unknown step 'cpux'", "did you mean 'cpu'?")


def test_an_unknown_step_far_from_every_name_gets_no_suggestion(write: Write) -> None:
    path = write(PIPELINE.replace('to = "csv"', 'to = "zzzzzz"'))
    found = problems_of(path)

    assert has(found, "link cpu -> zzzzzz", "to: unknown step 'zzzzzz'")
    assert "did you mean" not in show(found)


def test_a_link_without_from_or_to_is_reported(write: Write) -> None:
    path = write(PIPELINE + '\n[[link]]\nfrom = "cpu"\n')
    found = problems_of(path)

    assert has(found, "link cpu -> ?", "to: missing")


def test_a_duplicate_step_name_in_json_is_reported_for_the_file(write: Write) -> None:
    text = (
        '{"step": {"cpu": {"call": "FNS:work", "entry": true},'
        ' "cpu": {"call": "FNS:work", "entry": true}}}'
    )
    path = write(text, name="topology.json")
    found = problems_of(path)

    assert [(p.where, p.reason) for p in found] == [("file", "duplicate name 'cpu'")]


def test_a_duplicate_toml_table_is_a_parse_error_reported_for_the_file(write: Write) -> None:
    path = write(PIPELINE + '\n[step.cpu]\ncall = "FNS:work"\n')
    found = problems_of(path)

    assert len(found) == 1
    assert has(found, "file", "not valid TOML")


def test_invalid_json_and_a_json_array_are_reported_for_the_file(write: Write) -> None:
    assert has(problems_of(write("{", name="a.json")), "file", "not valid JSON")
    assert has(problems_of(write("[]", name="b.json")), "file", "top level must be an object")


def test_a_file_that_is_not_utf8_is_reported_for_the_file(tmp_path: Path) -> None:
    path = tmp_path / "topology.toml"
    path.write_bytes(b'[step.caf\xe9]\ncall = "x:y"\n')

    assert has(problems_of(str(path)), "file", "not UTF-8")


def test_a_missing_file_is_reported_for_the_file(tmp_path: Path) -> None:
    path = str(tmp_path / "nowhere.toml")

    assert has(problems_of(path), "file", "cannot read")


def test_a_detached_cycle_is_unreachable(write: Write) -> None:
    path = write(
        PIPELINE
        + """
[step.a]
call = "FNS:work"

[step.b]
call = "FNS:work"

[[link]]
from = "a"
to = "b"

[[link]]
from = "b"
to = "a"
"""
    )
    found = problems_of(path)

    assert has(found, "step.a", "unreachable")
    assert has(found, "step.b", "unreachable")
    assert len(found) == 2, show(found)


def test_what_an_unfed_step_feeds_is_not_reported_again(write: Write) -> None:
    path = write(
        PIPELINE
        + """
[step.a]
call = "FNS:work"

[step.b]
kind = "sink"
call = "FNS:work"

[[link]]
from = "a"
to = "b"
"""
    )
    found = problems_of(path)

    assert has(found, "step.a", "pool with no input")
    assert not has(found, "step.b", "unreachable"), "one mistake, one problem"


@pytest.mark.parametrize(
    ("kind", "extra"), [("pool", ""), ("sink", 'kind = "sink"'), ("router", 'kind = "router"')]
)
def test_a_step_with_no_input_is_reported(write: Write, kind: str, extra: str) -> None:
    call = "" if kind == "router" else 'call = "FNS:work"'
    path = write(PIPELINE + f"\n[step.lonely]\n{extra}\n{call}\n")
    found = problems_of(path)

    assert has(found, "step.lonely", f"{kind} with no input", "entry = true")
    assert len(found) == 1, show(found)


def test_an_entry_step_needs_no_link_to_it(write: Write) -> None:
    path = write(PIPELINE + '\n[step.lonely]\ncall = "FNS:work"\nentry = true\n')

    assert load_topology(path).steps["lonely"].entry is True


def test_a_source_without_a_link_is_reported(write: Write) -> None:
    path = write(PIPELINE + '\n[step.idle]\nkind = "source"\ncall = "FNS:tick"\nevery = 1\n')

    assert has(problems_of(path), "step.idle", "a source with no link")


def test_a_source_cannot_be_an_entry(write: Write) -> None:
    path = write(PIPELINE.replace('every = "2s"', 'every = "2s"\nentry = true'))

    assert has(problems_of(path), "step.clock", "entry: a source takes no submissions")


def test_a_source_without_every_is_reported(write: Write) -> None:
    path = write(PIPELINE.replace('every = "2s"\n', ""))

    assert has(problems_of(path), "step.clock", "every: a source needs a period")


def test_every_on_a_step_that_is_not_a_source_is_reported(write: Write) -> None:
    path = write(PIPELINE.replace("[step.cpu]\n", '[step.cpu]\nevery = "1s"\nkind = "pool"\n'))

    assert has(problems_of(path), "step.cpu", "every: only sources have a period")


def test_a_router_with_a_call_is_reported(write: Write) -> None:
    path = write(PIPELINE.replace("[step.cpu]\n", '[step.cpu]\nkind = "router"\n'))

    assert has(problems_of(path), "step.cpu", "a router forwards tasks and runs no function")


def test_a_pool_or_sink_without_a_call_is_reported(write: Write) -> None:
    path = write(PIPELINE.replace('call = "FNS:work"\n', ""))
    found = problems_of(path)

    assert has(found, "step.cpu", "call: a pool needs a function")
    assert has(found, "step.csv", "call: a sink needs a function")


def test_links_into_a_source_to_itself_and_twice_are_reported(write: Write) -> None:
    path = write(
        PIPELINE
        + """
[[link]]
from = "cpu"
to = "clock"

[[link]]
from = "csv"
to = "csv"

[[link]]
from = "cpu"
to = "csv"
"""
    )
    found = problems_of(path)

    assert has(found, "link cpu -> clock", "'clock' is a source; sources take no input")
    assert has(found, "link csv -> csv", "cannot link to itself")
    assert has(found, "link cpu -> csv", "duplicate link")
    assert len(found) == 3, show(found)


@pytest.mark.parametrize(
    ("module_source", "attribute", "reason"),
    [
        (None, "work", "No module named"),
        ("def other(x):\n    return x\n", "work", "has no attribute work"),
        ("work = 3\n", "work", "is a int, not a callable"),
        ("raise RuntimeError('boom at import')\n", "work", "RuntimeError: boom at import"),
        ("def work(:\n", "work", "SyntaxError"),
    ],
    ids=["missing-module", "no-such-attribute", "not-callable", "raises-at-import", "syntax-error"],
)
def test_a_call_that_does_not_resolve_is_reported_for_its_step(
    write: Write,
    make_module: MakeModule,
    module_source: str | None,
    attribute: str,
    reason: str,
) -> None:
    name = make_module(module_source) if module_source else f"{USER_PREFIX}absent_{next(_serial)}"
    path = write(PIPELINE.replace('call = "FNS:work"', f'call = "{name}:{attribute}"', 1))
    found = problems_of(path)

    assert has(found, "step.cpu", f"call '{name}:{attribute}'", reason), show(found)
    assert len(found) == 1, show(found)


def test_a_when_that_does_not_import_is_reported_for_its_link(write: Write) -> None:
    missing = f"{USER_PREFIX}absent_{next(_serial)}"
    path = write(PIPELINE.replace('to = "csv"', f'to = "csv"\nwhen = "{missing}:keep"'))
    found = problems_of(path)

    assert has(found, "link cpu -> csv", f"when '{missing}:keep'", "No module named")


def test_every_function_that_does_not_resolve_is_reported_at_once(write: Write) -> None:
    path = write(
        PIPELINE.replace('call = "FNS:tick"', 'call = "FNS:nope"')
        .replace('call = "FNS:work"', 'call = "FNS:NOT_CALLABLE"', 1)
        .replace('to = "csv"', 'to = "csv"\nwhen = "FNS:missing"')
    )
    found = problems_of(path)

    assert has(found, "step.clock", "has no attribute nope")
    assert has(found, "step.cpu", "not a callable")
    assert has(found, "link cpu -> csv", "has no attribute missing")
    assert len(found) == 3, show(found)


def test_a_malformed_call_or_when_is_reported_without_importing(write: Write) -> None:
    path = write(
        PIPELINE.replace('call = "FNS:work"', 'call = "just_a_name"', 1).replace(
            'to = "csv"', 'to = "csv"\nwhen = "1bad:x"'
        )
    )
    found = problems_of(path)

    assert has(found, "step.cpu", "call: 'just_a_name': need 'module:function'")
    assert has(found, "link cpu -> csv", "when: '1bad:x': need 'module:function'")


def test_functions_are_imported_from_the_topologys_directory_and_path(
    tmp_path: Path, write: Write
) -> None:
    (tmp_path / "lib").mkdir()
    name = f"{USER_PREFIX}in_lib_{next(_serial)}"
    (tmp_path / "lib" / f"{name}.py").write_text("def work(x):\n    return x\n")
    importlib.invalidate_caches()
    path = write('path = ["lib"]\n' + PIPELINE.replace('"FNS:work"', f'"{name}:work"', 1))

    topology = load_topology(path)
    assert topology.python_path == (str(tmp_path / "lib"), str(tmp_path))
    assert topology.steps["cpu"].call == f"{name}:work"


def test_check_imports_false_skips_importing_functions(write: Write) -> None:
    missing = f"{USER_PREFIX}absent_{next(_serial)}"
    path = write(PIPELINE.replace('"FNS:work"', f'"{missing}:work"'))

    assert load_topology(path, check_imports=False).steps["cpu"].call == f"{missing}:work"
    assert missing not in sys.modules


@pytest.mark.parametrize(
    ("workers", "reason"),
    [
        ("{ min = 3, max = 2 }", "need 1 <= min <= max, got 3..2"),
        ("{ max = 0 }", "need 1 <= min <= max, got 1..0"),
        ("{ min = 0, max = 2 }", "need 1 <= min <= max, got 0..2"),
        ("0", "need 1 <= min <= max, got 0..0"),
        ("-2", "need 1 <= min <= max, got -2..-2"),
        ("2000", "max 2000 is over the limit of 1024"),
        ('"x"', "need a number or {min, max}, got str 'x'"),
        ("true", "need a number or {min, max}, got bool True"),
        ("[1, 2]", "need a number or {min, max}, got an array"),
    ],
)
def test_bad_workers_are_reported_for_the_pool(write: Write, workers: str, reason: str) -> None:
    path = write(PIPELINE.replace("[step.cpu]\n", f"[step.cpu]\nworkers = {workers}\n"))
    found = problems_of(path)

    assert has(found, "step.cpu", f"workers: {reason}"), show(found)


def test_an_unknown_field_of_workers_is_reported(write: Write) -> None:
    path = write(PIPELINE.replace("[step.cpu]\n", "[step.cpu]\nworkers = { min = 1, maxx = 3 }\n"))

    assert has(problems_of(path), "step.cpu.workers", "unknown field 'maxx' (did you mean 'max'?)")


def test_workers_on_a_step_that_is_not_a_pool_is_reported(write: Write) -> None:
    path = write(PIPELINE.replace("[step.csv]\n", "[step.csv]\nworkers = 2\n"))

    assert has(problems_of(path), "step.csv", "workers: only pools have workers, this is a sink")


@pytest.mark.parametrize(
    ("field", "value", "reason"),
    [
        ("timeout", '"fast"', "timeout: bad duration 'fast'"),
        ("timeout", "0", "timeout: need more than 0 seconds"),
        ("timeout", '"-1s"', "timeout: bad duration '-1s'"),
        ("backoff", "-1", "backoff: bad duration -1"),
        ("timeout", "nan", "timeout: bad duration nan"),
        ("timeout", "inf", "timeout: bad duration inf"),
        ("timeout", "1" + "0" * 400, "timeout: bad duration"),
    ],
    ids=["word", "zero", "negative-string", "negative-backoff", "nan", "inf", "huge-int"],
)
def test_a_bad_duration_is_reported_for_its_step(
    write: Write, field: str, value: str, reason: str
) -> None:
    path = write(PIPELINE.replace("[step.cpu]\n", f"[step.cpu]\n{field} = {value}\n"))
    found = problems_of(path)

    assert has(found, "step.cpu", reason), show(found)


def test_a_zero_backoff_is_allowed(write: Write) -> None:
    path = write(PIPELINE.replace("[step.cpu]\n", "[step.cpu]\nbackoff = 0\n"))

    assert load_topology(path).steps["cpu"].backoff == 0.0


@pytest.mark.parametrize(
    ("text", "where", "reason"),
    [
        ("stpe = 1\n" + PIPELINE, "file", "unknown field 'stpe' (did you mean 'step'?)"),
        (
            PIPELINE.replace("[step.cpu]\n", "[step.cpu]\nwrokers = 2\n"),
            "step.cpu",
            "unknown field 'wrokers' (did you mean 'workers'?)",
        ),
        (
            PIPELINE.replace('from = "clock"', 'form = "clock"'),
            "link ? -> cpu",
            "unknown field 'form' (did you mean 'from'?)",
        ),
        (
            '[satellite.local]\nhots = "a"\n' + PIPELINE,
            "satellite.local",
            "unknown field 'hots' (did you mean 'host'?)",
        ),
        (
            '[store]\nulr = "sqlite:///x.db"\n' + PIPELINE,
            "store",
            "unknown field 'ulr' (did you mean 'url'?)",
        ),
        (
            '[defaults]\ntimout = "2s"\n' + PIPELINE,
            "defaults",
            "unknown field 'timout' (did you mean 'timeout'?)",
        ),
    ],
    ids=["top", "step", "link", "satellite", "store", "defaults"],
)
def test_an_unknown_field_is_reported_with_a_suggestion(
    write: Write, text: str, where: str, reason: str
) -> None:
    found = problems_of(write(text))

    assert has(found, where, reason), show(found)


@pytest.mark.parametrize(
    ("text", "where", "reason"),
    [
        ("step = 3\n", "step", "need a table of steps, got int 3"),
        ("link = {}\n" + PIPELINE.split("[[link]]")[0], "link", "need an array of [[link]] tables"),
        ("link = [3]\n" + PIPELINE.split("[[link]]")[0], "link #1", "need a table, got int 3"),
        ('satellite = "moon"\n' + PIPELINE, "satellite", "need a table of satellites"),
        ("[satellite]\nlocal = 3\n" + PIPELINE, "satellite.local", "need a table, got int 3"),
        ("[step]\ncpu = 3\n", "step.cpu", "need a table, got int 3"),
        ("store = 3\n" + PIPELINE, "store", "need a table, got int 3"),
        ("defaults = []\n" + PIPELINE, "defaults", "need a table, got an array"),
        ("path = 3\n" + PIPELINE, "path", "path: need a string or a list of strings"),
        (
            PIPELINE.replace("[step.cpu]\n", '[step.cpu]\nworkers = "x"\n'),
            "step.cpu",
            "workers: need a number",
        ),
        (
            PIPELINE.replace("[step.cpu]\n", '[step.cpu]\nretries = "2"\n'),
            "step.cpu",
            "retries: need int, got str '2'",
        ),
        (
            PIPELINE.replace("[step.cpu]\n", "[step.cpu]\nretries = 2.5\n"),
            "step.cpu",
            "retries: need int, got float 2.5",
        ),
        (
            PIPELINE.replace("[step.cpu]\n", '[step.cpu]\nentry = "yes"\n'),
            "step.cpu",
            "entry: need bool, got str 'yes'",
        ),
        (
            PIPELINE.replace("[step.cpu]\n", "[step.cpu]\nkind = 3\n"),
            "step.cpu",
            "kind: need str, got int 3",
        ),
        (
            PIPELINE.replace("[step.cpu]\n", '[step.cpu]\nkind = "pol"\n'),
            "step.cpu",
            "kind: 'pol' is not one of",
        ),
        (
            PIPELINE.replace("[step.cpu]\n", "[step.cpu]\noptions = 3\n"),
            "step.cpu",
            "options: need dict, got int 3",
        ),
        (
            PIPELINE.replace("[step.cpu]\n", "[step.cpu]\nsatellites = [1]\n"),
            "step.cpu",
            "satellites: need a string or a list of strings",
        ),
        (
            PIPELINE.replace("[step.cpu]\n", '[step.cpu]\nport = "x"\n'),
            "step.cpu",
            "port: need int, got str 'x'",
        ),
        (
            PIPELINE.replace("[step.cpu]\n", "[step.cpu]\nport = 70000\n"),
            "step.cpu",
            "port: need 0 <= port <= 65535, got 70000",
        ),
        (
            PIPELINE.replace('call = "FNS:work"', "call = 3", 1),
            "step.cpu",
            "call: need str, got int 3",
        ),
        (
            PIPELINE.replace("[step.cpu]\n", '[step.cpu]\nserialization = "xml"\n'),
            "step.cpu",
            "serialization: 'xml' is not one of",
        ),
        (
            PIPELINE.replace("[step.cpu]\n", '[step.cpu]\nserialization = "pickle"\n'),
            "step.cpu",
            "set allow_pickle = true",
        ),
        (
            PIPELINE.replace('to = "csv"', 'to = "csv"\npattern = "all"'),
            "link cpu -> csv",
            "pattern: 'all' is not push or pub",
        ),
        (PIPELINE.replace('to = "csv"', "to = 3"), "link cpu -> 3", "to: need str, got int 3"),
        (
            PIPELINE.replace('to = "csv"', 'to = "csv"\nwhen = 1'),
            "link cpu -> csv",
            "when: need str, got int 1",
        ),
        (
            "[satellite.local]\nbase_port = 0\n" + PIPELINE,
            "satellite.local",
            "base_port: need 1 <= base_port",
        ),
        (
            "[satellite.local]\nhost = 1\n" + PIPELINE,
            "satellite.local",
            "host: need str, got int 1",
        ),
        (
            '[satellite.local]\ninsecure = "no"\n' + PIPELINE,
            "satellite.local",
            "insecure: need bool",
        ),
        (
            '[store]\nurl = "mysql://x"\n' + PIPELINE,
            "store",
            "url: 'mysql://x': use sqlite:///PATH",
        ),
        ('[store]\nretention = "forever"\n' + PIPELINE, "store", "retention: bad duration"),
        ("[defaults]\nretries = -1\n" + PIPELINE, "defaults", "retries: need 0 <= retries <= 1000"),
        (
            '[defaults]\nserialization = "xml"\n' + PIPELINE,
            "defaults",
            "serialization: 'xml' is not one of",
        ),
        ("[defaults]\nhwm = 0\n" + PIPELINE, "defaults", "hwm: need 1 <= hwm"),
    ],
)
def test_a_value_of_the_wrong_type_or_range_is_reported_where_it_is(
    write: Write, text: str, where: str, reason: str
) -> None:
    found = problems_of(write(text))

    assert has(found, where, reason), show(found)


def test_a_topology_with_no_steps_is_reported(write: Write) -> None:
    assert has(problems_of(write("[store]\n")), "step", "no steps")


@pytest.mark.parametrize("name", ["orchester", "tracker", "circus", "autoscaler"])
def test_a_reserved_step_name_is_reported(write: Write, name: str) -> None:
    path = write(PIPELINE + f'\n[step.{name}]\ncall = "FNS:work"\nentry = true\n')

    assert has(problems_of(path), f"step.{name}", "reserved name")


@pytest.mark.parametrize("name", ["a.b", "1cpu", "x" * 65, "caf\u00e9"])
def test_a_bad_step_name_is_reported(write: Write, name: str) -> None:
    path = write(PIPELINE + f'\n["step"."{name}"]\ncall = "FNS:work"\nentry = true\n')

    assert has(problems_of(path), f"step.{name}", "bad name")


def test_a_satellite_named_by_a_step_must_be_defined(write: Write) -> None:
    path = write(
        "[satellite.earth]\n" + PIPELINE.replace("[step.cpu]\n", '[step.cpu]\nsatellite = "moon"\n')
    )

    assert has(problems_of(path), "step.cpu", "satellite 'moon' is not defined (defined: earth)")


def test_a_satellite_named_by_a_step_must_be_defined_even_when_none_is(write: Write) -> None:
    path = write(PIPELINE.replace("[step.cpu]\n", '[step.cpu]\nsatellites = ["local", "moon"]\n'))
    found = problems_of(path)

    assert has(found, "step.cpu", "satellite 'moon' is not defined (defined: local)")
    assert len(found) == 1, show(found)


def test_a_satellite_named_twice_by_a_step_and_a_source_on_two_satellites_are_reported(
    write: Write,
) -> None:
    path = write(
        '[satellite.a]\ninsecure = true\n[satellite.b]\ninsecure = true\nhost = "127.0.0.2"\n'
        + PIPELINE.replace("[step.cpu]\n", '[step.cpu]\nsatellites = ["a", "a"]\n').replace(
            'every = "2s"', 'every = "2s"\nsatellites = ["a", "b"]'
        )
    )
    found = problems_of(path)

    assert has(found, "step.cpu", "a satellite is named twice")
    assert has(found, "step.clock", "a source runs on one satellite")


TWO_SATELLITES = """
[satellite.a]
insecure = true
host = "127.0.0.1"
base_port = 7400
runtime_dir = "RUNTIME/a"

[satellite.b]
insecure = true
host = "127.0.0.2"
base_port = 7400
runtime_dir = "RUNTIME/b"

[step.s1]
call = "FNS:work"
entry = true
satellite = "a"

[step.s2]
call = "FNS:work"
satellite = "b"

[[link]]
from = "s1"
to = "s2"
"""


@pytest.mark.parametrize(
    ("edits", "where", "address"),
    [
        ([('host = "127.0.0.2"', 'host = "127.0.0.1"')], "satellite.b", "tcp://127.0.0.1:7400"),
        (
            [('host = "127.0.0.2"\nbase_port = 7400', 'host = "127.0.0.1"\nbase_port = 7402')],
            "satellite.b",
            "tcp://127.0.0.1:7402",
        ),
        ([('satellite = "b"', 'satellite = "a"\nport = 7400')], "step.s2", "tcp://127.0.0.1:7400"),
        (
            [
                ('satellite = "a"', 'satellite = "a"\nport = 9000'),
                ('satellite = "b"', 'satellite = "a"\nport = 9000'),
            ],
            "step.s2",
            "tcp://127.0.0.1:9000",
        ),
    ],
    ids=["same-host-and-base-port", "overlapping-port-ranges", "port-of-orchester", "same-port"],
)
def test_two_sockets_on_one_tcp_address_are_reported(
    write: Write, short_dir: str, edits: list[tuple[str, str]], where: str, address: str
) -> None:
    text = TWO_SATELLITES.replace("RUNTIME", short_dir)
    for old, new in edits:
        assert old in text
        text = text.replace(old, new)
    found = problems_of(write(text))

    assert has(found, where, f"address {address} is used twice"), show(found)


def test_the_same_port_on_two_hosts_is_no_clash(write: Write, short_dir: str) -> None:
    text = TWO_SATELLITES.replace("RUNTIME", short_dir).replace(
        'satellite = "a"', 'satellite = "a"\nport = 9000'
    )
    text = text.replace('satellite = "b"', 'satellite = "b"\nport = 9000')
    topology = load_topology(write(text))

    assert topology.steps["s1"].port == topology.steps["s2"].port == 9000


def test_two_satellites_sharing_a_runtime_dir_are_reported(write: Write, short_dir: str) -> None:
    text = TWO_SATELLITES.replace("RUNTIME/b", "RUNTIME/a").replace("RUNTIME", short_dir)

    assert has(problems_of(write(text)), "satellite.b", "is also a's: ipc addresses clash")


def test_a_runtime_dir_too_long_for_ipc_paths_is_reported(write: Write) -> None:
    path = write(f'[satellite.local]\nruntime_dir = "/tmp/{"d" * 100}"\n' + PIPELINE)

    assert has(problems_of(path), "satellite.local", "runtime_dir", "choose a shorter directory")


def test_the_ipc_limit_counts_the_step_names_a_satellite_hosts(write: Write) -> None:
    runtime = f"/tmp/{'d' * 40}"  # 45 bytes: room for short names, not for a 60-byte one
    assert load_topology(write(f'[satellite.local]\nruntime_dir = "{runtime}"\n' + PIPELINE))

    long_name = "x" * 60
    text = PIPELINE.replace("cpu", long_name)
    path = write(f'[satellite.local]\nruntime_dir = "{runtime}"\n' + text, name="long.toml")
    found = problems_of(path)
    assert has(found, "satellite.local", f"runtime_dir: {runtime!r} makes ipc paths of up to 115")
    assert len(found) == 1, show(found)


def test_a_lone_surrogate_in_json_is_a_topology_error(write: Write) -> None:
    for document in (
        '{"satellite": {"local": {"runtime_dir": "\\ud800"}}, "step": {}}',
        '{"path": ["\\ud800"], "step": {}}',
    ):
        problems_of(write(document, name="topology.json"))


def test_each_problem_is_reported_once(write: Write) -> None:
    path = write(PIPELINE.replace("[step.cpu]\n", '[step.cpu]\nworkers = "x"\ntimeout = "x"\n'))
    found = problems_of(path)

    assert len(found) == len(set(found)) == 2


# ---------------------------------------------------------------------------
# the model


def test_every_pool_has_an_implicit_queue_node(write: Write) -> None:
    path = write(PIPELINE.replace("[step.cpu]\n", "[step.cpu]\nworkers = { min = 2, max = 5 }\n"))
    topology = load_topology(path)
    nodes = {node.name: node for node in topology.nodes(LOCAL)}

    assert list(nodes) == ["orchester", "clock", "cpu.queue", "cpu", "csv", "tracker"]
    assert nodes["cpu.queue"].role is Role.QUEUE
    assert nodes["cpu.queue"].step == "cpu"
    assert nodes["cpu"].role is Role.WORKER
    assert (nodes["cpu"].min, nodes["cpu"].max) == (2, 5)
    assert nodes["clock"].role is Role.SOURCE
    assert nodes["csv"].role is Role.SINK
    assert nodes["orchester"].role is Role.ORCHESTER
    assert nodes["tracker"].role is Role.TRACKER
    assert all(node.satellite == LOCAL for node in nodes.values())


def test_the_inbox_of_a_pool_is_its_queue_and_of_other_steps_the_step(write: Write) -> None:
    routed = """
[step.fan]
kind = "router"

[[link]]
from = "csv"
to = "fan"

[step.out]
kind = "sink"
call = "FNS:work"

[[link]]
from = "fan"
to = "out"
"""
    topology = load_topology(write(PIPELINE + routed))

    assert topology.inbox("cpu") == "cpu.queue"
    assert topology.inbox("csv") == "csv"
    assert topology.inbox("fan") == "fan"
    assert topology.inbox("out") == "out"
    assert topology.inbox("clock") == "clock"


def test_links_from_and_to_a_step(write: Write) -> None:
    topology = load_topology(write(PIPELINE))

    assert [str(link) for link in topology.links_from("cpu")] == ["cpu -> csv"]
    assert [str(link) for link in topology.links_to("cpu")] == ["clock -> cpu"]
    assert topology.links_from("csv") == ()


def test_nodes_of_a_satellite_are_only_the_steps_it_hosts(write: Write, short_dir: str) -> None:
    topology = load_topology(write(TWO_SATELLITES.replace("RUNTIME", short_dir)))

    assert [n.name for n in topology.nodes("a")] == ["orchester", "s1.queue", "s1", "tracker"]
    assert [n.name for n in topology.nodes("b")] == ["orchester", "s2.queue", "s2", "tracker"]


# ---------------------------------------------------------------------------
# the socket plan


def _addresses(plans: list[Plan], *, bound: bool | None = None) -> set[str]:
    return {
        address
        for plan in plans
        for socket in plan.sockets
        if bound is None or socket.bind is bound
        for address in socket.addresses
    }


@pytest.fixture
def one_satellite(write: Write, short_dir: str) -> Topology:
    return load_topology(write(f'[satellite.local]\nruntime_dir = "{short_dir}/rt"\n' + PIPELINE))


def test_a_pool_worker_connects_to_its_queue_only(one_satellite: Topology, short_dir: str) -> None:
    plan = get_connection(one_satellite, "cpu", satellite=LOCAL)
    rt = f"ipc://{short_dir}/rt"

    assert plan.role is Role.WORKER
    assert plan.socket("work").type == "DEALER"
    assert plan.socket("work").bind is False
    assert plan.socket("work").addresses == (f"{rt}/cpu.work",)
    assert [p.purpose for p in plan.sockets] == ["work"]  # results go back through the queue
    assert not any(socket.bind for socket in plan.sockets)  # workers never bind


def test_a_pools_queue_binds_its_inbox_and_the_work_socket(
    one_satellite: Topology, short_dir: str
) -> None:
    plan = get_connection(one_satellite, "cpu.queue", satellite=LOCAL)
    rt = f"ipc://{short_dir}/rt"

    assert plan.role is Role.QUEUE
    assert (plan.socket("in").type, plan.socket("in").bind) == ("ROUTER", True)
    assert plan.socket("in").addresses == (f"{rt}/cpu.queue.in",)
    assert (plan.socket("work").type, plan.socket("work").bind) == ("ROUTER", True)
    assert plan.socket("work").addresses == (f"{rt}/cpu.work",)
    assert (plan.socket("events").type, plan.socket("events").bind) == ("DEALER", False)
    assert [(p.purpose, p.type, p.bind) for p in plan.outputs()] == [("out:csv", "DEALER", False)]
    assert plan.socket("out:csv").addresses == (f"{rt}/csv.in",)
    assert plan.socket("events").addresses == (f"{rt}/tracker.events",)


def test_a_sink_binds_its_inbox(one_satellite: Topology, short_dir: str) -> None:
    plan = get_connection(one_satellite, "csv")

    assert plan.role is Role.SINK
    assert plan.satellite == LOCAL
    assert (plan.socket("in").type, plan.socket("in").bind) == ("ROUTER", True)
    assert plan.socket("in").addresses == (f"ipc://{short_dir}/rt/csv.in",)
    assert plan.outputs() == ()


def test_a_source_submits_to_the_orchester(one_satellite: Topology, short_dir: str) -> None:
    plan = get_connection(one_satellite, "clock", satellite=LOCAL)

    assert plan.role is Role.SOURCE
    submit = plan.socket("submit")
    assert (submit.type, submit.bind) == ("DEALER", False)
    assert submit.addresses == (f"ipc://{short_dir}/rt/orchester",)


def test_the_orchester_binds_submit_and_reaches_every_inbox(
    one_satellite: Topology, short_dir: str
) -> None:
    plan = get_connection(one_satellite, "orchester", satellite=LOCAL)
    rt = f"ipc://{short_dir}/rt"

    assert plan.role is Role.ORCHESTER
    assert (plan.socket("submit").type, plan.socket("submit").bind) == ("ROUTER", True)
    assert plan.socket("submit").addresses == (f"{rt}/orchester",)
    assert plan.socket("out:cpu").addresses == (f"{rt}/cpu.queue.in",)
    assert plan.socket("out:csv").addresses == (f"{rt}/csv.in",)


def test_the_tracker_binds_events_query_and_pub(one_satellite: Topology, short_dir: str) -> None:
    plan = get_connection(one_satellite, "tracker", satellite=LOCAL)
    rt = f"ipc://{short_dir}/rt"

    assert plan.role is Role.TRACKER
    assert [(s.purpose, s.type, s.bind, s.addresses) for s in plan.sockets] == [
        ("events", "ROUTER", True, (f"{rt}/tracker.events",)),
        ("query", "ROUTER", True, (f"{rt}/tracker.query",)),
        ("pub", "XPUB", True, (f"{rt}/tracker.pub",)),
    ]


def test_one_satellite_uses_only_ipc_under_its_runtime_dir(
    one_satellite: Topology, short_dir: str
) -> None:
    plans = [get_connection(one_satellite, n.name) for n in one_satellite.nodes(LOCAL)]

    for address in _addresses(plans):
        assert address.startswith(f"ipc://{short_dir}/rt/"), address
        assert len(address.removeprefix("ipc://").encode()) <= IPC_PATH_LIMIT


def test_every_address_a_node_connects_to_is_bound_by_one_node(
    one_satellite: Topology, write: Write, short_dir: str
) -> None:
    two = load_topology(write(TWO_SATELLITES.replace("RUNTIME", short_dir), name="two.toml"))
    for topology in (one_satellite, two):
        plans = [
            get_connection(topology, node.name, satellite=satellite)
            for satellite in topology.satellites
            for node in topology.nodes(satellite)
        ]
        bound = [a for p in plans for s in p.sockets if s.bind for a in s.addresses]
        assert len(bound) == len(set(bound)), "an address is bound twice"
        assert _addresses(plans, bound=False) <= set(bound)


def test_two_satellites_reach_each_other_over_tcp(write: Write, short_dir: str) -> None:
    topology = load_topology(write(TWO_SATELLITES.replace("RUNTIME", short_dir)))

    s1 = get_connection(topology, "s1.queue", satellite="a")
    (out,) = s1.outputs()
    assert out.purpose == "out:s2"
    assert (out.type, out.bind) == ("DEALER", False)
    assert len(out.addresses) == 1
    assert out.addresses[0].startswith("tcp://127.0.0.2:")
    assert s1.socket("work").addresses == (f"ipc://{short_dir}/a/s1.work",)

    queue = get_connection(topology, "s2.queue", satellite="b")
    inbox = queue.socket("in")
    assert (inbox.type, inbox.bind) == ("ROUTER", True)
    assert inbox.addresses[0] == f"ipc://{short_dir}/b/s2.queue.in"
    assert inbox.addresses[1] == out.addresses[0]
    assert len(inbox.addresses) == 2
    port = int(out.addresses[0].rsplit(":", 1)[1])
    assert 7400 <= port < 7400 + 512


def test_two_satellites_expose_the_orchester_and_tracker_over_tcp(
    write: Write, short_dir: str
) -> None:
    topology = load_topology(write(TWO_SATELLITES.replace("RUNTIME", short_dir)))

    submit = get_connection(topology, "orchester", satellite="b").socket("submit")
    assert submit.addresses == (f"ipc://{short_dir}/b/orchester", "tcp://127.0.0.2:7400")
    tracker = get_connection(topology, "tracker", satellite="a")
    assert all(s.addresses[1].startswith("tcp://127.0.0.1:") for s in tracker.sockets)


def test_an_explicit_step_port_is_the_port_of_its_inbox(write: Write, short_dir: str) -> None:
    text = TWO_SATELLITES.replace("RUNTIME", short_dir).replace(
        'satellite = "b"', 'satellite = "b"\nport = 9123'
    )
    topology = load_topology(write(text))

    (out,) = get_connection(topology, "s1.queue", satellite="a").outputs()
    assert out.addresses == ("tcp://127.0.0.2:9123",)


def test_get_connection_refuses_unknown_nodes_and_satellites(
    one_satellite: Topology, write: Write, short_dir: str
) -> None:
    with pytest.raises(TopologyError) as caught:
        get_connection(one_satellite, "nope")
    assert caught.value.problems[0].where == "nope"
    with pytest.raises(TopologyError):
        get_connection(one_satellite, "csv.queue")  # a sink has no queue
    with pytest.raises(TopologyError) as caught:
        get_connection(one_satellite, "cpu", satellite="moon")
    assert caught.value.problems[0].where == "satellite.moon"

    two = load_topology(write(TWO_SATELLITES.replace("RUNTIME", short_dir), name="two.toml"))
    with pytest.raises(TopologyError) as caught:
        get_connection(two, "s2", satellite="a")
    assert caught.value.problems[0] == Problem(two.path, "step.s2", "does not run on satellite a")


def test_ensure_private_dir_creates_the_directory_and_parents_with_mode_0700(
    short_dir: str,
) -> None:
    path = os.path.join(short_dir, "x", "y")

    assert ensure_private_dir(path) == path
    for directory in (os.path.join(short_dir, "x"), path):
        assert stat.S_IMODE(os.stat(directory).st_mode) == 0o700
    assert ensure_private_dir(path) == path  # twice is fine


def test_ensure_private_dir_tightens_an_open_directory(short_dir: str) -> None:
    path = os.path.join(short_dir, "open")
    os.mkdir(path)
    os.chmod(path, 0o755)

    ensure_private_dir(path)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o700


# ---------------------------------------------------------------------------
# fuzz: nothing but TopologyError


_STEP_FIELDS = ["kind", "call", "every", "workers", "timeout", "retries", "backoff", "satellite"]
_STEP_FIELDS += ["satellites", "serialization", "entry", "max_queue", "port", "options"]
_FIELDS = [*_STEP_FIELDS, "from", "to", "pattern", "when", "min", "max", "host", "base_port"]
_FIELDS += ["runtime_dir", "state_dir", "url", "retention", "allow_pickle", "max_message_size"]
_NAMES = ["local", "a", "b", "cpu", "clock", "csv", "orchester", "cpu.queue", "", "x" * 70]
_INTERESTING = [
    "source", "pool", "sink", "router", "push", "pub", "2s", "250ms", "1.5m", "-1s", "1e3s",
    "msgpack", "pickle", "sqlite:///s.db", "postgresql://h/db", "/", "..", "127.0.0.1",
    f"{USER_PREFIX}fuzz_missing:f", "math:pi", "json:dumps", "json:", ":f", "a.:b", "x:y.",
    10**400, 2**63, -1, 0, 65536,
]  # fmt: skip

_keys = st.sampled_from(_FIELDS + _NAMES) | st.text(max_size=6)
_names = st.sampled_from(_NAMES) | st.text(max_size=6)


def _documents(*, null: bool) -> st.SearchStrategy[dict[str, Any]]:
    interesting = st.sampled_from(_INTERESTING)
    scalar = st.one_of(
        interesting,
        st.booleans(),
        st.integers(),
        st.floats(),
        st.text(max_size=10),
        *([st.none()] if null else []),
    )
    value = st.recursive(
        scalar,
        lambda inner: st.lists(inner, max_size=3) | st.dictionaries(_keys, inner, max_size=4),
        max_leaves=10,
    )
    fields = st.sampled_from(_FIELDS) | st.text(max_size=4)
    table = st.dictionaries(fields, interesting | value, max_size=6)
    named = st.dictionaries(_names, table | value, max_size=4)
    return st.fixed_dictionaries(
        {},
        optional={
            "satellite": named | value,
            "step": named | value,
            "link": st.lists(table | value, max_size=4) | value,
            "store": table | value,
            "defaults": table | value,
            "path": value,
            "extra": value,
        },
    )


def _toml_string(text: str) -> str:
    # JSON's escapes are TOML's; DEL is the one character TOML wants escaped and JSON does not
    return json.dumps(text, ensure_ascii=False).replace("\x7f", "\\u007f")


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        return repr(value)
    if isinstance(value, str):
        return _toml_string(value)
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    assert isinstance(value, dict)
    items = ", ".join(f"{_toml_string(k)} = {_toml_value(v)}" for k, v in value.items())
    return "{" + items + "}"


def _to_toml(document: dict[str, Any]) -> str:
    return "".join(f"{_toml_string(k)} = {_toml_value(v)}\n" for k, v in document.items())


def test_the_tiny_toml_writer_writes_toml() -> None:
    import tomllib

    document = {"a": [1, 2.5, "x\x7f\n"], "b": {"c": True, "": {"d": []}}}
    assert tomllib.loads(_to_toml(document)) == document


def _load_quietly(path: str, *, check_imports: bool = True) -> Topology | None:
    """Load, or check that the TopologyError is well formed; raise anything else."""
    saved = list(sys.path)
    try:
        return load_topology(path, check_imports=check_imports)
    except TopologyError as exc:
        problems = exc.problems
    finally:
        sys.path[:] = saved  # the loader puts the file's directory and `path` on sys.path
    assert problems
    assert all(isinstance(p, Problem) and p.file == path for p in problems)
    return None


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(document=_documents(null=False))
def test_a_random_toml_document_loads_or_raises_topology_error(document: dict[str, Any]) -> None:
    with tempfile.TemporaryDirectory(prefix="dsf-", dir="/tmp") as directory:
        path = os.path.join(directory, "topology.toml")
        Path(path).write_text(_to_toml(document), encoding="utf-8")
        _load_quietly(path)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(document=_documents(null=True), ascii_only=st.booleans())
def test_a_random_json_document_loads_or_raises_topology_error(
    document: dict[str, Any], ascii_only: bool
) -> None:
    with tempfile.TemporaryDirectory(prefix="dsf-", dir="/tmp") as directory:
        path = os.path.join(directory, "topology.json")
        Path(path).write_text(json.dumps(document, ensure_ascii=ascii_only), encoding="utf-8")
        _load_quietly(path)


@settings(max_examples=200, deadline=None)
@given(data=st.binary(max_size=200), suffix=st.sampled_from([".toml", ".json"]))
def test_random_bytes_load_or_raise_topology_error(data: bytes, suffix: str) -> None:
    with tempfile.TemporaryDirectory(prefix="dsf-", dir="/tmp") as directory:
        path = os.path.join(directory, "topology" + suffix)
        Path(path).write_bytes(data)
        _load_quietly(path)


def _rarely(draw: st.DrawFn) -> bool:
    return draw(st.integers(0, 7)) == 0


@st.composite
def _plausible_topologies(draw: st.DrawFn) -> dict[str, Any]:
    """Documents close to valid ones (a DAG, with a few mistakes), so every check runs."""
    satellites = draw(st.lists(st.sampled_from(["a", "b", "c"]), unique=True, max_size=3))
    document: dict[str, Any] = {}
    if satellites:
        document["satellite"] = {
            name: {
                "host": "127.0.0.1" if _rarely(draw) else f"127.0.0.{index + 1}",
                "base_port": draw(st.sampled_from([7400, 7402, 7600])),
                "runtime_dir": f"rt/{name}",  # relative to the file's directory
            }
            for index, name in enumerate(satellites)
        }
    count = draw(st.integers(1, 6))
    names = [f"s{index}" for index in range(count)]
    kinds = [draw(st.sampled_from(["source", "pool", "pool", "sink", "router"])) for _ in names]
    steps: dict[str, Any] = {}
    links: list[tuple[str, str]] = []
    for index, (name, kind) in enumerate(zip(names, kinds, strict=True)):
        step: dict[str, Any] = {"kind": kind}
        if kind == "source":
            step["every"] = draw(st.sampled_from(["1s", 0.5, "250ms"]))
            after = zip(names[index + 1 :], kinds[index + 1 :], strict=True)
            later = [n for n, k in after if k != "source"]
            if later:
                links.append((name, draw(st.sampled_from(later))))
        else:
            earlier = names[:index]
            if earlier and not _rarely(draw):
                links.append((draw(st.sampled_from(earlier)), name))
            else:
                step["entry"] = not _rarely(draw)
        if kind != "router":
            step["call"] = "fuzz_module:f"
        if kind == "pool" and draw(st.booleans()):
            step["workers"] = {"min": 1, "max": draw(st.integers(1, 4))}
        if satellites:
            on = draw(st.lists(st.sampled_from(satellites), unique=True, max_size=2))
            if on and (kind != "source" or len(on) == 1 or _rarely(draw)):
                step["satellites"] = on
        if _rarely(draw):
            step["port"] = draw(st.sampled_from([9000, 9001, 7400]))
        steps[name] = step
    document["step"] = steps
    if _rarely(draw):  # a mistake: a link to nowhere, to itself, backwards or twice
        ends = st.sampled_from([*names, "nowhere"])
        links.append((draw(ends), draw(ends)))
    document["link"] = [
        {"from": a, "to": b, "pattern": draw(st.sampled_from(["push", "pub"]))} for a, b in links
    ]
    return document


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(document=_plausible_topologies(), as_json=st.booleans())
def test_a_topology_that_loads_has_a_consistent_socket_plan(
    document: dict[str, Any], as_json: bool
) -> None:
    with tempfile.TemporaryDirectory(prefix="dsf-", dir="/tmp") as directory:
        path = os.path.join(directory, "topology.json" if as_json else "topology.toml")
        Path(path).write_text(json.dumps(document) if as_json else _to_toml(document))
        topology = _load_quietly(path, check_imports=False)
    if topology is None:
        return
    plans = [
        get_connection(topology, node.name, satellite=satellite)
        for satellite in topology.satellites
        for node in topology.nodes(satellite)
    ]
    bound = [a for plan in plans for s in plan.sockets if s.bind for a in s.addresses]
    assert len(bound) == len(set(bound)), "an address is bound twice"
    assert _addresses(plans, bound=False) <= set(bound), "a node connects to an unbound address"
    for plan in plans:
        if plan.role is Role.WORKER:
            assert not any(s.bind for s in plan.sockets), "a worker binds"
        for socket in plan.sockets:
            for address in socket.addresses:
                if address.startswith("ipc://"):
                    here = topology.runtime_dir(plan.satellite)
                    assert address.startswith(f"ipc://{here}/")
                    assert len(address.removeprefix("ipc://").encode()) <= IPC_PATH_LIMIT
                else:
                    assert len(topology.satellites) > 1, "tcp on a single satellite"
