"""The X.Y.Z version rule, shared by the package and the wire protocol.

A version is ``X.Y.Z``: X and Y are decimal numbers without leading zeros, Z is
lower-case alphanumeric and defaults to ``"0"`` (``"1.2"`` is ``1.2.0``).

- X changes with the philosophy of the API,
- Y when compatibility breaks (two peers talk only when their X.Y match),
- Z for fixes and additions that break nothing.

Versions must order the same whether Z is compared as a string or as a number.
Z is therefore one character of ``0-9a-z`` (36 values); past ``z`` it extends as
``z0`` .. ``zz``, then ``zz0`` .., i.e. it matches ``z*[0-9a-z]``. With that shape,
the string order of Z and its base-36 value order are the same order.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import total_ordering
from typing import Final

from dsat.errors import VersionError

_NUMBER: Final = re.compile(r"0|[1-9][0-9]*")
_PATCH: Final = re.compile(r"z*[0-9a-z]")
_DIGITS: Final = "0123456789abcdefghijklmnopqrstuvwxyz"


@total_ordering
@dataclass(frozen=True)
class Version:
    """A parsed ``X.Y.Z`` version; ordered by (X, Y, Z) with Z in base 36."""

    major: int
    minor: int
    patch: str = "0"

    def __post_init__(self) -> None:
        for name, value in (("major", self.major), ("minor", self.minor)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise VersionError(f"{name} {value!r}: need a non-negative integer")
        if not isinstance(self.patch, str) or not _PATCH.fullmatch(self.patch):
            raise VersionError(
                f"patch {self.patch!r}: need z*[0-9a-z] (one of 0-9a-z, extended as z0..zz, zz0..)"
            )

    @classmethod
    def parse(cls, text: str) -> Version:
        """Parse ``"X.Y"`` or ``"X.Y.Z"``; raise VersionError naming the bad part."""
        if not isinstance(text, str):
            raise VersionError(f"version {text!r}: need a string like '1.2.a'")
        parts = text.split(".")
        if len(parts) not in (2, 3):
            raise VersionError(f"version {text!r}: need X.Y or X.Y.Z, got {len(parts)} part(s)")
        for name, part in zip(("major", "minor"), parts[:2], strict=True):
            if not _NUMBER.fullmatch(part):
                raise VersionError(
                    f"version {text!r}: {name} {part!r}: "
                    "need a decimal number without leading zeros"
                )
        patch = parts[2] if len(parts) == 3 else "0"
        if not _PATCH.fullmatch(patch):
            raise VersionError(
                f"version {text!r}: patch {patch!r}: need z*[0-9a-z] "
                "(one of 0-9a-z, extended as z0..zz, zz0..)"
            )
        return cls(int(parts[0]), int(parts[1]), patch)

    def __str__(self) -> str:
        return f"{self.major}.{self.minor}.{self.patch}"

    @property
    def patch_number(self) -> int:
        """Z read as a base-36 number; orders exactly as Z does as a string."""
        return int(self.patch, 36)

    def _key(self) -> tuple[int, int, int]:
        return (self.major, self.minor, self.patch_number)

    def __lt__(self, other: object) -> bool:
        if not isinstance(other, Version):
            return NotImplemented
        return self._key() < other._key()

    def next_patch(self) -> Version:
        """The next Z that keeps both orders: ``9 -> a``, ``y -> z``, ``z -> z0``, ``zz -> zz0``."""
        last = self.patch[-1]
        if last == "z":
            patch = self.patch + "0"
        else:
            patch = self.patch[:-1] + _DIGITS[_DIGITS.index(last) + 1]
        return Version(self.major, self.minor, patch)


def compatible(a: Version, b: Version) -> bool:
    """Two peers may talk when their X.Y match; Z never breaks compatibility."""
    return (a.major, a.minor) == (b.major, b.minor)
