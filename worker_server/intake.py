"""Whether this server takes new turns: a draining daemon finishes what runs and starts nothing new."""

from __future__ import annotations


class NotTakingTurns(Exception):
    """A new turn was asked of a server that no longer takes any."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class Intake:
    """Open until ``close``; then every new agent turn is refused with the reason given."""

    def __init__(self) -> None:
        self._refusal: str | None = None

    def close(self, reason: str) -> None:
        self._refusal = reason

    @property
    def closed(self) -> bool:
        return self._refusal is not None

    def check(self) -> None:
        """Raise NotTakingTurns once closed."""
        if self._refusal is not None:
            raise NotTakingTurns(self._refusal)
