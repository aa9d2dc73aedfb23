"""Hosts on one machine: a network namespace per satellite, joined by a bridge.

Each host gets its own namespace, a veth pair to a bridge in the test's own
namespace, and its own address; the test (in its own namespace) reaches every
host through the bridge, and cuts one off by setting its link down. Everything
is created and removed by the fixture; names carry the test process's pid so
parallel runs do not collide. Where namespaces cannot be created (no root, no
`ip`), hosts are 127.0.0.x addresses on this machine and a host is cut off by
SIGKILLing every process of its satellite (the fixture says which, in the test
output).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
import tempfile
import textwrap
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import pytest

from conftest import RunningSatellite
from dsat.curve import generate


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, timeout=30)


class Network:
    """Three (or more) hosts, each with an address; `run` starts a satellite on one."""

    def __init__(self, names: Sequence[str]) -> None:
        self.names = list(names)
        self.tag = f"{os.getpid() % 100000}"
        self.subnet = f"10.{200 + os.getpid() % 50}.{os.getpid() % 250}"
        self.namespaces: dict[str, str] = {}
        self.links: dict[str, str] = {}
        self.bridge = f"dbr{self.tag}"
        self.isolated = False
        try:
            self._create()
            self.isolated = True
        except (OSError, subprocess.SubprocessError):
            self.close()
            self.namespaces.clear()

    def _create(self) -> None:
        if os.geteuid() != 0 or shutil.which("ip") is None:
            raise OSError("network namespaces need root and iproute2")
        if os.environ.get("DSAT_TEST_NO_NETNS"):  # to run the fallback on purpose
            raise OSError("namespaces turned off by DSAT_TEST_NO_NETNS")
        _ip("link", "add", self.bridge, "type", "bridge")
        _ip("addr", "add", f"{self.subnet}.254/24", "dev", self.bridge)
        _ip("link", "set", self.bridge, "up")
        for index, name in enumerate(self.names, start=1):
            namespace = f"dsat{self.tag}{name}"
            outside = f"dv{self.tag}{index}"
            _ip("netns", "add", namespace)
            self.namespaces[name] = namespace
            _ip("link", "add", outside, "type", "veth", "peer", "name", "eth0", "netns", namespace)
            self.links[name] = outside
            _ip("link", "set", outside, "master", self.bridge)
            _ip("link", "set", outside, "up")
            inside = ("netns", "exec", namespace, "ip")
            _ip(*inside, "addr", "add", f"{self.subnet}.{index}/24", "dev", "eth0")
            _ip(*inside, "link", "set", "eth0", "up")
            _ip(*inside, "link", "set", "lo", "up")

    def host(self, name: str) -> str:
        index = self.names.index(name) + 1
        return f"{self.subnet}.{index}" if self.isolated else f"127.0.0.{index}"

    def prefix(self, name: str) -> tuple[str, ...]:
        """The command prefix that runs a program on that host."""
        return ("ip", "netns", "exec", self.namespaces[name]) if self.isolated else ()

    def cut(self, name: str, running: RunningSatellite) -> str:
        """Cut a host off the network (or, without namespaces, kill its satellite)."""
        if self.isolated:
            _ip("link", "set", self.links[name], "down")
            return "link down"
        running.kill_all()  # every process of it at once, as if its host went away
        return "every process SIGKILLed"

    def close(self) -> None:
        for namespace in self.namespaces.values():
            with contextlib.suppress(subprocess.SubprocessError, OSError):
                _ip("netns", "del", namespace)
        for link in self.links.values():
            with contextlib.suppress(subprocess.SubprocessError, OSError):
                _ip("link", "del", link)
        with contextlib.suppress(subprocess.SubprocessError, OSError):
            _ip("link", "del", self.bridge)


class Constellation:
    """A topology of several satellites written in a directory, with keys and runs."""

    def __init__(self, directory: Path, network: Network) -> None:
        self.directory = directory
        self.network = network
        self.runs: dict[str, RunningSatellite] = {}
        self.runtime = Path(tempfile.mkdtemp(prefix="dsat-", dir="/tmp"))
        self.topology = directory / "topology.toml"
        keys = directory / "keys"
        for name in [*network.names, "client", "stranger"]:
            generate(name, str(keys))

    def satellites(self) -> str:
        """The [satellite.*] tables: each on its host, with its keys and runtime dir."""
        text = ""
        for name in self.network.names:
            text += textwrap.dedent(
                f"""
                [satellite.{name}]
                host = "{self.network.host(name)}"
                base_port = 7700
                runtime_dir = "{self.runtime}/{name}"
                public_key = "keys/{name}.key"
                secret_key_file = "keys/{name}.key_secret"
                """
            )
        return text + '\n[client.client]\npublic_key = "keys/client.key"\n'

    def write(self, steps: str, modules: dict[str, str]) -> Path:
        for name, code in modules.items():
            (self.directory / f"{name}.py").write_text(textwrap.dedent(code))
        self.topology.write_text(self.satellites() + textwrap.dedent(steps))
        return self.topology

    def start(self, name: str) -> RunningSatellite:
        running = RunningSatellite(
            self.directory, self.topology, satellite=name, prefix=self.network.prefix(name)
        )
        self.runs[name] = running
        return running.start()

    def close(self) -> None:
        for running in self.runs.values():
            if running.process is not None and running.process.poll() is None:
                with contextlib.suppress(AssertionError):
                    running.stop()
            running.kill_all()
        shutil.rmtree(self.runtime, ignore_errors=True)


@pytest.fixture(name="constellation")
def constellation_fixture(tmp_path: Path) -> Iterator[Callable[[Sequence[str]], Constellation]]:
    """`constellation(["a", "b", "c"])`: hosts in namespaces (or on 127.0.0.x), keys made."""
    made: list[tuple[Network, Constellation]] = []

    def make(names: Sequence[str]) -> Constellation:
        network = Network(names)
        how = "network namespaces" if network.isolated else "127.0.0.x (no namespaces here)"
        print(f"\nhosts: {how}", file=sys.__stdout__, flush=True)
        built = Constellation(tmp_path, network)
        made.append((network, built))
        return built

    yield make
    for network, built in made:
        built.close()
        network.close()
