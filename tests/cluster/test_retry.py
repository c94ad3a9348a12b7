"""cluster.retry: tries, pauses, and which errors are tried again."""

from __future__ import annotations

import pytest

from cluster.retry import retry


class Flaky:
    """Fails ``failures`` times with ``error``, then returns how many calls it took."""

    def __init__(self, failures: int, error: Exception) -> None:
        self.failures, self.error, self.calls = failures, error, 0

    def __call__(self) -> int:
        self.calls += 1
        if self.calls <= self.failures:
            raise self.error
        return self.calls


def test_transient_failures_are_tried_again_with_growing_pauses():
    pauses, told = [], []
    flaky = Flaky(4, OSError("database is locked"))
    assert retry(flaky, attempts=6, delay_s=0.5, max_delay_s=3.0, sleep=pauses.append,
                 on_retry=lambda err, pause: told.append((str(err), pause))) == 5
    assert pauses == [0.5, 1.0, 2.0, 3.0] and told[0] == ("database is locked", 0.5)


def test_the_last_error_and_a_refused_one_are_raised_as_they_are():
    pauses = []
    flaky = Flaky(5, OSError("down"))
    with pytest.raises(OSError, match="down"):
        retry(flaky, attempts=3, sleep=pauses.append)
    assert flaky.calls == 3 and len(pauses) == 2
    permanent = Flaky(1, ValueError("bad parameter"))
    with pytest.raises(ValueError):
        retry(permanent, attempts=3, retry_if=lambda err: not isinstance(err, ValueError), sleep=pauses.append)
    assert permanent.calls == 1
    with pytest.raises(ValueError, match="attempts=0"):
        retry(lambda: 1, attempts=0)
