"""``forward.drop_all`` fires only once every copy it drops is answered: ``Ingest.store``
waits for it before copying a data set again whose header read whole differs from its
first bytes (f4e43e6). Before, the drops were sent and not waited for: a holder could get
the new copy of the same bytes before the Discard, and its Commit then took the older
pending copy, with the first bytes' attributes (test_replication_late_attrs, under load)."""
from __future__ import annotations

from twisted.internet import defer

from pacsp2p.transfer.forward import drop_all


class Copy:
    def __init__(self):
        self.answered = defer.Deferred()
        self.dropped = 0

    def discard(self):
        self.dropped += 1
        return self.answered


def test_drop_all_fires_once_every_drop_is_answered():
    copies = [Copy(), Copy()]
    failed = defer.Deferred()
    done = drop_all([defer.succeed(copies[0]), failed, defer.succeed(copies[1])])
    assert isinstance(done, defer.Deferred)             # before: None, nothing to wait for
    failed.errback(RuntimeError("that push failed"))     # nothing to drop there
    assert [c.dropped for c in copies] == [1, 1] and not done.called
    copies[0].answered.callback(None)
    assert not done.called
    copies[1].answered.errback(RuntimeError("the holder is gone"))   # logged, not raised
    assert done.called
    results = []
    done.addCallback(results.append)
    assert results and all(ok for ok, _ in results[0])
