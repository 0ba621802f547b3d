"""pynetdicom as association requestor, without its reactor thread taking our responses.

pynetdicom runs a reactor thread per association, also for a requestor. Each turn it
takes the next complete DIMSE message off the association's queue (``get_msg(block=False)``)
and serves it as a request. ``send_c_find`` (and every other ``send_*``) keeps it away
from the responses by clearing a checkpoint the reactor waits on, then spinning until
``_is_paused`` is true. But that flag is stale while the reactor is waking from the
checkpoint the previous operation set: the caller sees it true, sends the next request,
and a reactor thread that runs late (a busy machine, the GIL) takes the first response
queued at that moment, logs "Received unexpected C-FIND service message" and drops it.
A dropped Pending response loses a match without a trace; a dropped final response
leaves the caller waiting for ``dimse_timeout`` (for ever without one) while the acceptor,
having answered, sees an idle association (issue 19.1: a C-FIND got its Pending responses
but never the final one, and the peer logged the association as idle; also pynetdicom
issue #875).

``guard(assoc)`` closes the race for one established association: its reactor thread
takes no DIMSE message at all, so every message goes to the operation waiting for it —
its responses, and the C-STORE requests of a C-GET (which the reactor could otherwise
serve at the same time as the operation serves the next one). Our requestors expect no
unsolicited request; one would reach the next operation, which aborts the association.
Call ``guard`` right after ``associate()``, before the first request.
"""

from __future__ import annotations


def guard(assoc) -> None:
    """Keep *assoc*'s reactor thread off its DIMSE messages (see the module docstring)."""
    dimse = assoc.dimse
    blocking = dimse.get_msg

    def get_msg(block: bool = False):
        if block:                       # the operation waiting for its next message
            return blocking(True)
        return None, None               # the reactor thread's turn: nothing for it

    dimse.get_msg = get_msg
