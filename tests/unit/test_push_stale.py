"""A writer's kept push-port connection that the holder closed while it was idle (a
holder whose threads are all taken closes its longest idle connection for a new one;
``ThreadServer._accepted``) is not used for the next exchange: a new one is made. Since
c7c4913 a waited-for ``Commits`` goes on these connections (not on the AMP link, which
a holder never drops that way): on a closed one it failed - and the C-STORE waiting for
it - although the holder was up. Real sockets, real mutual TLS, a real
``ReplicaService`` and ``Catalog`` (``test_push_commits``'s holder, one thread)."""
from __future__ import annotations

from pacsp2p.testing.cluster import wait_until
from pacsp2p.transfer.pushport import COMMIT, Pushes, _frame
from test_push_commits import Reactor, _in_thread, copies, serve_pushes
from test_push_port import UID, Archive, answer, certs, connect  # noqa: F401 (a fixture)


def test_a_commit_after_the_holder_closed_the_idle_connection_goes_on_a_new_one(
        certs, tmp_path):  # noqa: F811
    reactor = Reactor()
    catalog, svc, server = serve_pushes(reactor, certs, tmp_path, Archive(),
                                        max_connections=1)
    pushes = Pushes(certs, "peera", reactor)
    nothing = copies(("local", UID, "0" * 64))           # nothing pending: a null seq
    try:
        got = reactor.wait(pushes.commit("peerb", "127.0.0.1", server.port, nothing))
        assert got == {"seqs": [None], "prevs": [None]}  # its connection now kept, idle
        wait_until(lambda: server._idle, 30, 0.01, "the holder's connection idle")
        other = connect(certs, server.port)              # the holder's one thread: this
        other.sendall(_frame(COMMIT, nothing.encode()))  # one's, the idle one closed
        assert reactor.wait(_in_thread(reactor, answer, other))["seqs"] == [None]
        other.close()
        got = reactor.wait(pushes.commit("peerb", "127.0.0.1", server.port, nothing))
        assert got == {"seqs": [None], "prevs": [None]}
    finally:
        pushes.stop()
        server.stopListening()
        reactor.wait(catalog.stop())
        for stop in reactor.shutdown:
            stop()
