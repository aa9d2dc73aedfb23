"""The graph: load a topology file once, check it whole, hand it down frozen.

A topology names satellites (hosts), steps (nodes of the graph) and links
(directed edges). Fixed points and moving parts alternate by construction:
every worker pool owns an implicit inbound router, its *queue*, named
``<pool>.queue``; it is a node of the model like any other (see
:meth:`Topology.nodes`), shown by ``dsat graph`` and planned by
:func:`get_connection`.

Every problem found is reported at once, each with the file, where in the file
(``step.cpu``, ``link clock -> cpu``) and the reason, as a
:class:`~dsat.errors.TopologyError`.
"""

from __future__ import annotations

import contextlib
import difflib
import hashlib
import importlib
import json
import os
import re
import sys
import tomllib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any, Final

from dsat.errors import Problem, TopologyError
from dsat.message import DEFAULT_MAX_SIZE, SERIALIZATIONS
from dsat.metrics import Autoscale


class Kind(StrEnum):
    """What a step is: where tasks come from, go through, get worked on, or end."""

    SOURCE = "source"  # creates tasks by itself, every N seconds
    ROUTER = "router"  # a fixed point that forwards (fan-out, propagation)
    POOL = "pool"  # N identical worker processes behind an implicit queue router
    SINK = "sink"  # a single process that runs a function (a CSV writer...)


class Role(StrEnum):
    """The part a process plays in a satellite."""

    ORCHESTER = "orchester"  # the entry router: submissions, task ids
    TRACKER = "tracker"  # events in, store, live stream out, queries
    SOURCE = "source"
    QUEUE = "queue"  # the implicit router in front of a pool
    WORKER = "worker"  # one of the pool's processes
    SINK = "sink"
    ROUTER = "router"


class Pattern(StrEnum):
    """How a link delivers to the instances of its target step."""

    PUSH = "push"  # to one instance, in turn
    PUB = "pub"  # to every instance


LOCAL: Final = "local"
ORCHESTER: Final = "orchester"
TRACKER: Final = "tracker"
QUEUE_SUFFIX: Final = ".queue"
RESERVED: Final = frozenset({ORCHESTER, TRACKER, "circus", "autoscaler"})
_NAME: Final = re.compile(r"[A-Za-z_][A-Za-z0-9_-]{0,63}")
_CALL: Final = re.compile(r"[A-Za-z_][\w.]*:[A-Za-z_][\w.]*")
_DURATION: Final = re.compile(r"\s*([0-9]+(?:\.[0-9]*)?|\.[0-9]+)\s*(ms|s|m|h|d)?\s*")
_UNITS: Final = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0, None: 1.0}
_DURATION_HELP: Final = "use seconds or a string like '250ms', '2s', '1m'"
IPC_PATH_LIMIT: Final = 100  # ZeroMQ ipc paths are limited to about 107 bytes
# room kept for ipc names that are not a step's (tracker.events, the supervisor's endpoint...)
_IPC_NAME_RESERVE: Final = 32


# ---------------------------------------------------------------------------
# the frozen model


@dataclass(frozen=True)
class Workers:
    """How many processes a pool runs: autoscaled within [min, max]."""

    min: int = 1
    max: int = 1


@dataclass(frozen=True)
class Satellite:
    """One host's share of the graph."""

    name: str
    host: str = "127.0.0.1"
    base_port: int = 7400
    runtime_dir: str = ""  # ipc sockets, circus control; created 0700
    state_dir: str = ""  # journals, the default SQLite store (and logs, unless log_dir)
    log_dir: str = ""  # where each run's logs go; "" = the state_dir
    log_max_size: int = 8 * 1024 * 1024  # bytes per log file before it rotates (2 kept)
    public_key: str = ""  # CURVE public key of this satellite: z85 text, or a key file
    secret_key_file: str = ""  # its secret key file (read only where it runs)
    insecure: bool = False  # tcp links without CURVE: only when said explicitly


@dataclass(frozen=True)
class Step:
    """A node of the graph, as the file declares it (durations already in seconds)."""

    name: str
    kind: Kind
    call: str = ""  # "module:function"
    every: float = 0.0  # sources only
    workers: Workers = Workers()
    timeout: float = 30.0
    retries: int = 2
    backoff: float = 0.5
    satellites: tuple[str, ...] = (LOCAL,)
    serialization: str = "msgpack"
    entry: bool = False  # clients submit to it (nothing else feeds it)
    max_queue: int = 10_000
    prefetch: int = 64  # pools: tasks a worker may hold at once when they are short
    port: int = 0  # explicit tcp port on its satellites; 0 = allocated
    options: Mapping[str, Any] = field(default_factory=dict)  # handed to the function as is
    autoscale: Autoscale = field(default_factory=Autoscale)  # pools: when to add, remove workers


@dataclass(frozen=True)
class Link:
    """A directed edge ``source -> target``, followed when ``when`` (if any) holds."""

    source: str
    target: str
    pattern: Pattern = Pattern.PUSH
    when: str = ""

    def __str__(self) -> str:
        return f"{self.source} -> {self.target}"


