"""The boxes ``transfer.forward.Push`` sends a holder, by the values its Hello said it
takes (``link.values``): the stream's ``end`` is said once, on the last box. A stand-in
link records the calls (the wire itself is tested in tests/cluster/test_upgrade.py)."""
from __future__ import annotations

import pytest
from twisted.internet import defer

from pacsp2p.overlay.commands import ReplicaData, ReplicaOpen
from pacsp2p.transfer.forward import VALUE, Push


class Link:
    open, full = True, False

    def __init__(self, values):
        self.values, self.pushers, self.calls = values, set(), []

    def callRemote(self, command, **kw):
        self.calls.append((command, kw))
        return defer.Deferred()


@pytest.mark.parametrize("values", [1, 2, 3, 4])
@pytest.mark.parametrize("size", [10, VALUE + 1, 3 * VALUE + 5])
def test_a_small_data_set_ends_once_on_its_last_box(values, size):
    """Before: a holder taking 2 or 3 values got ``end`` on ReplicaOpen while boxes of
    the same data set were still to come."""
    link = Link(values)
    push = Push(link, "local", "1.2.3", b"", "{}", lambda: None, lambda: None)
    push.feed(b"x" * size)
    push.finish()
    assert link.calls[0][0] is ReplicaOpen
    ends = [i for i, (_, kw) in enumerate(link.calls) if kw.get("end")]
    assert ends == [len(link.calls) - 1], (values, size, link.calls)
    sent = b"".join(kw.get(k, b"") for _, kw in link.calls
                    for k in ("data", "more1", "more2", "more3"))
    assert sent == b"x" * size
