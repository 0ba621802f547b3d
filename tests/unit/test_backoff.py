"""transfer.backoff: a failed copy is tried again after 5 s, the wait doubling up to
5 min while it keeps failing, and starting over once it has not failed for a while."""

from __future__ import annotations

import pytest

from pacsp2p.transfer import backoff
from pacsp2p.transfer.backoff import Backoff


@pytest.fixture
def clock(monkeypatch):
    now = [1000.0]
    monkeypatch.setattr(backoff.time, "monotonic", lambda: now[0])
    return now


def test_the_wait_doubles_up_to_the_last(clock):
    b = Backoff(first=5, last=300)
    waits = []
    for _ in range(9):
        waits.append(b.failed("x"))
        assert b.waiting("x")
        clock[0] += waits[-1] - 0.01
        assert b.waiting("x")               # not a moment early
        clock[0] += 0.01
        assert not b.waiting("x")
    assert waits == [5, 10, 20, 40, 80, 160, 300, 300, 300]


def test_a_key_is_its_own(clock):
    b = Backoff(first=5, last=300)
    b.failed(("1.2.3", "local"))
    assert not b.waiting(("1.2.3", "other")) and not b.waiting("never")
    assert len(b) == 1


def test_success_or_a_quiet_while_starts_over(clock):
    b = Backoff(first=5, last=300)
    b.failed("x"), b.failed("x")
    b.succeeded("x")
    assert not b.waiting("x") and len(b) == 0
    assert b.failed("x") == 5
    assert b.failed("x") == 10
    clock[0] += 10 + 300 + 1                # due long ago, not failed since
    assert b.failed("x") == 5
    clock[0] += 5 + 300 + 1
    b.prune()
    assert len(b) == 0