@dataclass(frozen=True)
class Defaults:
    """Values every step starts from; a step's own field wins."""

    timeout: float = 30.0
    retries: int = 2
    backoff: float = 0.5
    serialization: str = "msgpack"
    allow_pickle: bool = False
    max_message_size: int = DEFAULT_MAX_SIZE
    hwm: int = 1000
    max_queue: int = 10_000
    # tasks the satellite's tracker follows at once (submitted here, not ended) past
    # which the entry takes no new one: a flood is paced to the tracker, memory stays flat
    max_live: int = 10_000


@dataclass(frozen=True)
class Store:
    """Where states live; ``{satellite}`` in the URL is the satellite's name."""

    url: str = ""  # "" = sqlite in the satellite's state_dir
    retention: float = 7 * 86400.0  # seconds an ended task's events are kept
    max_result_size: int = 1024 * 1024


@dataclass(frozen=True)
class Node:
    """One process kind of a satellite: a step, its queue, the orchester or the tracker."""

    name: str
    role: Role
    step: str  # the step it serves ("" for orchester and tracker)
    satellite: str
    min: int = 1
    max: int = 1


@dataclass(frozen=True)
class Topology:
    """A checked topology. Build it with :func:`load_topology`; never mutate it."""

    path: str
    satellites: Mapping[str, Satellite]
    steps: Mapping[str, Step]
    links: tuple[Link, ...]
    store: Store = Store()
    defaults: Defaults = Defaults()
    python_path: tuple[str, ...] = ()
    clients: Mapping[str, str] = field(default_factory=dict)  # name -> public key (or file)

    @property
    def networked(self) -> bool:
        """Several satellites: their links go over tcp."""
        return len(self.satellites) > 1

    @property
    def directory(self) -> str:
        return os.path.dirname(self.path)

    def links_from(self, step: str) -> tuple[Link, ...]:
        return tuple(link for link in self.links if link.source == step)

    def links_to(self, step: str) -> tuple[Link, ...]:
        return tuple(link for link in self.links if link.target == step)

    def hosted(self, satellite: str) -> tuple[Step, ...]:
        """The steps that run on a satellite, in file order."""
        return tuple(s for s in self.steps.values() if satellite in s.satellites)

    def nodes(self, satellite: str) -> tuple[Node, ...]:
        """Every process kind a satellite runs, the implicit queues included."""
        found = [Node(ORCHESTER, Role.ORCHESTER, "", satellite)]
        for step in self.hosted(satellite):
            if step.kind is Kind.POOL:
                found.append(Node(step.name + QUEUE_SUFFIX, Role.QUEUE, step.name, satellite))
                found.append(
                    Node(step.name, Role.WORKER, step.name, satellite, *_span(step.workers))
                )
            else:
                found.append(Node(step.name, Role(step.kind.value), step.name, satellite))
        found.append(Node(TRACKER, Role.TRACKER, "", satellite))
        return tuple(found)

    def inbox(self, step: str) -> str:
        """The node that receives a step's tasks: the queue of a pool, else the step."""
        kind = self.steps[step].kind
        return step + QUEUE_SUFFIX if kind is Kind.POOL else step

    def runtime_dir(self, satellite: str) -> str:
        return self.satellites[satellite].runtime_dir

    def state_dir(self, satellite: str) -> str:
        return self.satellites[satellite].state_dir

    def log_dir(self, satellite: str) -> str:
        return self.satellites[satellite].log_dir or self.state_dir(satellite)

    def store_url(self, satellite: str) -> str:
        """The store URL for a satellite, with ``{satellite}`` filled in."""
        url = self.store.url or "sqlite:///" + os.path.join(self.state_dir(satellite), "status.db")
        return url.replace("{satellite}", satellite)


def _span(workers: Workers) -> tuple[int, int]:
    return workers.min, workers.max


# ---------------------------------------------------------------------------
# the socket plan


@dataclass(frozen=True)
class SocketPlan:
    """One socket of a process: its ZeroMQ type, bind or connect, and where."""

    purpose: str  # "in", "work", "events", "out:csv", "submit", "pub", "query"
    type: str  # "ROUTER", "DEALER", "XPUB"
    bind: bool
    addresses: tuple[str, ...]
    pattern: Pattern = Pattern.PUSH  # for "out:" sockets: one instance or all


@dataclass(frozen=True)
class Plan:
    """The sockets one node needs on one satellite (see :func:`get_connection`)."""

    node: str
    role: Role
    satellite: str
    sockets: tuple[SocketPlan, ...]

    def socket(self, purpose: str) -> SocketPlan:
        for plan in self.sockets:
            if plan.purpose == purpose:
                return plan
        raise KeyError(f"{self.node} has no {purpose!r} socket")

    def outputs(self) -> tuple[SocketPlan, ...]:
        return tuple(p for p in self.sockets if p.purpose.startswith("out:"))


def ipc_address(topology: Topology, satellite: str, name: str) -> str:
    """The ipc:// address of a bound socket inside a satellite's runtime directory."""
    return f"ipc://{os.path.join(topology.runtime_dir(satellite), name)}"


