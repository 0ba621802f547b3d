"""An overlay client with a valid cluster certificate and hostile arguments, for
tests/cluster/test_hostile_overlay.py.

    python amp_intruder.py TLS_DIR NAME HOST PORT

Connects to a peer's overlay port as NAME (its certificate in TLS_DIR), sends every call
of ``CALLS`` on the one link, in order, and prints one JSON line per call:
``{"call": i, "command": ..., "error": exception class name or null}``; then exits.
"""
from __future__ import annotations

import json
import sys

from twisted.internet import defer, protocol, reactor
from twisted.protocols import amp

from pacsp2p.overlay import commands as c
from pacsp2p.overlay import tls

CT = "1.2.840.10008.5.1.4.1.1.2"
EVRLE = "1.2.840.10008.1.2.1"


def meta(uid, **kw):
    return json.dumps({"sop_instance_uid": uid, "sop_class_uid": CT,
                       "transfer_syntax_uid": EVRLE, **kw})


CALLS = [
    (c.Replicate, dict(archive="local", uid="../../x", sha256="", token="t")),
    (c.Replicate, dict(archive="local", uid="/etc/passwd", sha256="", token="t")),
    (c.Replicate, dict(archive="local", uid="1.2.3", sha256="../../x", token="t")),
    (c.ReplicaOpen, dict(stream=1, archive="local", uid="1.2.3/../../x", head=b"",
                         meta=meta("1.2.3/../../x"))),
    (c.ReplicaOpen, dict(stream=2, archive="local", uid="1.2.3", head=b"",
                         meta=meta("1.2.4"))),               # the header is of another
    (c.ReplicaOpen, dict(stream=3, archive="local", uid="1.2.3", head=b"",
                         meta=meta("1.2.3", attributes={"StudyInstanceUID": "../x"}))),
    (c.Commit, dict(archive="local", uid="1.02.3", sha256="")),
    (c.Discard, dict(archive="local", uid="1." + "2" * 63, sha256="ab" * 32)),
    (c.Drop, dict(archive="local", uid="1.2.\u00e93", sha256="")),
    (c.Drop, dict(archive="local", uid="1.2.3", sha256="../../x")),
    (c.SendTo, dict(ae_title="STORESCP", host="127.0.0.1", port=104, calling_ae="X",
                    originator_ae="", originator_msg_id=0,
                    uids=json.dumps(["1.2.3", "/etc/passwd"]))),
    (c.SendTo, dict(ae_title="STORESCP", host="127.0.0.1", port=104, calling_ae="X",
                    originator_ae="", originator_msg_id=0, uids="not JSON")),
    (c.SendTo, dict(ae_title="BAD\\AE", host="127.0.0.1", port=104, calling_ae="X",
                    originator_ae="", originator_msg_id=0, uids="[]")),
    (c.SendTo, dict(ae_title="STORESCP", host="127.0.0.1", port=104, calling_ae="X",
                    originator_ae="", originator_msg_id=0, uids="[]", associations=1000)),
    (c.SendTo, dict(ae_title="STORESCP", host="127.0.0.1", port=104, calling_ae="X",
                    originator_ae="", originator_msg_id=0, uids="[]", send_id=-1)),
    (c.CancelSend, dict(send_id=-1)),
    (c.Commits, dict(copies=json.dumps([["local", "1.2.3", ""], ["local", "../x", ""]]))),
    (c.Commits, dict(copies=json.dumps([["local", "1.2.3", "../../x"]]))),
    (c.Commits, dict(copies=json.dumps([["local", "1.2.3"]]))),
    (c.Commits, dict(copies=json.dumps([["local", "1.2.3", ""]] * (c.MAX_COMMITS + 1)))),
    (c.Commits, dict(copies="not JSON")),
    # valid arguments: refused by the service (no such archive, nothing pending), on
    # the same link: it stayed up
    (c.Drop, dict(archive="../..", uid="1.2.3", sha256="")),
    (c.Commit, dict(archive="local", uid="1.2.3.4", sha256="")),
]


@defer.inlineCallbacks
def run(tls_dir, name, host, port):
    creds = tls.Credentials(tls_dir, name)
    done = defer.Deferred()
    factory = protocol.ClientFactory.forProtocol(amp.AMP)
    factory.clientConnectionFailed = lambda connector, reason: done.errback(reason)
    factory.buildProtocol = lambda addr: _connected(done)
    reactor.connectSSL(host, port, factory, creds.options(), timeout=60)
    link = yield done
    for i, (command, args) in enumerate(CALLS):
        try:
            yield link.callRemote(command, **args)
            error = None
        except Exception as e:            # what the peer answered (or the link lost)
            error = type(e).__name__
        print(json.dumps({"call": i, "command": command.__name__, "error": error}),
              flush=True)
    link.transport.loseConnection()


def _connected(done):
    link = amp.AMP()
    original = link.connectionMade

    def made():
        original()
        done.callback(link)
    link.connectionMade = made
    return link


def main(argv):
    tls_dir, name, host, port = argv
    d = run(tls_dir, name, host, int(port))
    d.addErrback(lambda f: print(json.dumps({"failed": f.getErrorMessage()}), flush=True))
    d.addBoth(lambda _: reactor.stop())
    reactor.run()


if __name__ == "__main__":
    main(sys.argv[1:])
