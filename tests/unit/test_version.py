"""The X.Y.Z version rule: parsing, ordering, compatibility."""

from __future__ import annotations

import contextlib
import re

import pytest
from hypothesis import given
from hypothesis import strategies as st

import dsat
from dsat.version import Version, VersionError, compatible

patches = st.from_regex(re.compile(r"z{0,4}[0-9a-z]"), fullmatch=True)
numbers = st.integers(min_value=0, max_value=10_000)
versions = st.builds(Version, numbers, numbers, patches)


def test_a_full_version_parses_and_prints_back() -> None:
    version = Version.parse("1.2.a")
    assert (version.major, version.minor, version.patch) == (1, 2, "a")
    assert str(version) == "1.2.a"


def test_patch_defaults_to_zero() -> None:
    assert Version.parse("1.2") == Version(1, 2, "0")
    assert str(Version.parse("1.2")) == "1.2.0"


@pytest.mark.parametrize(
    ("text", "part"),
    [
        ("1.02.a", "minor '02'"),
        ("01.2", "major '01'"),
        ("1.x.0", "minor 'x'"),
        ("-1.2", "major '-1'"),
        ("1.2.A", "patch 'A'"),
        ("1.2.az", "patch 'az'"),
        ("1.2.", "patch ''"),
        ("1", "1 part"),
        ("1.2.3.4", "4 part"),
        ("", "1 part"),
        (" 1.2", "major ' 1'"),
    ],
)
def test_a_bad_version_names_its_bad_part(text: str, part: str) -> None:
    with pytest.raises(VersionError, match=re.escape(part)):
        Version.parse(text)


def test_a_version_is_not_built_from_bad_parts() -> None:
    with pytest.raises(VersionError, match="patch"):
        Version(1, 2, "Z")
    with pytest.raises(VersionError, match="major"):
        Version(-1, 2)
    with pytest.raises(VersionError, match="need a string"):
        Version.parse(12)  # type: ignore[arg-type]


def test_the_patch_extends_past_z_keeping_order() -> None:
    steps = [
        ("8", "9"),
        ("9", "a"),
        ("y", "z"),
        ("z", "z0"),
        ("z0", "z1"),
        ("zy", "zz"),
        ("zz", "zz0"),
    ]
    for before, after in steps:
        bumped = Version(1, 0, before).next_patch()
        assert bumped.patch == after
        assert Version(1, 0, before) < bumped


def test_compatible_means_same_major_and_minor() -> None:
    assert compatible(Version.parse("1.2.a"), Version.parse("1.2.z0"))
    assert not compatible(Version.parse("1.2.a"), Version.parse("1.3.a"))
    assert not compatible(Version.parse("1.2"), Version.parse("2.2"))


def test_the_package_version_obeys_the_rule() -> None:
    assert str(Version.parse(dsat.__version__)) == dsat.__version__


@given(patches, patches)
def test_string_order_and_base36_order_of_patches_agree(a: str, b: str) -> None:
    assert (a < b) == (int(a, 36) < int(b, 36))
    assert (a == b) == (int(a, 36) == int(b, 36))


@given(versions, versions)
def test_ordering_is_total_and_consistent_with_equality(a: Version, b: Version) -> None:
    assert sum((a < b, a == b, a > b)) == 1
    assert (a <= b) == (a < b or a == b)
    assert (a == b) == (str(a) == str(b))
    if a == b:
        assert hash(a) == hash(b)


@given(versions, versions, versions)
def test_ordering_is_transitive(a: Version, b: Version, c: Version) -> None:
    if a <= b <= c:
        assert a <= c


@given(versions)
def test_parse_reads_what_str_writes(version: Version) -> None:
    assert Version.parse(str(version)) == version


@given(st.text(max_size=12))
def test_parse_raises_only_version_errors(text: str) -> None:
    with contextlib.suppress(VersionError):
        Version.parse(text)
