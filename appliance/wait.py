"""The one bounded-wait helper; every poll in the builder and the harness goes through it."""
from __future__ import annotations

import time
from typing import Any, Callable, TypeVar

T = TypeVar("T")


class Timeout(TimeoutError):
    """The condition still unmet at the deadline; `last` is what the last try returned,
    for the caller's report."""

    def __init__(self, timeout: float, last: Any):
        super().__init__(f"condition not met within {timeout:.0f} s")
        self.last = last


def retry(fn: Callable[[bool], T], timeout: float, interval: float = 1.0,
          max_interval: float | None = None, until: Callable[[T], Any] = bool) -> T:
    """Call fn(last_try) until until(result) holds; returns that result. The last try is
    told so, and may gather diagnostics. With `max_interval`, the pause grows by half
    after each try, up to that.

    Raises Timeout (a TimeoutError) carrying the last result when the deadline passes."""
    deadline = time.monotonic() + timeout
    while True:
        last = time.monotonic() + interval >= deadline
        result = fn(last)
        if until(result):
            return result
        if last:
            raise Timeout(timeout, result)
        time.sleep(interval)
        if max_interval is not None:
            interval = min(interval * 1.5, max_interval)
