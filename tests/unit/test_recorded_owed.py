"""A replicated C-STORE whose first wave is pushes only (``recorded.store_remote``, the
writer holds no copy), R=2 and W=1: one holder's COMMIT fails (it died, or refused it),
the other's is recorded, so the C-STORE succeeds with one copy. The missing copy must be
owed (a hint for that archive, ``Ingest._owe``), as the general way (``Ingest.store``)
owes it: repair only looks for copies that were recorded and then lost, so a copy never
recorded and owed to nobody is never made. Before the fix, store_remote returned with no
hint (the instance stayed at one copy of two for ever).

A holder's COMMIT cannot be made to fail at a chosen moment in a real cluster (between
its push answer and the COMMIT that follows at once), so the two pushed copies are given
here as their answers arrive (``Ingest.remote_copy``'s ``_Copy``), one COMMIT refused."""
from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

from twisted.internet import defer

from pacsp2p import config
from pacsp2p.overlay.commands import ReplicaRefused
from pacsp2p.transfer import recorded
from pacsp2p.transfer.ingest import Ingest, _Copy
from pacsp2p.types import ArchiveInfo, InstanceMeta, Stored

SHA = "ab" * 32


class Hints:
    """The part of the catalog ``Ingest._owe`` writes to: the hints it is given."""

    def __init__(self):
        self.added = []

    def add_hints(self, uid, hints):
        self.added += [(uid, *h) for h in hints]
        return defer.succeed(None)


def test_a_commit_that_fails_leaves_its_copy_owed():
    settings = config.from_dict({"peer": {"name": "peera"},
                                 "cluster": {"replicas": 2, "write_quorum": 1}},
                                "<test>", Path("."))
    catalog = Hints()
    ingest = Ingest(settings, {}, catalog, strategies=None)
    b, c = ArchiveInfo("local", "peerb"), ArchiveInfo("local", "peerc")
    uid = "1.2.826.0.1.3680043.8.498.1"

    def copy(target, commit):
        return _Copy(target, Stored(target.name, SHA, 100), commit=commit,
                     discard=lambda: None)
    early = {("peerb", "local"): defer.succeed(copy(b, lambda meta: defer.succeed(7))),
             ("peerc", "local"): defer.succeed(copy(c, lambda meta: defer.fail(
                 ReplicaRefused("no pending copy"))))}
    forward = SimpleNamespace(ingest=ingest, remotes=[b, c], ranked=[b, c], early=early,
                              pushes=[], stamp=1,   # (no push pipelines its commit)
                              attributes={"SOPInstanceUID": uid})   # (as read whole)
    meta = InstanceMeta(uid, "1.2.840.10008.5.1.4.1.1.2", "1.2.840.10008.1.2.1",
                        {"SOPInstanceUID": uid}, 228, SHA, 100)
    got = []
    recorded.store_remote(forward, Path("unused"), meta).addBoth(got.append)
    assert got and [s.archive for s in got[0].stored] == ["local"], got
    assert catalog.added == [(uid, "peerc", "local", "", "")]
