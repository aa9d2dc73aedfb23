"""Secure links between satellites: CURVE keys, an allow-list, and who was turned away.

Links between satellites (tcp) are CURVE-encrypted. CURVE alone lets in any
client that knows the server's public key, so every process that binds a tcp
socket also runs a ZAP handler with an allow-list: the public keys of the
topology's satellites and of its declared clients. A client with another key,
or without CURVE at all, completes no handshake: none of its messages reaches
the application. Each refusal is counted per socket and logged (at most once
a second).

Sockets on ``ipc://`` stay plain: they live in the satellite's private (0700)
runtime directory, which only its user can reach.

Keys are z85 text files made by ``dsat keys generate NAME``: ``NAME.key`` (the
public key, to share) and ``NAME.key_secret`` (the secret key, mode 0600).
"""

from __future__ import annotations

import logging
import os
import time
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Final

import zmq
import zmq.auth.thread

from dsat.errors import DsatError
from dsat.topology import Topology

log = logging.getLogger("dsat.curve")

Context = zmq.Context[zmq.Socket[bytes]]

FAILED: Final = (
    zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL
    | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL
    | zmq.EVENT_HANDSHAKE_FAILED_AUTH
)


class CurveKeyError(DsatError):
    """A key file is missing, unreadable, or not a CURVE key."""


@dataclass(frozen=True)
class KeyPair:
    """A CURVE key pair, z85 text."""

    public: bytes
    secret: bytes


