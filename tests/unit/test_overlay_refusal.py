"""A refused overlay TLS handshake says which side refused and why, in words (issue
16.4): real mutual-TLS handshakes between ``overlay.tls.Credentials`` contexts on the
loopback (a child process runs the reactor), each side's ``tls.refusal`` read from its
protocol's ``connectionLost``."""

from __future__ import annotations

import datetime
import json
import subprocess
import sys
import textwrap

from pacsp2p.overlay import tls

SCRIPT = textwrap.dedent('''
    import json, sys
    from pathlib import Path
    from twisted.internet import reactor, protocol, defer
    from twisted.internet.interfaces import IHandshakeListener
    from zope.interface import implementer
    from twisted.internet import ssl
    from pacsp2p.overlay import tls

    def creds(directory, name):
        c = object.__new__(tls.Credentials)        # no expiry check: a test may want one
        d = Path(directory)
        c.ca = ssl.Certificate.loadPEM((d / "ca.crt").read_bytes())
        c.own = ssl.PrivateCertificate.loadPEM((d / f"{name}.crt").read_bytes() +
                                               (d / f"{name}.key").read_bytes())
        c.name = name
        return c

    @implementer(IHandshakeListener)
    class P(protocol.Protocol):
        def __init__(self, side, results, done):
            self.side, self.results, self.done = side, results, done
            self.ok = False
        def handshakeCompleted(self):
            self.ok = True
            self.transport.write(b"x")      # TLS 1.3: a refusal comes on the first read
        def dataReceived(self, data):
            self.note("open")
            self.transport.loseConnection()
        def connectionLost(self, reason):
            self.note(tls.refusal(self.transport, reason.getErrorMessage()))
        def note(self, what):
            if self.side not in self.results:
                self.results[self.side] = what
            if not self.done.called and len(self.results) == 2:
                self.done.callback(None)

    class F(protocol.Factory):
        def __init__(self, side, results, done):
            self.side, self.results, self.done = side, results, done
        def buildProtocol(self, addr):
            return P(self.side, self.results, self.done)
    class CF(F, protocol.ClientFactory):
        def clientConnectionFailed(self, connector, reason):
            self.results[self.side] = "connect failed: " + reason.getErrorMessage()

    cases = json.loads(sys.argv[1])
    out = {}

    @defer.inlineCallbacks
    def run():
        for label, (server, client) in cases.items():
            results, done = {}, defer.Deferred()
            port = tls.listen(reactor, 0, F("server", results, done),
                              creds(*server).options(), interface="127.0.0.1",
                              timeout=10)
            reactor.connectSSL("127.0.0.1", port.getHost().port,
                               CF("client", results, done), creds(*client).options())
            timer = reactor.callLater(20, lambda: done.called or done.callback(None))
            yield done
            if timer.active():
                timer.cancel()
            yield port.stopListening()
            out[label] = results
        print(json.dumps(out))
        reactor.stop()
    reactor.callWhenRunning(run)
    reactor.run()
''')


def _handshakes(cases: dict) -> dict:
    proc = subprocess.run([sys.executable, "-c", SCRIPT, json.dumps(cases)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_refusals_name_the_side_and_the_reason(tmp_path):
    ours, theirs, mixed = tmp_path / "cluster", tmp_path / "other", tmp_path / "mixed"
    tls.init_ca(ours)
    tls.init_ca(theirs)
    tls.issue(ours, "peera")
    tls.issue(ours, "peerb")
    tls.issue(theirs, "peerx")
    # trusts our CA, shows a certificate of another one: only we refuse
    tls.issue(theirs, "peery", out=mixed)
    (mixed / "ca.crt").write_bytes((ours / "ca.crt").read_bytes())
    now = datetime.datetime.now(datetime.timezone.utc)
    tls.issue(ours, "peerold", days=1, not_before=now - datetime.timedelta(days=10))
    a, b = [str(ours), "peera"], [str(ours), "peerb"]
    x, y, old = [str(theirs), "peerx"], [str(mixed), "peery"], [str(ours), "peerold"]
    got = _handshakes({"valid": [a, b], "foreign dials": [a, y], "expired dials": [a, old],
                       "dial other cluster": [x, b], "dial expired": [old, a]})
    assert got["valid"] == {"server": "open", "client": "open"}
    # a certificate of another CA dials us: we refuse it, and it hears that we did
    assert got["foreign dials"]["server"] == \
        "refused by this peer: their certificate is not signed by this cluster's CA"
    assert got["foreign dials"]["client"].startswith(
        "refused by the other side: it refused our certificate")
    # an expired certificate dials us
    assert got["expired dials"]["server"].startswith(
        "refused by this peer: their certificate has expired (this peer's clock says ")
    assert got["expired dials"]["client"] == \
        "refused by the other side: it says our certificate has expired"
    # we dial a peer of another cluster: we refuse its certificate first
    assert got["dial other cluster"]["client"] == \
        "refused by this peer: their certificate is not signed by this cluster's CA"
    assert got["dial other cluster"]["server"].startswith("refused by the other side")
    # we dial a peer whose certificate expired
    assert got["dial expired"]["client"].startswith(
        "refused by this peer: their certificate has expired (this peer's clock says ")
