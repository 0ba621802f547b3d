"""A parent row's state is the same at every peer that has the same facts, however each
came by them (review of 9d3bdfb, ``facts.STAMP_GRAIN``).

The holder's writer raises an unchanged parent row's stamp at most once per grain
(``facts.write_facts``); the writer of a pushes-only C-STORE learns the holder's fact
(``Catalog.learn``) with the instance's own stamp. Before, the two then held the same
values with different stamps (the holder the first of its stream's, the learner the
last's), and a version of another peer stamped between them won at the holder and lost
at the learner: two answers to one C-FIND for good (the learner serves no fact of its
own in that series, so nothing brings its row to the holder). Real catalogs
(``Catalog``, its writer and reader threads), no mocks.
"""
from __future__ import annotations

from pacsp2p.catalog.db import Catalog
from pacsp2p.catalog.facts import stamped
from test_catalog_scale import loc, meta, reactor  # noqa: F401

SERIES_ROW = "SELECT SeriesDescription, stamp FROM series WHERE SeriesInstanceUID = ?"


def _catalog(reactor, path, name):
    cat = Catalog(path, reactor, peer=name)
    reactor.wait(cat.start())
    return cat


def test_a_holder_and_a_writer_that_learned_its_facts_keep_the_same_series_row(
        tmp_path, reactor):
    q = _catalog(reactor, tmp_path / "q.sqlite", "q")      # the holder
    p = _catalog(reactor, tmp_path / "p.sqlite", "p")      # the writer: learns q's facts
    r = _catalog(reactor, tmp_path / "r.sqlite", "r")      # another peer's version
    try:
        # a stream of one series at q, 50 ms apart: each instance its own transaction
        v1 = [stamped(meta(i, SeriesDescription="V1"), 10_000 + 50 * i) for i in range(2)]
        seqs = [reactor.wait(q.record(m, loc(i, peer="q"))) for i, m in enumerate(v1)]
        for i, (m, seq) in enumerate(zip(v1, seqs)):
            assert p.learn("q", seq, m, loc(i, peer="q"), prev=q.previous(seq))
        reactor.wait(p.record(meta(10, patient=9, study=9), loc(10)))  # written with it
        assert p.vector["q"] == seqs[-1]
        # a version received at r 20 ms after the stream's first instance
        reactor.wait(r.record(stamped(meta(2, SeriesDescription="V2"), 10_020),
                              loc(2, peer="r")))
        batch = reactor.wait(r.changes("r", 0, 100))
        for cat in (q, p):
            reactor.wait(cat.apply("r", batch))
        rows = [reactor.wait(c.read(lambda conn: conn.execute(
            SERIES_ROW, ("1.2.5.0",)).fetchone())) for c in (q, p, r)]
        assert rows[0] == rows[1], rows      # before: ('V2', 10020) at q, ('V1', 10050) at p
        # and r, once it has q's facts, as well
        reactor.wait(r.apply("q", reactor.wait(q.changes("q", 0, 100))))
        assert reactor.wait(r.read(lambda conn: conn.execute(
            SERIES_ROW, ("1.2.5.0",)).fetchone())) == rows[0]
    finally:
        for cat in (q, p, r):
            reactor.wait(cat.stop())
