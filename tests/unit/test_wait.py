"""The bounded wait every poll goes through: how often it asks, and when it gives up."""
import pytest

from appliance import wait


@pytest.fixture
def clock(monkeypatch):
    """A clock that moves only when retry sleeps; records every pause."""
    state = {"now": 0.0, "sleeps": []}

    def sleep(s):
        state["sleeps"].append(s)
        state["now"] += s

    monkeypatch.setattr(wait.time, "monotonic", lambda: state["now"])
    monkeypatch.setattr(wait.time, "sleep", sleep)
    return state


def test_pauses_grow_up_to_the_maximum_and_the_last_try_is_flagged(clock):
    tries = []
    with pytest.raises(TimeoutError):
        wait.retry(lambda last: tries.append(last) and False, timeout=20, max_interval=3)
    assert clock["sleeps"][:5] == [1, 1.5, 2.25, 3, 3]
    assert tries[-1] is True and not any(tries[:-1])
    assert clock["now"] <= 20


def test_without_a_maximum_the_pause_stays_fixed(clock):
    n = iter(range(100))
    wait.retry(lambda last: next(n) == 4, timeout=60, interval=2)
    assert clock["sleeps"] == [2, 2, 2, 2]


def test_the_value_that_met_the_condition_is_returned(clock):
    n = iter(range(100))
    assert wait.retry(lambda last: next(n), timeout=60) == 1  # the first true value
    assert wait.retry(lambda last: (0, "") if clock["now"] > 3 else (1, "busy"), timeout=60,
                      until=lambda r: r[0] == 0) == (0, "")


def test_a_timeout_carries_what_the_last_try_returned(clock):
    n = iter(range(100))
    with pytest.raises(wait.Timeout) as e:
        wait.retry(lambda last: ("last" if last else "not yet", next(n)), timeout=5, until=lambda r: r[1] < 0)
    assert e.value.last[0] == "last" and e.value.last[1] == len(clock["sleeps"])
    assert isinstance(e.value, TimeoutError)
