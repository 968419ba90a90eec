"""Which vLLM model `policy` means now, and which older adapters still serve requests.

Pure state shared by the gateway (event loop) and the adapter manager
(thread), hence the lock. The swap protocol:

1. the manager loads adapter version v under a new vLLM name (never in place);
2. ``switch`` points `policy` at it: from now on every new request uses it;
   the previous name is *retiring*;
3. requests already running keep their name (``acquire`` at start,
   ``release`` when the response has been streamed out);
4. ``drainable`` lists retiring names with no request left: the manager
   unloads them and calls ``forget``.

So `policy` is never missing and no request loses its adapter mid-way.
"""

from __future__ import annotations

import threading
import time
from dataclasses import asdict, dataclass, field


@dataclass
class AdapterRecord:
    version: str
    model: str  # the name vLLM serves it under
    path: str | None
    checksum: str | None
    loaded_at: float = field(default_factory=time.time)
    retired_at: float | None = None
    unloaded_at: float | None = None


class AdapterRegistry:
    def __init__(self, base_model: str, history_size: int = 100):
        self._lock = threading.Lock()
        self._current = AdapterRecord(version="base", model=base_model, path=None, checksum=None)
        self._base_model = base_model
        self._in_flight: dict[str, int] = {}
        self._requests: dict[str, int] = {}  # `policy` requests served per adapter version, since start
        self._retiring: dict[str, AdapterRecord] = {}
        self._history: list[AdapterRecord] = [self._current]
        self._history_size = history_size

    @property
    def current(self) -> AdapterRecord:
        with self._lock:
            return self._current

    def acquire(self) -> AdapterRecord:
        """The record `policy` means for a request starting now; counts it as in flight."""
        with self._lock:
            record = self._current
            self._in_flight[record.model] = self._in_flight.get(record.model, 0) + 1
            self._requests[record.version] = self._requests.get(record.version, 0) + 1
            return record

    def release(self, model: str) -> None:
        with self._lock:
            left = self._in_flight.get(model, 0) - 1
            if left > 0:
                self._in_flight[model] = left
            else:
                self._in_flight.pop(model, None)

    def switch(self, record: AdapterRecord) -> AdapterRecord:
        """Makes ``record`` the current one; returns the previous (now retiring unless it is the base)."""
        with self._lock:
            previous = self._current
            self._current = record
            if previous.model != self._base_model:
                previous.retired_at = time.time()
                self._retiring[previous.model] = previous
            self._history.append(record)
            del self._history[: -self._history_size]
            return previous

    def find(self, version: str) -> AdapterRecord | None:
        """A version that is current or retiring (still loaded in vLLM)."""
        with self._lock:
            if self._current.version == version:
                return self._current
            return next((r for r in self._retiring.values() if r.version == version), None)

    def drainable(self) -> list[AdapterRecord]:
        with self._lock:
            return [r for m, r in self._retiring.items() if self._in_flight.get(m, 0) == 0]

    def forget(self, model: str) -> None:
        with self._lock:
            record = self._retiring.pop(model, None)
            if record is not None:
                record.unloaded_at = time.time()

    def in_flight(self) -> dict[str, int]:
        with self._lock:
            return dict(self._in_flight)

    def snapshot(self) -> dict:
        """What GET /admin/adapters reports."""
        with self._lock:
            return {
                "current": asdict(self._current),
                "retiring": [asdict(r) for r in self._retiring.values()],
                "in_flight": dict(self._in_flight),
                "requests": dict(self._requests),
                "history": [asdict(r) for r in reversed(self._history)],
            }
