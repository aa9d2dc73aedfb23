"""CURVE keys: files, modes, reading, and the topology's demand for them."""

from __future__ import annotations

import os
import stat
import textwrap
from pathlib import Path

import pytest
import zmq

from dsat.curve import CurveKeyError, allowed_keys, generate, public_of, read_key, server_key
from dsat.errors import TopologyError
from dsat.topology import load_topology


def test_generate_writes_a_public_key_and_a_secret_only_its_owner_reads(tmp_path: Path) -> None:
    public_path, secret_path = generate("a", str(tmp_path / "keys"))
    assert stat.S_IMODE(os.stat(secret_path).st_mode) == 0o600
    public, secret = read_key(public_path), read_key(secret_path)
    assert public_of(secret) == public
    assert len(zmq.utils.z85.decode(public)) == 32


def test_generate_never_overwrites_a_pair(tmp_path: Path) -> None:
    generate("a", str(tmp_path))
    with pytest.raises(CurveKeyError, match="exists"):
        generate("a", str(tmp_path))


def test_a_key_is_read_from_its_text_or_its_file_and_garbage_is_refused(tmp_path: Path) -> None:
    public_path, _ = generate("a", str(tmp_path))
    text = Path(public_path).read_text().strip()
    assert read_key(text) == text.encode()
    assert read_key("a.key", str(tmp_path)) == text.encode()
    with pytest.raises(CurveKeyError, match="cannot read key"):
        read_key("missing.key", str(tmp_path))
    (tmp_path / "bad.key").write_text("not a key at all")
    with pytest.raises(CurveKeyError, match="not a z85 CURVE key"):
        read_key("bad.key", str(tmp_path))


TWO = """
[satellite.a]
host = "127.0.0.1"
{a}
[satellite.b]
host = "127.0.0.2"
{b}
[step.s]
call = "math:sqrt"
entry = true
"""


def test_several_satellites_without_keys_are_refused_unless_said_insecure(tmp_path: Path) -> None:
    path = tmp_path / "topology.toml"
    path.write_text(textwrap.dedent(TWO.format(a="", b="insecure = true")))
    with pytest.raises(TopologyError) as error:
        load_topology(path)
    (problem,) = error.value.problems
    assert problem.where == "satellite.a"
    assert "public_key and secret_key_file" in problem.reason
    assert "dsat keys generate a" in problem.reason


def test_the_allow_list_is_every_satellite_and_client_key(tmp_path: Path) -> None:
    for name in ("a", "b", "me"):
        generate(name, str(tmp_path / "keys"))
    keyed = 'public_key = "keys/{0}.key"\nsecret_key_file = "keys/{0}.key_secret"'
    text = TWO.format(a=keyed.format("a"), b=keyed.format("b"))
    text += '\n[client.me]\npublic_key = "keys/me.key"\n'
    path = tmp_path / "topology.toml"
    path.write_text(text)
    topology = load_topology(path)
    expected = {read_key(f"keys/{n}.key", str(tmp_path)) for n in ("a", "b", "me")}
    assert allowed_keys(topology) == expected
    assert server_key(topology, "b") == read_key("keys/b.key", str(tmp_path))
