"""The one bounded-wait helper; every poll in the builder and the harness goes through it."""
from __future__ import annotations

import time
from typing import Callable


def retry(fn: Callable[[bool], bool], timeout: float, interval: float = 1.0,
          max_interval: float | None = None) -> None:
    """Call fn(last_try) until it returns True; the last try may gather diagnostics.
    With `max_interval`, the pause grows by half after each try, up to that.

    Raises TimeoutError when the condition is still false at the deadline."""
    deadline = time.monotonic() + timeout
    while True:
        last = time.monotonic() + interval >= deadline
        if fn(last):
            return
        if last:
            raise TimeoutError(f"condition not met within {timeout:.0f} s")
        time.sleep(interval)
        if max_interval is not None:
            interval = min(interval * 1.5, max_interval)
