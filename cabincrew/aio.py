"""asyncio helpers that keep cancellation intact on Python 3.11.

On 3.11, ``asyncio.wait_for`` returns the awaited result when a cancellation arrives in
the same turn of the loop as that result (fixed in 3.12). A loop such as
``while True: await asyncio.wait_for(event.wait(), t)`` then survives ``task.cancel()``,
and the ``await task`` of a shutdown waits for it forever: the process hangs in
``server.stop`` with an idle event loop. ``asyncio.timeout`` does not have that race, so
every timed wait of the services goes through it.
"""

from __future__ import annotations

import asyncio


async def wait_event(event: asyncio.Event, timeout: float) -> bool:
    """Wait until ``event`` is set or ``timeout`` seconds pass; whether it is set.

    A cancellation of the caller always propagates, even one that arrives together with
    the event.
    """
    if event.is_set():
        return True
    try:
        async with asyncio.timeout(max(timeout, 0.0)):
            await event.wait()
    except TimeoutError:
        return event.is_set()
    return True


__all__ = ["wait_event"]
