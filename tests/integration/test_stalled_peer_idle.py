"""A peer that stood still (SIGSTOP: a VM stall, a swap storm) longer than its
``idle_timeout`` does not abort, as idle, an association whose request waited in the
socket meanwhile.

On resume the reactor ran the idle timer (long past due) before reading what had
arrived: the association was aborted "idle for N s" with a request outstanding -- the
requestor was waiting for us, not silent (seen with a writer frozen 65 s under a stream
of C-STOREs). Now a timer that fires far later than it was due re-arms instead: the
process stalled, the waiting bytes are read first. A real peer with ``idle_timeout = 3``,
frozen 8 s while a pynetdicom C-ECHO waits; it must be answered on the same association.
"""
from __future__ import annotations

import os
import signal
import threading
import time

from pynetdicom import build_context

from pacsp2p.testing import dicomnet as dn
from pacsp2p.testing.peer import Peer

IDLE = 3.0
FROZEN = 8.0


def test_a_request_that_waited_through_a_stall_is_answered(tmp_path):
    with Peer(tmp_path / "peer", config={"facade": {"idle_timeout": IDLE}}) as peer:
        context = [build_context("1.2.840.10008.1.1")]
        with dn.association(peer.port, peer.ae_title, context, timeout=120) as assoc:
            assert assoc.send_c_echo().Status == 0x0000
            answers = []
            os.kill(peer.process.pid, signal.SIGSTOP)
            try:
                echo = threading.Thread(target=lambda: answers.append(assoc.send_c_echo()))
                echo.start()
                time.sleep(FROZEN)          # the C-ECHO waits in the peer's socket
            finally:
                os.kill(peer.process.pid, signal.SIGCONT)
            echo.join()
            assert answers and "Status" in answers[0], \
                (answers, peer.log_path.read_text()[-1500:])
            assert answers[0].Status == 0x0000
            assert assoc.is_established
            assert assoc.send_c_echo().Status == 0x0000
        assert "idle for" not in peer.log_path.read_text()
