"""The update log: the source of truth for table changes.  An update is acknowledged only after
:meth:`UpdateLog.append` returns, and ``append`` returns only once the log holds it durably."""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

from .entry import MalformedEntry, Position, UpdateBatch


@dataclass
class LogRecord:
    position: Position
    appended_at: float  # unix seconds, for lag in seconds
    batch: UpdateBatch | MalformedEntry


class UpdateLog(ABC):
    kind: str
    # errors that mean "the log cannot be reached or written right now": a write that meets one
    # was not acknowledged and may be retried (HTTP 503 with Retry-After), lookups go on
    unavailable: tuple[type[Exception], ...] = ()

    @abstractmethod
    def append(self, batch: UpdateBatch) -> Position:
        """Durably append; returns the entry's position."""

    @abstractmethod
    def read(self, after: Position | None, count: int, block_ms: int = 0) -> list[LogRecord]:
        """Up to ``count`` entries after ``after`` (from the start when None), in order; waits up
        to ``block_ms`` for the first one when there is none yet."""

    @abstractmethod
    def last_position(self) -> Position | None:
        """Position of the newest entry, or None for an empty log."""

    @abstractmethod
    def count_after(self, after: Position | None, limit: int = 1_000_000) -> int:
        """How many entries follow ``after`` (capped at ``limit``): the applier's lag."""

    @abstractmethod
    def oldest_after(self, after: Position | None) -> float | None:
        """When the first entry after ``after`` was appended (unix seconds): lag in seconds."""

    @abstractmethod
    def trim_before(self, position: Position) -> int:
        """Drop entries at or before ``position`` (every table's snapshot includes them)."""

    def check_durability(self) -> list[str]:
        """Problems with how durable acknowledged writes are; empty when fine."""
        return []

    def close(self) -> None:  # noqa: B027 - optional hook
        pass
