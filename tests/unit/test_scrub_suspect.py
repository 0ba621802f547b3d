"""A copy reported damaged (``Scrub.suspect``: a retrieval here, or another peer's
``CheckCopy``) is checked against this peer's catalog's hash of its copy, never the hash
the report names: another peer's word. Before, a report naming another hash (a version
of the instance held elsewhere, or any 64 hex digits) made a good copy 'damaged', and
the scrub replaced it with that version's bytes or, on an archive that cannot restore,
made it again elsewhere and forgot it here.

A real SQLite catalog and a real embedded archive (its jobs run at once); the catalog's
writes and resolve are what the scrub's state save and mend need of it.
"""
from __future__ import annotations

from pathlib import Path

from twisted.internet import defer

from pacsp2p import config
from pacsp2p.transfer.scrub import Scrub
from pacsp2p.types import Location

from test_delete_guards import SyncCatalog
from test_recheck import held_in_catalog


class Catalog(SyncCatalog):
    def write(self, fn):
        return defer.succeed(fn(self.conn))

    def resolve(self, query):
        return defer.succeed([])            # no other replica: the copy stays unrepaired


def test_a_report_is_checked_against_our_hash_not_the_one_told(tmp_path):
    archive, conn, [uid] = held_in_catalog(tmp_path, 1, "SUSPECT")
    [(sha, size)] = conn.execute("SELECT sha256, size FROM locations").fetchall()
    settings = config.from_dict({"peer": {"name": "peerb", "data_dir": str(tmp_path)}},
                                "t.toml", Path("."))
    scrub = Scrub(settings, Catalog(conn), {"local": archive}, None, None, None)
    scrub.running = True
    unrestorable = []
    scrub.on_unrestorable = lambda c, sha: unrestorable.append(sha) or defer.succeed(False)
    before = archive.path_for(uid).read_bytes()

    other = "ab" * 32                       # another version's hash, as a report names it
    scrub.suspect(Location(uid, "local", "peerb", other, size))
    assert scrub.found_by_reads == {"damaged": 0, "repaired": 0}
    assert archive.path_for(uid).read_bytes() == before and not unrestorable
    scrub.suspect(Location("1.2.3.999", "local", "peerb", sha, 1))   # not ours
    assert scrub.found_by_reads["damaged"] == 0

    archive.path_for(uid).unlink()          # really lost: found, whatever hash is told
    scrub.suspect(Location(uid, "local", "peerb", other, size))
    assert scrub.found_by_reads == {"damaged": 1, "repaired": 0}
    assert scrub.totals["missing"] == 1
