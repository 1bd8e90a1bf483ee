"""An overall time limit for one fetch, and a watchdog that cuts a socket when it passes.

Socket timeouts bound each read, not the whole transfer: a server that sends one byte a second
never trips them. The watchdog shuts the transfer's socket down at the deadline instead, which
wakes a thread blocked in ``recv`` at once.
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress

from contract.errors import DeadlineExceeded


class Deadline:
    """The moment a fetch must be over by (monotonic clock)."""

    def __init__(self, seconds: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.seconds = seconds
        self._clock = clock
        self.at = clock() + seconds

    def remaining(self) -> float:
        return self.at - self._clock()

    def expired(self) -> bool:
        return self.remaining() <= 0

    def check(self, what: str) -> None:
        """Raise DeadlineExceeded once the deadline has passed."""
        if self.expired():
            raise self.exceeded(what)

    def exceeded(self, what: str) -> DeadlineExceeded:
        return DeadlineExceeded(f"fetching {what} took longer than the {self.seconds:g} s deadline")

    def timeout(self, per_read_s: float) -> float:
        """A socket timeout that never outlasts the deadline (at least a millisecond)."""
        return max(0.001, min(per_read_s, self.remaining()))


class Cutter:
    """Holds the socket of the transfer in flight; ``cut`` shuts it down from another thread."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._sock: socket.socket | None = None
        self.fired = False

    def watch(self, sock: socket.socket | None) -> None:
        with self._lock:
            self._sock = sock
            if self.fired:
                self._shutdown()

    def cut(self) -> None:
        with self._lock:
            self.fired = True
            self._shutdown()

    def _shutdown(self) -> None:
        if self._sock is not None:
            with suppress(OSError):  # already closed: nothing left to cut
                self._sock.shutdown(socket.SHUT_RDWR)


@contextmanager
def cut_at(deadline: Deadline) -> Iterator[Cutter]:
    """A Cutter whose socket is shut down when the deadline passes, unless the block ended."""
    cutter = Cutter()
    timer = threading.Timer(max(0.0, deadline.remaining()), cutter.cut)
    timer.daemon = True
    timer.start()
    try:
        yield cutter
    finally:
        timer.cancel()
