"""Every copy handed to a push-port sender (``pushport.ThreadPush``) ends with exactly one
``done``, so its ``answer`` fires: a copy whose answer never comes holds its C-STORE and
the association for good (as bad as a loss). Before: a copy handed to a sender whose
thread had ended (the peer stopping; a thread that died) queued its bytes where none read
them and waited forever; a ``told`` hook (the group commits riding with a pipelined copy)
that raised in the reactor left ``answer`` unfired. Real sockets, real mutual TLS, a real
``ReplicaService`` and ``Catalog`` (``test_push_commits``'s holder; the test's thread is
the reactor)."""
from __future__ import annotations

import pytest
from twisted.logger import globalLogPublisher

from pacsp2p.testing.cluster import patience, wait_until
from pacsp2p.transfer.pushport import Pushes, ReplicaRefused
from test_push_commits import holder  # noqa: F401 (a fixture)
from test_push_port import UID, certs, meta_json  # noqa: F401 (a fixture)


def _open(pushes, server, data):
    copy = pushes.open("peerb", "127.0.0.1", server.port, "local", UID, b"HEAD",
                       meta_json(), lambda: None, lambda: None)
    copy.feed(data)
    return copy


def test_a_copy_whose_sender_has_ended_fails_instead_of_waiting_forever(
        certs, holder):  # noqa: F811
    reactor, svc, server = holder
    pushes = Pushes(certs, "peera", reactor)
    copy = _open(pushes, server, b"s" * 1000)        # handed a sender, nothing queued yet
    pushes.stop()
    wait_until(lambda: not pushes.senders, 60, 0.01, "the sender's thread ended")
    copy.finish()
    with pytest.raises(ReplicaRefused):               # before: never fired
        reactor.wait(copy.answer, patience(60))
    copy.done(None, ReplicaRefused("again"))          # a second done: nothing more


def test_a_hook_that_raises_after_the_answer_does_not_keep_it_from_firing(
        certs, holder):  # noqa: F811
    reactor, svc, server = holder
    events = []
    globalLogPublisher.addObserver(events.append)
    pushes = Pushes(certs, "peera", reactor)
    try:
        copy = _open(pushes, server, b"t" * 5000)
        copy.pipelined = True
        copy.finish()

        def told(answer):
            raise RuntimeError("the riding commits' hook failed")
        assert copy.verdict(None, told)
        assert reactor.wait(copy.answer, patience(60))["size"] > 0   # before: raised
        assert any("hook failed" in str(e.get("log_failure", "")) for e in events)
    finally:
        globalLogPublisher.removeObserver(events.append)
        pushes.stop()
