"""``Tally``: per-instance events of a batch in one log line (issue 16.3)."""

from pacsp2p.tally import Tally


def test_one_line_for_a_batch_with_an_example_of_each_failure():
    t = Tally()
    assert not t
    for i in range(1000):
        t.add("copied to local@peerb", f"1.2.{i}")
    t.add("failed to local@peerc", "1.2.7", "no link to peer peerc")
    t.add("failed to local@peerc", "1.2.8", "no link to peer peerc")
    assert len(t) == 1002
    line = t.summary()
    assert line == ("1000 copied to local@peerb, "
                    "2 failed to local@peerc (e.g. 1.2.7: 'no link to peer peerc')")
    assert "\n" not in line


def test_hostile_errors_are_shown_bounded():
    t = Tally()
    t.add("failed", "1.2.3", "x" * 5000 + "\n\x1b[31m")
    line = t.summary()
    assert len(line) < 300 and "\n" not in line and "\x1b" not in line
