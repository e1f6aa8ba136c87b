"""Stop requests: SIGTERM (what a cluster scheduler sends before it kills a job) and SIGINT (Ctrl-C) are
recorded instead of ending the process, so that a training loop can finish its step, save a checkpoint
and exit with the conventional status 128 + the signal's number. A second signal ends it at once."""
from __future__ import annotations

import signal
import threading

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


class StopRequests:
    """Context manager: while it is active, `received` holds the first stop signal (None before one).
    Outside the main thread (where Python cannot install handlers) it records nothing."""

    def __init__(self):
        self.received: signal.Signals | None = None
        self._previous: dict = {}

    def __enter__(self) -> StopRequests:
        if threading.current_thread() is threading.main_thread():
            self._previous = {s: signal.signal(s, self._record) for s in STOP_SIGNALS}
        return self

    def __exit__(self, *exc) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous = {}

    def _record(self, signum: int, frame) -> None:
        if self.received is not None:
            raise SystemExit(128 + signum)
        self.received = signal.Signals(signum)

    @property
    def exit_status(self) -> int:
        return 128 + self.received
