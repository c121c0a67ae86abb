"""One job at a time on a worker thread, its result or error handed back to the thread that asks.

The checkpointer writes, fsyncs and renames a checkpoint here while training goes on
(:class:`moola_engine.checkpoint.Checkpointer`).  The worker is a normal (non-daemon) thread:
a process that ends with a write in flight finishes it first, so a checkpoint is never cut
short by a clean exit (a kill -9 is what the atomic rename is for).
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any


class BackgroundWriter:
    """Runs ``submit``-ted jobs one at a time on a thread of its own; ``result`` waits for the last one."""

    def __init__(self, name: str) -> None:
        self.name = name
        self._thread: threading.Thread | None = None
        self._outcome: tuple[bool, Any] | None = None

    @property
    def busy(self) -> bool:
        return self._thread is not None

    def submit(self, fn: Callable[..., Any], *args: Any) -> None:
        """Start ``fn(*args)`` on a new worker thread.  The previous job's result must have been taken."""
        if self._thread is not None:
            raise RuntimeError(f"{self.name}: a job is still in flight; call result() first")
        self._outcome = None

        def run() -> None:
            try:
                self._outcome = (True, fn(*args))
            except BaseException as exc:  # handed to result(), in the caller's thread
                self._outcome = (False, exc)

        self._thread = threading.Thread(target=run, name=self.name)
        self._thread.start()

    def result(self) -> Any:
        """Wait for the job in flight and return its value, or raise its exception here."""
        thread, self._thread = self._thread, None
        if thread is None:
            raise RuntimeError(f"{self.name}: no job in flight")
        thread.join()
        outcome, self._outcome = self._outcome, None
        assert outcome is not None
        ok, value = outcome
        if not ok:
            raise value
        return value
