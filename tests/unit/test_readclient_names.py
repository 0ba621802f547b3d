"""The read client (``overlay.readclient``) and peer names the config allows (``[A-Za-z0-9]
[A-Za-z0-9._-]{0,63}``) that are no TLS server name (a label of 64 characters, an empty
label): the read fails (``ConnectError``), as for a peer that cannot be reached. Before,
``wrap_socket(server_hostname=...)`` raised UnicodeError (not an OSError) out of the
lane: a traceback in the pool, and what was queued for that peer never answered."""
from __future__ import annotations

from types import SimpleNamespace

import pytest
from test_readclient import RawHolder, Reactor, certs, client, instance, ok, outcome  # noqa: F401
from twisted.internet import error


@pytest.mark.parametrize("name", ["p" * 64, "peer..a"])
def test_a_peer_name_no_tls_server_name_can_be_fails_its_reads(tmp_path, certs,  # noqa
                                                               instance, name):  # noqa
    holder = RawHolder(certs, [ok(instance)] * 3)
    reactor = Reactor()
    reads = client(certs, reactor, tmp_path)
    peer = SimpleNamespace(name=name, host="127.0.0.1", read_port=holder.port)
    got = [reads.get(peer, holder.port, "local", f"1.{i}", None) for i in range(3)]
    for d in got:
        assert outcome(d).check(error.ConnectError)
    reactor.stop()
    holder.stop()