def tcp_ports(topology: Topology, satellite: str) -> dict[str, int]:
    """The tcp port of every socket a satellite exposes to other satellites.

    Only topologies with several satellites expose tcp. Ports are ``base_port``
    plus a fixed index (orchester, tracker events/query/pub, then the inbox of
    each hosted step in file order), unless a step names its own ``port``.
    """
    if len(topology.satellites) < 2:
        return {}
    base = topology.satellites[satellite].base_port
    names = [ORCHESTER, "tracker.events", "tracker.query", "tracker.pub"]
    ports = {name: base + index for index, name in enumerate(names)}
    for index, step in enumerate(topology.hosted(satellite), start=len(names)):
        if step.kind is Kind.SOURCE:
            continue
        ports[topology.inbox(step.name)] = step.port or base + index
    return ports


def _exposed(topology: Topology, satellite: str, name: str, ipc_name: str) -> tuple[str, ...]:
    """ipc for local peers, and tcp too when other satellites may reach it."""
    addresses = [ipc_address(topology, satellite, ipc_name)]
    port = tcp_ports(topology, satellite).get(name)
    if port is not None:
        addresses.append(f"tcp://{topology.satellites[satellite].host}:{port}")
    return tuple(addresses)


def _reach(topology: Topology, here: str, there: str, name: str, ipc_name: str) -> str:
    """How a process on ``here`` reaches socket ``name`` bound on satellite ``there``."""
    if here == there:
        return ipc_address(topology, there, ipc_name)
    port = tcp_ports(topology, there)[name]
    return f"tcp://{topology.satellites[there].host}:{port}"


def inbox_address(topology: Topology, here: str, there: str, step: str) -> str:
    """How a process on satellite ``here`` reaches the inbox of ``step`` on ``there``."""
    name = topology.inbox(step)
    return _reach(topology, here, there, name, name + ".in")


def _inbox_addresses(topology: Topology, here: str, step: str) -> tuple[str, ...]:
    name = topology.inbox(step)
    return tuple(
        _reach(topology, here, there, name, name + ".in")
        for there in topology.steps[step].satellites
    )


def get_connection(topology: Topology, node: str, *, satellite: str = "") -> Plan:
    """The socket plan of one node (a step, ``<pool>.queue``, orchester, tracker) on a satellite.

    Routers bind, workers connect; a peer on the same satellite is reached over
    ipc in the satellite's runtime directory, one on another satellite over tcp.
    """
    satellite = satellite or next(iter(topology.satellites))
    if satellite not in topology.satellites:
        raise TopologyError([Problem(topology.path, f"satellite.{satellite}", "no such satellite")])
    events = SocketPlan(
        "events", "DEALER", False, (ipc_address(topology, satellite, "tracker.events"),)
    )
    if node == ORCHESTER:
        entries = tuple(
            SocketPlan(
                f"out:{s.name}", "DEALER", False, _inbox_addresses(topology, satellite, s.name)
            )
            for s in topology.steps.values()
            if s.kind is not Kind.SOURCE
        )
        submit = SocketPlan(
            "submit", "ROUTER", True, _exposed(topology, satellite, ORCHESTER, ORCHESTER)
        )
        return Plan(node, Role.ORCHESTER, satellite, (submit, *entries, events))
    if node == TRACKER:
        sockets = tuple(
            SocketPlan(
                purpose,
                kind,
                True,
                _exposed(topology, satellite, f"tracker.{purpose}", f"tracker.{purpose}"),
            )
            for purpose, kind in (("events", "ROUTER"), ("query", "ROUTER"), ("pub", "XPUB"))
        )
        return Plan(node, Role.TRACKER, satellite, sockets)

    step_name = node.removesuffix(QUEUE_SUFFIX)
    step = topology.steps.get(step_name)
    if step is None or (node != step_name and step.kind is not Kind.POOL):
        raise TopologyError([Problem(topology.path, node, "no such step or queue")])
    if satellite not in step.satellites:
        raise TopologyError(
            [Problem(topology.path, f"step.{step.name}", f"does not run on satellite {satellite}")]
        )
    outs = tuple(
        SocketPlan(
            f"out:{link.target}",
            "DEALER",
            False,
            _inbox_addresses(topology, satellite, link.target),
            link.pattern,
        )
        for link in topology.links_from(step.name)
    )
    inbox = SocketPlan("in", "ROUTER", True, _exposed(topology, satellite, node, node + ".in"))
    work_address = ipc_address(topology, satellite, step.name + ".work")
    if node != step_name:  # the queue in front of a pool: results come back through it
        work = SocketPlan("work", "ROUTER", True, (work_address,))
        return Plan(node, Role.QUEUE, satellite, (inbox, work, *outs, events))
    if step.kind is Kind.POOL:  # a worker talks to its queue only
        work = SocketPlan("work", "DEALER", False, (work_address,))
        return Plan(node, Role.WORKER, satellite, (work,))
    if step.kind is Kind.SOURCE:
        submit = SocketPlan(
            "submit", "DEALER", False, (ipc_address(topology, satellite, ORCHESTER),)
        )
        return Plan(node, Role.SOURCE, satellite, (submit, events))
    return Plan(node, Role(step.kind.value), satellite, (inbox, *outs, events))


# ---------------------------------------------------------------------------
# loading and checking


