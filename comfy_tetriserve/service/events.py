"""Event logs and their NDJSON streams.

Every job has an ``EventLog``; the service has one more for service-wide events (models
loading, jobs starting and ending). An event is a JSON object with ``seq`` (increasing per
log), ``type`` and ``at`` (unix seconds). Consecutive ``step`` events coalesce (the newer
replaces the older, with a new ``seq``), so a job's log stays a few dozen lines however many
steps it runs; a live reader still sees each step as it happens.

Streams are NDJSON (``application/x-ndjson``): one event per line, a ``{"type": "ping"}`` line
after ``ping_s`` of silence (so a reader notices a dead service within its read timeout), and
the response ends after a job's terminal event (or when the service shuts down). A reader that
reconnects with ``?after=SEQ`` gets every event after the one it saw last.
"""
from __future__ import annotations

import asyncio
import json
import time
from collections import deque
from collections.abc import Callable

from aiohttp import web

TERMINAL_EVENTS = ("finished", "failed", "cancelled")


class EventLog:
    """Sequence-numbered events with async waiting (see the module docstring)."""

    def __init__(self, limit: int | None = None, coalesce: tuple[str, ...] = ("step",)) -> None:
        self._events: deque[dict] = deque(maxlen=limit)
        self._seq = 0
        self._coalesce = coalesce
        self._changed = asyncio.Event()
        self.closed = False

    @property
    def last_seq(self) -> int:
        return self._seq

    def append(self, event: dict) -> dict:
        self._seq += 1
        event = {"seq": self._seq, **event}
        event.setdefault("at", time.time())
        if self._events and event["type"] in self._coalesce and self._events[-1]["type"] == event["type"]:
            self._events[-1] = event
        else:
            self._events.append(event)
        self._wake()
        return event

    def close(self) -> None:
        """No more events will come: streams end once they have sent everything."""
        self.closed = True
        self._wake()

    def _wake(self) -> None:
        self._changed.set()
        self._changed = asyncio.Event()

    def after(self, seq: int) -> list[dict]:
        return [e for e in self._events if e["seq"] > seq]

    def latest(self, event_type: str) -> dict | None:
        for e in reversed(self._events):
            if e["type"] == event_type:
                return e
        return None

    async def wait(self, timeout_s: float) -> bool:
        """Wait until the log changes; False on timeout."""
        changed = self._changed
        try:
            await asyncio.wait_for(changed.wait(), timeout_s)
            return True
        except asyncio.TimeoutError:
            return False


async def stream_ndjson(request: web.Request, log: EventLog, after: int, ping_s: float,
                        done: Callable[[dict], bool] = lambda e: e["type"] in TERMINAL_EVENTS) -> web.StreamResponse:
    """Send ``log``'s events after ``after`` as NDJSON until ``done(event)`` or the log closes.

    A reader that goes away (closes the connection) simply ends the stream.
    """
    response = web.StreamResponse(headers={"Content-Type": "application/x-ndjson", "Cache-Control": "no-cache",
                                           "X-Accel-Buffering": "no"})
    await response.prepare(request)
    try:
        await _send_events(request, response, log, after, ping_s, done)
    except ConnectionError:  # aiohttp's ClientConnectionResetError is one: the reader left mid-write
        return response
    return response


async def _send_events(request: web.Request, response: web.StreamResponse, log: EventLog, after: int, ping_s: float,
                       done: Callable[[dict], bool]) -> None:
    seq = after
    while True:
        events = log.after(seq)
        for event in events:
            await response.write((json.dumps(event) + "\n").encode())
            seq = event["seq"]
            if done(event):
                await response.write_eof()
                return
        if log.closed and not log.after(seq):
            break
        if request.transport is None or request.transport.is_closing():
            return  # the reader went away
        if not events and not await log.wait(ping_s):
            await response.write(b'{"type": "ping"}\n')
    await response.write_eof()
