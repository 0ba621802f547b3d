"""Every DIMSE operation that started is recorded exactly once (issue 16.3): at its final
response, or — its association gone first — when it is cut short, with what it did."""

from __future__ import annotations

from types import SimpleNamespace

from pacsp2p.dicom import dimse
from pacsp2p.facade.operation import Operation


class Observer:
    def __init__(self):
        self.calls = []

    def finished(self, op, status, counts, comment):
        self.calls.append((status, counts, comment))


class Clock:
    def seconds(self):
        return 0.0


class Assoc:
    def __init__(self):
        self.sent, self.done_ops = [], []

    def send(self, cid, command, data=None, now=False):
        self.sent.append(command)

    def done(self, op):
        self.done_ops.append(op)


def _op(cls=Operation):
    svc = SimpleNamespace(reactor=Clock(), observer=Observer())
    cx = SimpleNamespace(context_id=1, transfer_syntax=["1.2.840.10008.1.2"])
    fields = {dimse.MESSAGE_ID: (7).to_bytes(2, "little")}
    op = cls(svc, Assoc(), cx, fields)
    op.RSP = dimse.C_FIND_RSP
    op.run = lambda: None
    return op, svc.observer


def test_finished_once():
    op, obs = _op()
    op.start()
    op.finish(0x0000)
    op.finish(0x0000)
    op.lost()
    assert obs.calls == [(0x0000, None, "")]


def test_cut_short_recorded_once_with_what_it_did():
    class Counting(Operation):
        def lost_counts(self):
            return (3, 2, 0, 0)
    op, obs = _op(Counting)
    op.start()
    op.lost()
    op.finish(0x0000)                   # a late callback: nothing more
    assert obs.calls == [(None, (3, 2, 0, 0),
                          "the association ended before the final response")]


def test_one_that_finishes_after_its_association_is_recorded_then():
    class Keeps(Operation):
        def finishes_after_loss(self):
            return True
    op, obs = _op(Keeps)
    op.start()
    op.lost()
    assert obs.calls == []
    op.finish(0xA700)
    assert obs.calls == [(0xA700, None, "")]


def test_never_started_is_not_recorded():
    op, obs = _op()
    op.lost()
    assert obs.calls == []
