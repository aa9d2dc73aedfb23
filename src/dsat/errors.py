"""Every error dsat raises on purpose; nothing else lives here."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass


class DsatError(Exception):
    """Base of every error dsat raises on purpose (MessageError, StoreError, TopologyError...)."""


class VersionError(DsatError, ValueError):
    """A version string does not follow the X.Y.Z rule; the text names the bad part."""


class MessageError(DsatError):
    """A message is malformed, truncated, oversized or of an incompatible protocol version."""


@dataclass(frozen=True)
class Problem:
    """One mistake in a topology: the file, where in it, and what is wrong."""

    file: str
    where: str  # "step.cpu", "link clock -> cpu"
    reason: str

    def __str__(self) -> str:
        return f"{self.file}: {self.where}: {self.reason}"


class TopologyError(DsatError):
    """The topology is invalid; `problems` lists every mistake found, not just the first."""

    def __init__(self, problems: Sequence[Problem]) -> None:
        super().__init__("\n".join(str(p) for p in problems))
        self.problems = tuple(problems)


class SupervisorError(DsatError):
    """The satellite's processes could not be started, scaled or stopped."""