def generate(name: str, directory: str) -> tuple[str, str]:
    """Write NAME.key (public) and NAME.key_secret (secret, 0600) in a directory; return paths."""
    if not name or "/" in name or name.startswith("."):
        raise CurveKeyError(f"key name {name!r}: use a plain name like the satellite's")
    os.makedirs(directory, exist_ok=True)
    public, secret = zmq.curve_keypair()
    public_path = os.path.join(directory, f"{name}.key")
    secret_path = os.path.join(directory, f"{name}.key_secret")
    for path in (public_path, secret_path):
        if os.path.exists(path):
            raise CurveKeyError(f"{path} exists: remove it first to make a new pair")
    fd = os.open(secret_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as file:
        file.write(secret + b"\n")
    with open(public_path, "wb") as file:
        file.write(public + b"\n")
    return public_path, secret_path


def read_key(text_or_path: str, base: str = "") -> bytes:
    """A z85 key, given as its 40 characters or as the path of a file holding them."""
    candidate = text_or_path.strip()
    if len(candidate) == 40 and not os.path.exists(os.path.join(base, candidate)):
        key = candidate.encode("ascii", errors="replace")
    else:
        path = os.path.join(base, candidate)
        try:
            with open(path, "rb") as file:
                key = file.read().strip()
        except OSError as exc:
            raise CurveKeyError(f"cannot read key {path}: {exc.strerror or exc}") from exc
    try:
        if len(zmq.utils.z85.decode(key)) != 32:
            raise ValueError("not 32 bytes")
    except (ValueError, KeyError) as exc:
        raise CurveKeyError(f"{text_or_path!r} is not a z85 CURVE key ({exc})") from exc
    return key


def public_of(secret: bytes) -> bytes:
    """The public key that goes with a secret key."""
    return zmq.curve_public(secret)


class Guard:
    """CURVE for one process: server and client settings, the allow-list, refusals counted."""

    def __init__(self, context: Context, keys: KeyPair, allowed: set[bytes]) -> None:
        self.keys = keys
        self.allowed = set(allowed)
        self.refused: Counter[str] = Counter()
        self._last_log: dict[tuple[str, str], float] = {}
        self._monitors: dict[Any, str] = {}
        self.authenticator = zmq.auth.thread.ThreadAuthenticator(context, log=log)
        self.authenticator.start()
        self.authenticator.configure_curve_callback(domain="dsat", credentials_provider=self)

    def callback(self, domain: str, key: bytes | str) -> bool:
        """The ZAP decision: is this client's public key on the allow-list?"""
        raw = key.encode() if isinstance(key, str) else key
        return raw in self.allowed

    def serve(self, socket: zmq.Socket[bytes], purpose: str) -> zmq.Socket[bytes]:
        """Make a socket a CURVE server (before it binds); return the monitor to poll."""
        socket.curve_secretkey = self.keys.secret
        socket.curve_publickey = self.keys.public
        socket.curve_server = True
        socket.zap_domain = b"dsat"
        monitor = socket.get_monitor_socket(FAILED)
        self._monitors[monitor] = purpose
        return monitor

    def connect_to(self, socket: zmq.Socket[bytes], server_public: bytes) -> None:
        """Make a socket a CURVE client of a server with this public key (before connect)."""
        socket.curve_secretkey = self.keys.secret
        socket.curve_publickey = self.keys.public
        socket.curve_serverkey = server_public

    @property
    def monitors(self) -> list[Any]:
        return list(self._monitors)

    def read_ready(self, ready: Mapping[Any, int]) -> None:
        """Read the monitors a poll found ready (``ready``: the poll's sockets)."""
        for monitor in self._monitors:
            if monitor in ready:
                self.read(monitor)

    def read(self, monitor: Any) -> None:
        """Count the handshakes a socket refused (wrong key, no CURVE); log a bounded few."""
        from zmq.utils.monitor import recv_monitor_message

        purpose = self._monitors[monitor]
        while True:
            try:
                event = recv_monitor_message(monitor, zmq.NOBLOCK)
            except zmq.Again:
                return
            self.refused[purpose] += 1
            reason = _reason(event["event"])
            now = time.monotonic()
            if now - self._last_log.get((purpose, reason), 0.0) > 1.0:
                self._last_log[(purpose, reason)] = now  # each kind of refusal, once a second
                log.warning(
                    "refused a peer on %s at %s (%d refused so far): %s",
                    purpose,
                    event.get("endpoint", b"?").decode(errors="replace"),
                    sum(self.refused.values()),
                    reason,
                )

    def close(self) -> None:
        for monitor in self._monitors:
            monitor.close(linger=0)
        self.authenticator.stop()


def _reason(event: int) -> str:
    if event == zmq.EVENT_HANDSHAKE_FAILED_AUTH:
        return "its key is not on the allow-list"
    return "it does not speak CURVE, or not with this satellite's key"


# ---------------------------------------------------------------------------
# a satellite's sockets


def guard_for(topology: Topology, satellite: str, context: Context) -> Guard | None:
    """The CURVE guard of a process of this satellite; None when its links need none.

    Raises:
        CurveKeyError: keys are named but cannot be read, or do not match.
    """
    if not topology.networked:
        return None
    own = topology.satellites[satellite]
    if own.insecure:
        return None
    secret = read_key(own.secret_key_file, topology.directory)
    public = public_of(secret)
    if own.public_key and read_key(own.public_key, topology.directory) != public:
        raise CurveKeyError(
            f"satellite {satellite}: public_key does not go with {own.secret_key_file}"
        )
    return Guard(context, KeyPair(public, secret), allowed_keys(topology))


def allowed_keys(topology: Topology) -> set[bytes]:
    """Who may connect over tcp: the topology's satellites and its declared clients."""
    keys = {
        read_key(s.public_key, topology.directory)
        for s in topology.satellites.values()
        if s.public_key
    }
    keys |= {read_key(key, topology.directory) for key in topology.clients.values()}
    return keys


def server_key(topology: Topology, satellite: str) -> bytes | None:
    """The public key to expect from a satellite's tcp sockets (None: it runs insecure)."""
    target = topology.satellites[satellite]
    if target.insecure or not target.public_key:
        return None
    return read_key(target.public_key, topology.directory)


def bind(
    context: Context,
    kind: int,
    addresses: tuple[str, ...],
    *,
    guard: Guard | None,
    purpose: str,
    setup: Callable[[zmq.Socket[bytes]], None],
) -> list[zmq.Socket[bytes]]:
    """One socket per address: plain on ipc (a private directory), CURVE on tcp."""
    sockets = []
    for address in addresses:
        socket = context.socket(kind)
        setup(socket)
        if address.startswith("tcp://") and guard is not None:
            guard.serve(socket, purpose)
        socket.bind(address)
        sockets.append(socket)
    return sockets


def connect(
    context: Context,
    kind: int,
    address: str,
    *,
    guard: Guard | None,
    server: bytes | None,
    setup: Callable[[zmq.Socket[bytes]], None],
) -> zmq.Socket[bytes]:
    """A socket connected to one address: a CURVE client when it is tcp to a keyed peer."""
    socket = context.socket(kind)
    setup(socket)
    if address.startswith("tcp://") and server is not None:
        if guard is None:
            raise CurveKeyError(f"{address} needs CURVE keys, and this process has none")
        guard.connect_to(socket, server)
    socket.connect(address)
    return socket