def parse_duration(value: object) -> float:
    """Seconds from a number or a string like ``"250ms"``, ``"2s"``, ``"1.5m"``, ``"1h"``."""
    if isinstance(value, bool):
        raise ValueError(f"bad duration {value!r}: {_DURATION_HELP}")
    if isinstance(value, int | float):
        try:
            seconds = float(value)
        except OverflowError:  # an int past float's range (JSON and TOML allow them)
            raise ValueError(f"bad duration {value!r:.40}: too large") from None
    elif isinstance(value, str) and (match := _DURATION.fullmatch(value)):
        seconds = float(match.group(1)) * _UNITS[match.group(2)]
    else:
        raise ValueError(f"bad duration {value!r}: {_DURATION_HELP}")
    if not seconds >= 0 or seconds == float("inf"):
        raise ValueError(f"bad duration {value!r}: need a finite number of seconds >= 0")
    return seconds


def resolve_call(spec: str, search_path: Sequence[str] = ()) -> Callable[..., Any]:
    """Import ``"module:function"`` (with ``search_path`` first on sys.path) and return it.

    Raises:
        ImportError: the module does not import, has no such name, or it is not callable.
    """
    module_name, _, attribute = spec.partition(":")
    for directory in reversed(search_path):
        if directory not in sys.path:
            sys.path.insert(0, directory)
    try:
        target: Any = importlib.import_module(module_name)
    except ImportError:
        raise
    except (Exception, SystemExit) as exc:  # user code failing at import: report it
        reason = f"{type(exc).__name__}: {exc}"
        raise ImportError(f"module {module_name} fails at import: {reason}") from exc
    for part in attribute.split("."):
        try:
            target = getattr(target, part)
        except AttributeError:
            raise ImportError(f"module {module_name} has no attribute {attribute}") from None
    if not callable(target):
        raise ImportError(f"{spec} is a {type(target).__name__}, not a callable")
    return target  # type: ignore[no-any-return]


def load_topology(path: str | os.PathLike[str], *, check_imports: bool = True) -> Topology:
    """Read and check a topology file (TOML, or JSON by its ``.json`` suffix).

    ``check_imports=False`` skips importing ``call`` and ``when`` functions, for
    clients that only need the addresses.

    Raises:
        TopologyError: listing every problem found, each with file, place and reason.
    """
    # the real path: a symlink to a topology is the same topology (the same satellite,
    # runtime directory, journals and lock), and relative paths are the real file's
    file = os.path.realpath(os.fspath(path))
    try:
        text = Path(file).read_bytes()
    except OSError as exc:
        raise TopologyError([Problem(file, "file", f"cannot read: {exc.strerror or exc}")]) from exc
    try:
        data = _parse(file, text)
    except _ParseError as exc:
        raise TopologyError([Problem(file, "file", str(exc))]) from None
    loader = _Loader(file, data)
    topology = loader.build()
    if check_imports:
        loader.check_imports(topology)
    if loader.problems:
        raise TopologyError(loader.problems)
    return topology


class _ParseError(Exception):
    pass


