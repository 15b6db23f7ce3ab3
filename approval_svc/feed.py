"""In-process change notification for watchers.

A change is only a wake-up call: watchers always re-read the approval from the store, so a
missed or spurious notification never shows a wrong state, and a watcher that reconnects
after a restart starts from what the database says. Changes made by another replica reach
a watcher through its bounded poll (the manager waits at most ``poll`` seconds).
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from contextlib import contextmanager


class ChangeFeed:
    """Wakes the watchers of one approval id when this process changes it."""

    def __init__(self) -> None:
        self._waiters: dict[str, set[asyncio.Event]] = {}
        self._closed = False

    @contextmanager
    def subscribe(self, approval_id: str) -> Iterator[asyncio.Event]:
        """An event set on every change of ``approval_id`` (and on close) while subscribed."""
        event = asyncio.Event()
        if self._closed:
            event.set()
        self._waiters.setdefault(approval_id, set()).add(event)
        try:
            yield event
        finally:
            waiters = self._waiters.get(approval_id)
            if waiters is not None:
                waiters.discard(event)
                if not waiters:
                    del self._waiters[approval_id]

    def publish(self, approval_id: str) -> None:
        """Wake the watchers of ``approval_id``."""
        for event in self._waiters.get(approval_id, ()):
            event.set()

    @property
    def closed(self) -> bool:
        """Whether the feed was closed (the service is stopping)."""
        return self._closed

    def close(self) -> None:
        """Wake every watcher so that streams end; idempotent."""
        self._closed = True
        for waiters in self._waiters.values():
            for event in waiters:
                event.set()

    def watcher_count(self, approval_id: str) -> int:
        """How many watchers wait on ``approval_id`` (tests coordinate on it)."""
        return len(self._waiters.get(approval_id, ()))
