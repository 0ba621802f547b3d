"""Hostile inputs for a DICOM facade: a seeded generator and a bounded runner.

Used by ``tests/integration/test_fuzz.py`` (a few thousand inputs) and ``bench/fuzz.py``
(100,000). Everything here is written from the standards (PS3.8 upper layer, PS3.7
DIMSE, PS3.5 data sets in implicit VR little endian) with ``struct``, so that it can say
what no DICOM toolkit says on purpose, and it does not depend on the product's code.

- :class:`Generator` ``(seed, ...)`` makes :class:`Case` number *i* from
  ``random.Random(f"{seed}/{i}")`` alone: any case can be made again from the seed and
  its index, whatever ran before it or beside it. :data:`KINDS` lists the kinds; case *i*
  is of kind ``KINDS[i % len(KINDS)]`` unless a kind is asked for.
- A case is one TCP connection: steps (send bytes, read one PDU, sleep) and an ending
  (read the answers for a bounded time, close, or reset). While it reads, a case answers
  the C-STORE sub-operations of a C-GET like a storage SCP would (or, hostile, with a
  wrong message ID or not at all).
- :func:`run` sends cases with a bounded pool of connections (default 8 at a time),
  bounded in count and in time (every socket operation has a timeout), and returns a
  :class:`Report`: counts per kind and outcome, DIMSE statuses seen, failures (the peer
  refused a connection, a C-STORE that had to fail was answered Success, a bug here).
- :class:`Canary` makes path-like UIDs (absolute, and ``../`` climbing out of the
  archive's fan-out directory) that all point into one directory of the test's own, and
  says afterwards which of the files they name exist.

Traffic goes only where :func:`run` is pointed (the tests: 127.0.0.1).
"""

from pacsp2p.testing.fuzz.cases import KINDS, Case, Generator, Result
from pacsp2p.testing.fuzz.client import send_case
from pacsp2p.testing.fuzz.runner import Report, run
from pacsp2p.testing.fuzz.values import Canary, bad_ae, bad_uid
from pacsp2p.testing.fuzz.watch import LogWatch, RssPeak, log_problems, rss_kib
from pacsp2p.testing.fuzz.wire import CT, CX_CT, INJECTED, associate_rq, c_store, instance, message

__all__ = ["CT", "CX_CT", "INJECTED", "KINDS", "Canary", "Case", "Generator", "LogWatch",
           "Report", "Result", "RssPeak", "associate_rq", "bad_ae", "bad_uid", "c_store",
           "instance", "log_problems", "message", "rss_kib", "run", "send_case"]