def _parse(file: str, text: bytes) -> dict[str, Any]:
    if file.endswith(".json"):
        try:
            data = json.loads(text, object_pairs_hook=_no_duplicate_keys)
        except _ParseError:
            raise
        except (ValueError, RecursionError) as exc:
            raise _ParseError(f"not valid JSON: {exc}") from exc
        if not isinstance(data, dict):
            raise _ParseError("not a topology: the top level must be an object")
        try:  # JSON's \uXXXX escapes can make lone surrogates, which no path or name can hold
            json.dumps(data, ensure_ascii=False).encode("utf-8")
        except (UnicodeEncodeError, RecursionError) as exc:
            raise _ParseError(f"not valid JSON text: {exc}") from exc
        return data
    try:
        return tomllib.loads(text.decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise _ParseError(f"not UTF-8 text: {exc}") from exc
    except (tomllib.TOMLDecodeError, RecursionError) as exc:
        raise _ParseError(f"not valid TOML: {exc}") from exc


def _no_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    seen: dict[str, Any] = {}
    for key, value in pairs:
        if key in seen:
            raise _ParseError(f"duplicate name {key!r}")
        seen[key] = value
    return seen


_TOP_FIELDS: Final = ("satellite", "step", "link", "store", "defaults", "path", "client")
_SATELLITE_FIELDS: Final = (
    "host",
    "base_port",
    "runtime_dir",
    "state_dir",
    "log_dir",
    "log_max_size",
    "public_key",
    "secret_key_file",
    "insecure",
)
_STEP_FIELDS: Final = (
    "kind",
    "call",
    "every",
    "workers",
    "timeout",
    "retries",
    "backoff",
    "satellite",
    "satellites",
    "serialization",
    "entry",
    "max_queue",
    "prefetch",
    "port",
    "options",
    "autoscale",
)
_LINK_FIELDS: Final = ("from", "to", "pattern", "when")
_STORE_FIELDS: Final = ("url", "retention", "max_result_size")
_DEFAULT_FIELDS: Final = (
    "timeout",
    "retries",
    "backoff",
    "serialization",
    "allow_pickle",
    "max_message_size",
    "hwm",
    "max_queue",
    "max_live",
)


@dataclass
class _Loader:
    """Turns parsed data into a Topology, collecting every problem on the way."""

    file: str
    data: dict[str, Any]
    problems: list[Problem] = field(default_factory=list)
    # every `from` and `to` a link names, valid or not: a link that failed its own
    # check must not also make its ends look unlinked (one mistake, one problem)
    named_ends: set[tuple[str, str]] = field(default_factory=set)

    def problem(self, where: str, reason: str) -> None:
        self.problems.append(Problem(self.file, where, reason))

    def table(self, value: object, where: str, fields: Sequence[str]) -> dict[str, Any]:
        """A table of known fields; unknown ones are reported with a suggestion."""
        if not isinstance(value, dict):
            self.problem(where, f"need a table, got {_type(value)}")
            return {}
        for key in value:
            if key not in fields:
                close = difflib.get_close_matches(str(key), fields, n=1)
                hint = f" (did you mean {close[0]!r}?)" if close else ""
                self.problem(where, f"unknown field {key!r}{hint}")
        return value

    def get(
        self,
        table: dict[str, Any],
        key: str,
        kind: type | tuple[type, ...],
        where: str,
        default: Any,
    ) -> Any:
        if key not in table:
            return default
        value = table[key]
        kinds = kind if isinstance(kind, tuple) else (kind,)
        ok = isinstance(value, kinds) and not (isinstance(value, bool) and bool not in kinds)
        if not ok:
            names = " or ".join(k.__name__ for k in kinds)
            self.problem(where, f"{key}: need {names}, got {_type(value)}")
            return default
        return value

    def duration(
        self, table: dict[str, Any], key: str, where: str, default: float, *, positive: bool = True
    ) -> float:
        if key not in table:
            return default
        try:
            seconds = parse_duration(table[key])
        except ValueError as exc:
            self.problem(where, f"{key}: {exc}")
            return default
        if positive and seconds <= 0:
            self.problem(where, f"{key}: need more than 0 seconds, got {table[key]!r}")
            return default
        return seconds

    def count(
        self,
        table: dict[str, Any],
        key: str,
        where: str,
        default: int,
        low: int = 0,
        high: int = 2**31,
    ) -> int:
        value = self.get(table, key, int, where, default)
        if not low <= value <= high:
            self.problem(where, f"{key}: need {low} <= {key} <= {high}, got {value}")
            return default
        return int(value)

    # -- sections

    def build(self) -> Topology:
        top = self.table(self.data, "file", _TOP_FIELDS)
        directory = os.path.dirname(self.file)
        extra = self.strings(top, "path", "path")
        python_path = (*(os.path.normpath(os.path.join(directory, p)) for p in extra), directory)
        defaults = self.defaults(top.get("defaults", {}))
        satellites = self.satellites(top.get("satellite", {}), directory)
        store = self.store(top.get("store", {}))
        steps = self.steps(top.get("step", {}), defaults, satellites)
        links = self.links(top.get("link", []), steps)
        self.check_ipc_paths(satellites, steps)
        clients = self.clients(top.get("client", {}))
        topology = Topology(
            self.file, satellites, steps, links, store, defaults, python_path, clients
        )
        # Whole-graph checks run on what did load, so one bad field hides nothing else.
        self.check_graph(topology)
        self.check_addresses(topology)
        self.check_keys(topology)
        return topology

    def strings(self, table: dict[str, Any], key: str, where: str) -> tuple[str, ...]:
        value = table.get(key, [])
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            self.problem(where, f"{key}: need a string or a list of strings, got {_type(value)}")
            return ()
        return tuple(value)

    def defaults(self, value: object) -> Defaults:
        where = "defaults"
        table = self.table(value, where, _DEFAULT_FIELDS)
        base = Defaults()
        serialization = self.get(table, "serialization", str, where, base.serialization)
        if serialization not in SERIALIZATIONS:
            self.problem(where, f"serialization: {serialization!r} is not one of {SERIALIZATIONS}")
            serialization = base.serialization
        return Defaults(
            timeout=self.duration(table, "timeout", where, base.timeout),
            retries=self.count(table, "retries", where, base.retries, 0, 1000),
            backoff=self.duration(table, "backoff", where, base.backoff, positive=False),
            serialization=serialization,
            allow_pickle=self.get(table, "allow_pickle", bool, where, base.allow_pickle),
            max_message_size=self.count(
                table, "max_message_size", where, base.max_message_size, 1024, 2**31
            ),
            hwm=self.count(table, "hwm", where, base.hwm, 1, 10_000_000),
            max_queue=self.count(table, "max_queue", where, base.max_queue, 1, 100_000_000),
            max_live=self.count(table, "max_live", where, base.max_live, 1, 100_000_000),
        )

    def satellites(self, value: object, directory: str) -> dict[str, Satellite]:
        if not isinstance(value, dict):
            self.problem("satellite", f"need a table of satellites, got {_type(value)}")
            value = {}
        declared = value or {LOCAL: {}}
        found: dict[str, Satellite] = {}
        for name, raw in declared.items():
            where = f"satellite.{name}"
            if not _NAME.fullmatch(str(name)):
                self.problem(where, "bad name: use letters, digits, '_' and '-' (max 64)")
                continue
            table = self.table(raw, where, _SATELLITE_FIELDS)
            port = self.count(table, "base_port", where, 7400, 1, 65535 - 512)
            runtime = self.get(table, "runtime_dir", str, where, "")
            runtime = (
                os.path.normpath(os.path.join(directory, runtime))
                if runtime
                else _default_runtime_dir(self.file, name)
            )
            state = self.get(table, "state_dir", str, where, "")
            state = os.path.normpath(os.path.join(directory, state or os.path.join(".dsat", name)))
            logs = self.get(table, "log_dir", str, where, "")
            found[name] = Satellite(
                name=name,
                host=self.get(table, "host", str, where, "127.0.0.1"),
                base_port=port,
                runtime_dir=runtime,
                state_dir=state,
                log_dir=os.path.normpath(os.path.join(directory, logs)) if logs else state,
                log_max_size=self.count(
                    table, "log_max_size", where, Satellite.log_max_size, 64 * 1024, 2**40
                ),
                public_key=self.get(table, "public_key", str, where, ""),
                secret_key_file=self.get(table, "secret_key_file", str, where, ""),
                insecure=self.get(table, "insecure", bool, where, False),
            )
        return found

    def clients(self, value: object) -> dict[str, str]:
        """Clients allowed to connect over tcp: ``[client.NAME] public_key = ...``."""
        if not isinstance(value, dict):
            self.problem("client", f"need a table of clients, got {_type(value)}")
            return {}
        found: dict[str, str] = {}
        for name, raw in value.items():
            where = f"client.{name}"
            table = self.table(raw, where, ("public_key",))
            key = self.get(table, "public_key", str, where, "")
            if not key:
                self.problem(where, "public_key: missing (make a pair: dsat keys generate NAME)")
                continue
            found[str(name)] = key
        return found

    def check_keys(self, topology: Topology) -> None:
        """Satellites linked over tcp need CURVE keys, unless the topology says insecure."""
        if not topology.networked:
            return
        for satellite in topology.satellites.values():
            where = f"satellite.{satellite.name}"
            if satellite.insecure:
                continue
            missing = [f for f in ("public_key", "secret_key_file") if not getattr(satellite, f)]
            if missing:
                self.problem(
                    where,
                    f"{' and '.join(missing)}: links between satellites are CURVE-encrypted; "
                    f"make a pair with `dsat keys generate {satellite.name}`, or set "
                    "insecure = true to run them in clear",
                )

    def store(self, value: object) -> Store:
        where = "store"
        table = self.table(value, where, _STORE_FIELDS)
        url = self.get(table, "url", str, where, "")
        if url and not url.startswith(("sqlite:///", "postgresql://", "postgres://")):
            self.problem(where, f"url: {url!r}: use sqlite:///PATH or postgresql://...")
        if url.startswith("sqlite:///"):
            path = url.removeprefix("sqlite:///")
            url = "sqlite:///" + os.path.normpath(os.path.join(os.path.dirname(self.file), path))
        return Store(
            url=url,
            retention=self.duration(table, "retention", where, Store.retention),
            max_result_size=self.count(
                table, "max_result_size", where, Store.max_result_size, 0, 2**31
            ),
        )

    def steps(
        self, value: object, defaults: Defaults, satellites: Mapping[str, Satellite]
    ) -> dict[str, Step]:
        if not isinstance(value, dict):
            self.problem("step", f"need a table of steps, got {_type(value)}")
            return {}
        if not value:
            self.problem("step", "no steps: a topology needs at least one [step.NAME]")
        found: dict[str, Step] = {}
        for name, raw in value.items():
            step = self.step(str(name), raw, defaults, satellites)
            if step is not None:
                found[step.name] = step
        return found

    def step(
        self, name: str, raw: object, defaults: Defaults, satellites: Mapping[str, Satellite]
    ) -> Step | None:
        where = f"step.{name}"
        if not _NAME.fullmatch(name):
            self.problem(where, "bad name: use letters, digits, '_' and '-' (max 64)")
            return None
        if name in RESERVED:
            self.problem(where, f"{name!r} is a reserved name ({', '.join(sorted(RESERVED))})")
            return None
        table = self.table(raw, where, _STEP_FIELDS)
        kind_text = self.get(table, "kind", str, where, "source" if "every" in table else "pool")
        try:
            kind = Kind(kind_text)
        except ValueError:
            self.problem(where, f"kind: {kind_text!r} is not one of {', '.join(k for k in Kind)}")
            return None
        call = self.get(table, "call", str, where, "")
        if call and not _CALL.fullmatch(call):
            self.problem(where, f"call: {call!r}: need 'module:function'")
        if kind in (Kind.POOL, Kind.SINK) and not call:
            self.problem(where, f"call: a {kind} needs a function: call = 'module:function'")
        if kind is Kind.ROUTER and call:
            self.problem(where, "call: a router forwards tasks and runs no function")
        every = 0.0
        if kind is Kind.SOURCE:
            if "every" not in table:
                self.problem(where, "every: a source needs a period, e.g. every = '2s'")
            every = self.duration(table, "every", where, 1.0)
        elif "every" in table:
            self.problem(where, f"every: only sources have a period, this is a {kind}")
        workers = Workers()
        if "workers" in table:
            if kind is not Kind.POOL:
                self.problem(where, f"workers: only pools have workers, this is a {kind}")
            else:
                workers = self.workers(table["workers"], where)
        placement = self.strings(table, "satellites", where) + self.strings(
            table, "satellite", where
        )
        for satellite in placement:
            if satellite not in satellites:
                known = ", ".join(satellites) or "none"
                self.problem(where, f"satellite {satellite!r} is not defined (defined: {known})")
        if len(set(placement)) != len(placement):
            self.problem(where, "satellites: a satellite is named twice")
        if not placement and satellites:
            placement = (next(iter(satellites)),)
        if kind is Kind.SOURCE and len(placement) > 1:
            self.problem(where, "satellites: a source runs on one satellite")
        serialization = self.get(table, "serialization", str, where, defaults.serialization)
        if serialization not in SERIALIZATIONS:
            self.problem(where, f"serialization: {serialization!r} is not one of {SERIALIZATIONS}")
        if serialization == "pickle" and not defaults.allow_pickle:
            self.problem(
                where,
                "serialization: pickle runs code when loaded; set allow_pickle = true "
                "in [defaults] to use it",
            )
        return Step(
            name=name,
            kind=kind,
            call=call,
            every=every,
            workers=workers,
            timeout=self.duration(table, "timeout", where, defaults.timeout),
            retries=self.count(table, "retries", where, defaults.retries, 0, 1000),
            backoff=self.duration(table, "backoff", where, defaults.backoff, positive=False),
            satellites=tuple(dict.fromkeys(placement)),
            serialization=serialization,
            entry=self.get(table, "entry", bool, where, False),
            max_queue=self.count(table, "max_queue", where, defaults.max_queue, 1, 100_000_000),
            port=self.count(table, "port", where, 0, 0, 65535),
            prefetch=self.count(table, "prefetch", where, 64, 1, 1024),
            options=self.get(table, "options", dict, where, {}),
            autoscale=self.autoscale(table, kind, where),
        )

    def autoscale(self, table: dict[str, Any], kind: Kind, where: str) -> Autoscale:
        if "autoscale" not in table:
            return Autoscale()
        if kind is not Kind.POOL:
            self.problem(where, f"autoscale: only pools scale, this is a {kind}")
            return Autoscale()
        knobs = self.table(
            table["autoscale"], where + ".autoscale", ("up_after", "idle_after", "cooldown")
        )
        base = Autoscale()
        return Autoscale(
            up_after=self.duration(knobs, "up_after", where + ".autoscale", base.up_after),
            idle_after=self.duration(knobs, "idle_after", where + ".autoscale", base.idle_after),
            cooldown=self.duration(
                knobs, "cooldown", where + ".autoscale", base.cooldown, positive=False
            ),
        )

    def workers(self, value: object, where: str) -> Workers:
        if isinstance(value, int) and not isinstance(value, bool):
            low = high = value
        elif isinstance(value, dict):
            table = self.table(value, where + ".workers", ("min", "max"))
            low = self.get(table, "min", int, where, 1)
            high = self.get(table, "max", int, where, max(low, 1))
        else:
            self.problem(where, f"workers: need a number or {{min, max}}, got {_type(value)}")
            return Workers()
        if not 1 <= low <= high:
            self.problem(where, f"workers: need 1 <= min <= max, got {low}..{high}")
            return Workers()
        if high > 1024:
            self.problem(where, f"workers: max {high} is over the limit of 1024")
            return Workers()
        return Workers(low, high)

    def links(self, value: object, steps: Mapping[str, Step]) -> tuple[Link, ...]:
        if not isinstance(value, list):
            self.problem("link", f"need an array of [[link]] tables, got {_type(value)}")
            return ()
        found: list[Link] = []
        for index, raw in enumerate(value, start=1):
            label = f"link #{index}"
            if isinstance(raw, dict):
                label = f"link {raw.get('from', '?')} -> {raw.get('to', '?')}"
            table = self.table(raw, label, _LINK_FIELDS)
            source = self.get(table, "from", str, label, "")
            target = self.get(table, "to", str, label, "")
            self.named_ends.add((source, target))
            bad = False
            for key, name in (("from", source), ("to", target)):
                if not name:
                    self.problem(label, f"{key}: missing: a link needs from and to")
                    bad = True
                elif name not in steps:
                    close = difflib.get_close_matches(name, list(steps), n=1)
                    hint = f" (did you mean {close[0]!r}?)" if close else ""
                    if close:  # the fix is likely that name: do not also report it unlinked
                        ends = (close[0], target) if key == "from" else (source, close[0])
                        self.named_ends.add(ends)
                    self.problem(label, f"{key}: unknown step {name!r}{hint}")
                    bad = True
            pattern_text = self.get(table, "pattern", str, label, "push")
            try:
                pattern = Pattern(pattern_text)
            except ValueError:
                self.problem(label, f"pattern: {pattern_text!r} is not push or pub")
                pattern = Pattern.PUSH
            when = self.get(table, "when", str, label, "")
            if when and not _CALL.fullmatch(when):
                self.problem(label, f"when: {when!r}: need 'module:function'")
            if bad:
                continue
            if steps[target].kind is Kind.SOURCE:
                self.problem(label, f"to: {target!r} is a source; sources take no input")
                continue
            if source == target:
                self.problem(label, "a step cannot link to itself")
                continue
            link = Link(source, target, pattern, when)
            if any((old.source, old.target) == (source, target) for old in found):
                self.problem(label, "duplicate link: this pair is linked twice")
                continue
            found.append(link)
        return tuple(found)

    # -- whole-graph checks

    def check_ipc_paths(
        self, satellites: Mapping[str, Satellite], steps: Mapping[str, Step]
    ) -> None:
        """Every ipc path a satellite binds (``<runtime_dir>/<name>``) must fit ZeroMQ's limit."""
        for satellite in satellites.values():
            longest = max(
                [_IPC_NAME_RESERVE]
                + [
                    len(step.name + QUEUE_SUFFIX + ".in")  # the longest name a step binds
                    for step in steps.values()
                    if satellite.name in step.satellites
                ]
            )
            size = len(satellite.runtime_dir.encode()) + 1 + longest
            if size > IPC_PATH_LIMIT:
                self.problem(
                    f"satellite.{satellite.name}",
                    f"runtime_dir: {satellite.runtime_dir!r} makes ipc paths of up to {size} "
                    f"bytes; ZeroMQ allows about {IPC_PATH_LIMIT}: choose a shorter directory",
                )

    def check_graph(self, topology: Topology) -> None:
        fed = {link.target for link in topology.links}
        named_sources = {source for source, _ in self.named_ends}
        named_targets = {target for _, target in self.named_ends}
        starts = [s.name for s in topology.steps.values() if s.kind is Kind.SOURCE or s.entry]
        for step in topology.steps.values():
            if step.kind is Kind.SOURCE:
                if step.entry:
                    self.problem(f"step.{step.name}", "entry: a source takes no submissions")
                if step.name not in named_sources:
                    self.problem(f"step.{step.name}", "a source with no link: its tasks go nowhere")
            elif step.name not in fed and not step.entry:
                # Walk on from it anyway: what it feeds is not unreachable on its own account.
                starts.append(step.name)
                if step.name not in named_targets:
                    self.problem(
                        f"step.{step.name}",
                        f"{step.kind} with no input: no link leads to it and it is not an entry "
                        "(add a link to it, or entry = true to submit to it)",
                    )
        reached = set(starts)
        frontier = list(starts)
        while frontier:
            for link in topology.links_from(frontier.pop()):
                if link.target not in reached:
                    reached.add(link.target)
                    frontier.append(link.target)
        for step in topology.steps.values():
            if step.name not in reached and step.name in fed:
                self.problem(
                    f"step.{step.name}",
                    "unreachable: no path leads to it from a source or an entry",
                )

    def check_addresses(self, topology: Topology) -> None:
        seen: dict[str, str] = {}
        for satellite in topology.satellites.values():
            for name, port in tcp_ports(topology, satellite.name).items():
                address = f"tcp://{satellite.host}:{port}"
                owner = f"{satellite.name}/{name}"
                if address in seen:
                    step = name.removesuffix(QUEUE_SUFFIX)
                    where = (
                        f"step.{step}" if step in topology.steps else f"satellite.{satellite.name}"
                    )
                    self.problem(
                        where, f"address {address} is used twice: {seen[address]} and {owner}"
                    )
                else:
                    seen[address] = owner
        runtime: dict[str, str] = {}
        for satellite in topology.satellites.values():
            other = runtime.setdefault(satellite.runtime_dir, satellite.name)
            if other != satellite.name:
                self.problem(
                    f"satellite.{satellite.name}",
                    f"runtime_dir {satellite.runtime_dir!r} is also {other}'s: ipc addresses clash",
                )

    def check_imports(self, topology: Topology) -> None:
        for step in topology.steps.values():
            if step.call:
                try:
                    resolve_call(step.call, topology.python_path)
                except ImportError as exc:
                    self.problem(f"step.{step.name}", f"call {step.call!r}: {exc}")
        for link in topology.links:
            if link.when:
                try:
                    resolve_call(link.when, topology.python_path)
                except ImportError as exc:
                    self.problem(f"link {link}", f"when {link.when!r}: {exc}")


def _default_runtime_dir(file: str, satellite: str) -> str:
    """A short private directory per (topology file, satellite); ipc paths must stay short."""
    base = os.environ.get("XDG_RUNTIME_DIR") or "/tmp"
    digest = hashlib.sha256(f"{file}\0{satellite}".encode()).hexdigest()[:12]
    return os.path.join(base, f"dsat-{os.getuid()}", digest)


def ensure_private_dir(path: str) -> str:
    """Create a directory (and missing parents) with mode 0700; refuse one that is not ours."""
    missing: list[str] = []
    head = os.path.abspath(path)
    while not os.path.exists(head):
        missing.append(head)
        head = os.path.dirname(head)
    for directory in reversed(missing):
        with contextlib.suppress(FileExistsError):  # created meanwhile by a sibling
            os.mkdir(directory, 0o700)
    info = os.stat(path)
    if info.st_uid != os.getuid():
        raise TopologyError([Problem(path, "runtime_dir", "owned by another user; refusing it")])
    if info.st_mode & 0o077:
        os.chmod(path, 0o700)
    return path


def _type(value: object) -> str:
    if isinstance(value, dict):
        return "a table"
    if isinstance(value, list):
        return "an array"
    return f"{type(value).__name__} {value!r:.40}"
