"""The CLI for people (issue 16.4): ``--version``, human-readable times and sizes,
progress bars on a terminal and plain lines otherwise."""

from __future__ import annotations

import io
import re
import time

import pytest

from pacsp2p import __version__
from pacsp2p.admin import cli, human
from pacsp2p.admin.progress import DeleteWatch, Progress


def test_version(capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["--version"])
    assert e.value.code == 0
    assert capsys.readouterr().out.strip() == f"pacsp2p {__version__}"


def test_human_durations_and_sizes():
    assert human.duration(0.25) == "250 ms"
    assert human.duration(42) == "42 s"
    assert human.duration(200) == "3 min 20 s"
    assert human.duration(3600 * 2 + 300) == "2 h 5 min"
    assert human.duration(86400 * 3 + 3600 * 4) == "3 d 4 h"
    assert human.size(512) == "512 B"
    assert human.size(3.5 * 2**30) == "3.5 GiB"
    now = time.time()
    assert human.ago(now - 180, now) == "3 min ago"
    assert human.ago(None) == "never"
    assert re.fullmatch(r"\d\d:\d\d:\d\d \(3 min ago\)", human.when(now - 180, now))
    assert human.when(now - 86400 * 40, now).startswith(
        time.strftime("%Y-%m-%d", time.localtime(now - 86400 * 40)))


def test_status_lines_say_times_in_words():
    now = time.time()
    line = cli.under_replicated_line({"instances": 3, "unavailable": 0, "replicas": 2,
                                      "at": now - 125})
    assert "counted 2 min" in line and "ago" in line
    repair = {"state": "idle", "done": 10, "bytes": 5e6, "remaining": 0, "rate": 0.0,
              "limit_MB_s": 50.0, "dropped": 0, "failed": 0, "finished": now - 3600,
              "started": now - 3700,
              "waiting": [{"what": "peerb", "repair_in_s": 598.7}]}
    line = cli.repair_line(repair)
    assert "last run finished" in line and "(1 h ago)" in line
    assert "repair in 9 min 59 s" in line
    assert not re.search(r"\d{9,}", line), line          # no epoch seconds


def test_progress_plain_lines_when_not_a_terminal():
    out = io.StringIO()
    with Progress("rebuilding the catalog", unit="instances", stream=out, tty=False,
                  every=0.0) as p:
        p.set(500)
        p.set(1000)
    lines = out.getvalue().splitlines()
    assert lines[0].startswith("rebuilding the catalog: 500 instances")
    assert lines[-1].startswith("rebuilding the catalog: done: 1000 instances")
    assert "\r" not in out.getvalue()


def test_progress_quiet_for_short_work_when_not_a_terminal():
    out = io.StringIO()
    with Progress("x", stream=out, tty=False) as p:
        p.set(10)
    assert out.getvalue() == ""


def test_progress_bar_on_a_terminal():
    out = io.StringIO()
    with Progress("deleting study 1.2.3", total=40, stream=out, tty=True) as p:
        p.set(20)
        p.set(40)
    text = out.getvalue()
    assert "deleting study 1.2.3" in text and "40/40" in text and "100%" in text
    assert "\r" in text                                   # redrawn in place


def test_delete_watch_counts_tombstones():
    """The tombstones /status reports grow as the peer deletes; the bar follows them,
    out of the study's instances (/where)."""
    seen = {"tombstones": 5}

    def fetch(what):
        if what.startswith("where?"):
            return [{"instance": str(i)} for i in range(8)]
        seen["tombstones"] = min(15, seen["tombstones"] + 2)     # 7 before, 8 more
        return {"deletions": {"tombstones": seen["tombstones"]}}

    out = io.StringIO()
    watch = DeleteWatch(fetch, "STUDY", "1.2.3", stream=out, tty=True)
    watch.POLL = 0.01
    with watch:
        deadline = time.monotonic() + 30
        while watch.bar.done < 8 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert watch.bar.done == 8             # followed while the delete ran
    assert watch.bar.total == 8
    assert "8/8" in out.getvalue()


@pytest.mark.parametrize("value", ["0", "-5", "nan", "inf", "1e308", "ten", "86401"])
def test_drain_stalled_refuses_what_is_no_wait(capsys, value):
    """``pacsp2p drain --stalled`` takes 1 to 86400 seconds: anything else is argparse's
    one-line error (exit 2) before any peer is asked."""
    with pytest.raises(SystemExit) as e:
        cli.main(["drain", "--peer", "p", "--stalled", value])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "argument --stalled: " in err and ("seconds" in err), err
