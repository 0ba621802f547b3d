"""``threads.Lane``: the light thread pool of the per-instance hops of a C-STORE (the
writing and keeping threads) does what Twisted's ThreadPool did for them — jobs run in
its named threads in order, ``deferToThreadPool`` gets results and failures, a job that
raises is logged and the thread goes on, jobs given before ``stop`` run and those after
are dropped. Real threads."""
from __future__ import annotations

import threading

import pytest
from twisted.internet.threads import deferToThreadPool
from twisted.logger import globalLogPublisher

from pacsp2p import threads
from pacsp2p.testing.cluster import wait_until


class Reactor:
    """Enough of a reactor for deferToThreadPool and ``threads.pool``: results handed
    back from a thread are queued and run by ``run``."""

    def __init__(self):
        self.handed, self.lock, self.at_shutdown = [], threading.Lock(), []

    def callFromThread(self, fn, *args):
        with self.lock:
            self.handed.append((fn, args))

    def run(self):
        with self.lock:
            handed, self.handed = self.handed, []
        for fn, args in handed:
            fn(*args)

    def addSystemEventTrigger(self, phase, event, fn, *args):
        self.at_shutdown.append(fn)


@pytest.fixture
def lane():
    reactor = Reactor()
    pool = threads.pool(reactor, "test-lane", 1, 2, lane=True)
    yield reactor, pool
    for fn in reactor.at_shutdown:
        fn()


def test_jobs_run_in_its_named_threads_and_results_come_back(lane):
    reactor, pool = lane
    assert isinstance(pool, threads.Lane) and pool.started
    assert threads.pool(reactor, "test-lane", lane=True) is pool       # one per name
    got, failed = [], []
    done = threading.Event()
    d = deferToThreadPool(reactor, pool, lambda x: (threading.current_thread().name, x), 7)
    d.addCallback(got.append)
    bad = deferToThreadPool(reactor, pool, lambda: 1 / 0)
    bad.addErrback(failed.append)
    pool.callInThread(done.set)
    assert done.wait(30)
    while not (got and failed):
        reactor.run()
    assert got[0][0].startswith("PoolThread-test-lane-") and got[0][1] == 7
    assert failed[0].check(ZeroDivisionError)


def test_a_job_that_raises_is_logged_and_the_thread_goes_on(lane):
    _, pool = lane
    seen, done = [], threading.Event()

    def observer(event):
        if "test-lane" in str(event.get("name", "")):
            seen.append(event)
    globalLogPublisher.addObserver(observer)
    try:
        pool.callInThread(lambda: 1 / 0)
        wait_until(lambda: seen, 30, what="the failure logged")
        pool.callInThread(done.set)                  # the threads go on
        assert done.wait(30)
    finally:
        globalLogPublisher.removeObserver(observer)
    assert seen and seen[0]["log_failure"].check(ZeroDivisionError)


def test_jobs_given_before_stop_run_in_order_and_none_after(lane):
    reactor, pool = lane
    ran, gate = [], threading.Event()
    pool.callInThread(gate.wait, 30)                 # hold one thread
    for i in range(50):
        pool.callInThread(ran.append, i)
    gate.set()
    pool.stop()                                      # waits for the threads
    assert sorted(ran) == list(range(50))
    assert pool.joined and not pool.started
    pool.callInThread(ran.append, "late")
    assert "late" not in ran
    assert not [t for t in threading.enumerate() if t.name.startswith("PoolThread-test-lane")]


def test_a_thread_waiting_for_the_reactor_is_let_go_when_the_pools_stop(lane):
    """At shutdown the reactor thread joins the pools' threads (``threads.pool``'s stop).
    A job then waiting for the reactor (the C-STORE's series look-up; Twisted's
    ``blockingCallFromThread`` waits for ever) hung the shutdown: ``on_reactor`` lets it
    go with ``Stopped`` before the join, and later calls fail at once."""
    reactor, pool = lane
    got = []

    def job():
        try:
            got.append(threads.on_reactor(reactor, lambda: 1))
        except threads.Stopped:
            got.append("stopped")
    pool.callInThread(job)
    wait_until(lambda: reactor.handed, 30, what="the call handed to the reactor")
    stopper = threading.Thread(target=lambda: [fn() for fn in reactor.at_shutdown])
    stopper.start()                # as the reactor would: it never runs the call handed
    stopper.join(300)
    assert not stopper.is_alive(), "the pool's stop hung on a thread waiting for the reactor"
    assert got == ["stopped"]
    with pytest.raises(threads.Stopped):
        threads.on_reactor(reactor, lambda: 1)


def test_on_reactor_returns_the_result_or_raises_the_error_of_the_call(lane):
    reactor, pool = lane
    got = []

    def job():
        got.append(threads.on_reactor(reactor, lambda x: x * 2, 21))
        try:
            threads.on_reactor(reactor, lambda: 1 / 0)
        except ZeroDivisionError:
            got.append("raised")
    pool.callInThread(job)
    wait_until(lambda: (reactor.run(), len(got) == 2)[1], 30, what="both calls answered")
    assert got == [42, "raised"]
